"""A slide refused for a file name that is not UTF-8 is recorded in manifest.json as valid UTF-8 text."""

from __future__ import annotations

import json
import os
import shutil

from gigaslide.cli.main import main
from gigaslide.testing import make_slide


def test_a_refused_non_utf8_slide_is_recorded_as_text_strict_readers_accept(tmp_path):
    src = make_slide(tmp_path / "s.tiff", (512, 512), mpp=1.0)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(src, folder / os.fsdecode(b"caf\xe9.tiff"))
    shutil.copy(src, folder / "ok.tiff")
    out = tmp_path / "out"
    assert main(["encode", str(folder), "--encoder", "test_resnet", "--weights", "random", "--mpp", "1",
                 "--tile-size", "64", "--workers", "0", "--out", str(out)]) == 2  # one slide failed
    raw = (out / "manifest.json").read_bytes()
    assert b"\\udc" not in raw  # no lone surrogate escapes: serde_json and other strict readers refuse them
    slides = json.loads(raw)["slides"]
    assert slides["ok"]["status"] == "done" and slides["caf\\xe9"]["status"] == "failed"
    assert slides["caf\\xe9"]["path"].endswith("caf\\xe9.tiff")

"""Commands that never run a model must not import torch (about 2 s of CPU per call: 59 % of a small `gigaslide
tile` job's CPU when the option checks pulled it in through ``gigaslide.devices``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gigaslide.testing import make_slide

PROBE = """
import json, sys
from gigaslide.cli.main import main
rc = main(sys.argv[2:])
heavy = sorted(m for m in ("torch", "timm", "sklearn", "matplotlib") if m in sys.modules)
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.mark.parametrize("command", ["tile", "info"])
def test_commands_without_a_model_do_not_import_torch(tmp_path: Path, command: str) -> None:
    slide = make_slide(tmp_path / "s.tif", (768, 512))
    args = {"tile": ["tile", str(slide), "--out", str(tmp_path / "out")], "info": ["info", str(slide)]}[command]
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", PROBE, str(report), *args], check=True, capture_output=True, timeout=300)
    got = json.loads(report.read_text())
    assert got["rc"] == 0
    assert got["heavy"] == []

"""Round 7 (lens I, stage contracts): the slide a viewer draws a project's layers on is the scan they were made on."""

from __future__ import annotations

import json
import shutil

import h5py

from gigaslide.testing import make_slide
from gigaslide.viewer import ViewerState, build_app


def test_another_slide_found_under_a_slides_name_is_refused_not_drawn_on(tiny_copy, tmp_path, monkeypatch):
    """The slides were moved; the manifest records them as the job was given them (``slides/s0.tiff``, relative) and
    the viewer, run from another cohort's folder, found that cohort's ``slides/s0.tiff`` there: the tiles, attention
    and grid of s0 were drawn over another slide (another size), or over another slide of the same size, with status
    ok. Refused now, with one line naming the file found and what the features record."""
    from fastapi.testclient import TestClient

    out = tiny_copy.out
    man = json.loads((out / "manifest.json").read_text())
    for sid, v in man["slides"].items():
        v["path"] = f"slides/{sid}.tiff"
    (out / "manifest.json").write_text(json.dumps(man))
    for sub in ("features", "patches"):
        for f in (out / sub).glob("*.h5"):
            with h5py.File(f, "a") as h:
                h.attrs["slide_path"] = f"/moved/away/{f.stem}.tiff"
    other = tmp_path / "other-cohort"
    make_slide(other / "slides" / "s0.tiff", (1536, 1024), mpp=1.0, seed=42, blobs=2)  # another size
    shutil.copy(tiny_copy.slides[3], other / "slides" / "s1.tiff")  # the same size, another slide
    shutil.copy(tiny_copy.slides[2], other / "slides" / "s2.tiff")  # s2 itself, moved here: still shown
    monkeypatch.chdir(other)
    state = ViewerState([out], [tiny_copy.run])
    c = TestClient(build_app(state))
    r0 = c.get("/api/slides/s0")
    assert r0.status_code == 404
    assert "slides/s0.tiff: is 1536x1024 px, the slide features/s0.h5 was cut from 1024x768 px" in r0.json()["detail"]
    assert "/moved/away/s0.tiff" in r0.json()["detail"]
    r1 = c.get("/api/slides/s1")
    assert r1.status_code == 404 and "is not the file features/s1.h5 was cut from" in r1.json()["detail"]
    assert c.get("/api/slides/s1/overlay/run0-attention/10/0_0.png").status_code == 404
    assert state.status("s1")[0] == "broken"
    r2 = c.get("/api/slides/s2")
    assert r2.status_code == 200 and r2.json()["status"] == "ok" and r2.json()["n_tiles"] > 0
    assert c.get("/api/slides/s2/overlay/run0-attention/10/0_0.png").status_code == 200

"""The viewer on real slides from ../shared/data: an Aperio SVS through OpenSlide's deep zoom, a plain TIFF that
OpenSlide rejects (through open_slide; its tiling failed) and an unopenable file, listed as broken, not fatal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.realdata


def test_real_slides_in_the_viewer(real_slides, tmp_path):
    from fastapi.testclient import TestClient

    from gigaslide.encoders import build_encoder
    from gigaslide.features.extract import encode_slides
    from gigaslide.slides import open_slide
    from gigaslide.tiling import TilingParams
    from gigaslide.viewer import ViewerState, build_app

    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\nkidney-48-5,0.5\n")
    slides = [real_slides / "cmu-1-small-region.svs", real_slides / "kidney-48-5.tif", real_slides / "corrupt" / "unopenable.tiff"]
    res = encode_slides(slides, tmp_path / "out", build_encoder("test_resnet", "random"), TilingParams(mpp=2.0, tile_size=64, min_tissue=0.1),
                        workers=0, precision="fp32", slide_mpp=str(mpp_csv))
    assert res.done == ["cmu-1-small-region"] and set(res.failed) == {"kidney-48-5", "unopenable"}  # kidney: no tissue found
    state = ViewerState([tmp_path / "out"])
    c = TestClient(build_app(state))
    assert {s["status"] for s in c.get("/api/state").json()["slides"]} == {"pending"}  # none opened for the list
    state.warm()  # `gigaslide view` runs it in the background: the rows fill in
    rows = {s["slide_id"]: s for s in c.get("/api/slides").json()["slides"]}
    assert rows["unopenable"]["status"] == "broken" and rows["cmu-1-small-region"]["status"] == "ok"
    assert rows["kidney-48-5"]["status"] == "no features" and "tissue" in rows["kidney-48-5"]["reason"]  # why it failed
    info = c.get("/api/slides/cmu-1-small-region").json()
    assert info["backend"] == "openslide-deepzoom" and info["mpp_source"] == "slide metadata"
    with open_slide(slides[0]) as s:
        assert (info["width"], info["height"]) == s.dimensions and info["mpp"] == pytest.approx(s.mpp)
        ref = s.read_region((0, 0), (254, 254), s.mpp)
    top = info["levels"] - 1
    tile = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/cmu-1-small-region/dz/{top}/0_0.jpeg").content)).convert("RGB"))
    assert np.abs(tile[:254, :254].astype(int) - ref.astype(int)).mean() < 8
    kid = c.get("/api/slides/kidney-48-5").json()  # OpenSlide rejects it: read through open_slide, still shown
    assert kid["backend"].startswith("gigaslide-") and (kid["width"], kid["height"]) == (1493, 901)
    assert kid["mpp"] is None and kid["n_tiles"] == 0  # no mpp in the file, none recorded: no scale bar
    with open_slide(slides[1], mpp=0.5) as s:
        ref = s.read_region((253, 253), (256, 256), 0.5)
    t2 = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/kidney-48-5/dz/{kid['levels'] - 1}/1_1.jpeg").content)).convert("RGB"))
    assert np.abs(t2.astype(int) - ref.astype(int)).mean() < 8
    tissue = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/cmu-1-small-region/overlay/tissue/{top - 3}/0_0.png").content)))
    assert 0.05 < (tissue[..., 3] > 0).mean() < 0.95  # some tissue, some glass


def test_damaged_slide_thumbnail_is_one_line_naming_the_file(real_slides, tiny_copy):
    """A slide that opens but whose pixels do not decode: its deep-zoom tiles said so in one line naming the file, its
    tile thumbnails (the similar-tiles panel) answered 500 'OpenSlideError: Bogus marker length'."""
    import json
    import shutil

    import h5py
    from fastapi.testclient import TestClient

    from gigaslide.viewer import ViewerState, build_app

    t = tiny_copy
    bad = t.root / "slides" / "bad.svs"
    shutil.copy(real_slides / "corrupt" / "unreadable.svs", bad)
    man = json.loads((t.out / "manifest.json").read_text())
    man["slides"]["s0"]["path"] = str(bad)
    (t.out / "manifest.json").write_text(json.dumps(man))
    import openslide

    with h5py.File(t.out / "features" / "s0.h5", "r+") as f:
        f["coords"][0] = (0, 0)  # a tile over the slide's (undecodable) pixels
        # features of this slide (another one under the name is refused before its pixels are read: test_r7_provenance)
        f["coords"].attrs["level0_width"], f["coords"].attrs["level0_height"] = openslide.OpenSlide(bad).dimensions
        f.attrs["slide_path"] = str(bad)
    c = TestClient(build_app(ViewerState([t.out])), raise_server_exceptions=False)
    for url in ("/api/slides/s0/dz/4/0_0.jpeg", "/api/slides/s0/tiles/0.jpeg"):
        r = c.get(url)
        assert r.status_code == 404, url
        detail = r.json()["detail"]
        assert detail.startswith(f"{bad}: cannot read ") and "Bogus marker length" in detail, detail
        assert detail.endswith("fix: the file is damaged or incomplete; re-copy it")

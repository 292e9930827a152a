"""Slide ids the viewer's HTTP API must route as they are (review round 5, lenses B and C)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from gigaslide.features import store
from gigaslide.testing import make_slide


def _encoded(root: Path, ids: list[str]) -> Path:
    """An OUT_DIR of small generated slides, one per id: features written directly, recording the slide path."""
    out = root / "out"
    for i, sid in enumerate(ids):
        slide = make_slide(root / "slides" / f"s{i}.tiff", (256, 192), mpp=1.0, seed=i, blobs=1)
        n = 3 + i
        coords = np.stack([np.arange(n) * 64 % 256, np.arange(n) * 64 // 256 * 64], 1)
        store.save(out / "features" / f"{sid}.h5", np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32),
                   coords, coords_attrs={"patch_size_level0": 64},
                   attrs={"encoder": "toy", "mpp": 1.0, "tile_size": 64, "slide_id": sid, "slide_path": str(slide)})
    return out


def test_a_slide_whose_id_ends_in_dzi_has_details_and_a_descriptor(tmp_path):
    """``/api/slides/x.dzi`` was routed to the Deep Zoom descriptor of a slide ``x`` (404 "no slide x"): the page
    could not open a slide called ``x.dzi``. A slide's own key comes first; ``<key>.dzi`` is still its descriptor."""
    from fastapi.testclient import TestClient

    from gigaslide.viewer import ViewerState, build_app

    out = _encoded(tmp_path, ["x.dzi", "y"])
    c = TestClient(build_app(ViewerState([out])))
    info = c.get("/api/slides/x.dzi")
    assert info.status_code == 200, info.text
    assert info.json()["key"] == "x.dzi" and info.json()["n_tiles"] == 3 and info.json()["width"] == 256
    for key in ("x.dzi", "y"):
        d = c.get(f"/api/slides/{key}.dzi")
        assert d.status_code == 200 and d.headers["content-type"].startswith("application/xml")
        assert 'Width="256"' in d.text and 'Height="192"' in d.text
    assert c.get("/api/slides/y").json()["n_tiles"] == 4
    nope = c.get("/api/slides/nope.dzi")
    assert nope.status_code == 404 and "no slide nope.dzi" in nope.json()["detail"]


@pytest.mark.parametrize("ids", [["p%41c", "a#b", "q?x=1&y", "sp ace", "ünï中", "001", "pAc"]])
def test_ids_with_url_characters_reach_their_own_slide_on_a_real_server(tmp_path, ids):
    """Each id as the page's ``encodeURIComponent`` sends it to uvicorn: ``%``, ``#``, ``?``, ``&``, a space,
    non-ASCII and a number-like id each reach their own slide (``p%41c`` is not ``pAc``; FastAPI's TestClient
    decodes a path twice, so only a real server tells)."""
    from gigaslide.viewer import Server, ViewerState, build_app

    out = _encoded(tmp_path, ids)
    server = Server(build_app(ViewerState([out])), port=0).start()
    try:
        for i, sid in enumerate(ids):
            enc = quote(sid, safe="-_.!~*'()")  # encodeURIComponent
            for path, check in ((f"/api/slides/{enc}", lambda b: json.loads(b)["key"] == sid),
                                (f"/api/slides/{enc}/tiles/{2 + i}", lambda b: json.loads(b)["slide"] == sid),
                                (f"/api/slides/{enc}/tiles/0.jpeg", lambda b: b[:2] == b"\xff\xd8")):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                conn.close()
                assert r.status == 200 and check(body), (sid, path, r.status, body[:200])
    finally:
        server.stop()


def test_a_tile_number_past_the_slides_tiles_says_how_many_it_has(tmp_path):
    """``/api/slides/<key>/tiles/<i>`` past the last tile (a slide of 0 or 1 tiles too) answered "not found: 0" (the
    bare index); it names the tile and how many the slide has, as the thumbnail and neighbour routes do."""
    from fastapi.testclient import TestClient

    from gigaslide.viewer import ViewerState, build_app

    out = _encoded(tmp_path, ["a"])  # 3 tiles
    c = TestClient(build_app(ViewerState([out])))
    assert c.get("/api/slides/a/tiles/2").json()["index"] == 2
    for route in ("/api/slides/a/tiles/3", "/api/slides/a/tiles/3/neighbours", "/api/slides/a/tiles/3.jpeg"):
        r = c.get(route)
        assert r.status_code == 404 and r.json()["detail"] == "not found: tile 3 (slide has 3)", (route, r.text)

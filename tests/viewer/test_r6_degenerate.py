"""Round 6: degenerate numbers in what the viewer serves (NaN / inf features of some tiles)."""

from __future__ import annotations

import h5py
import numpy as np

from gigaslide.viewer import ViewerState, build_app
from gigaslide.viewer.neighbours import FeatureIndex


def test_tiles_with_nan_or_inf_features_are_never_neighbours_nor_searched_from():
    """A NaN row made every similarity of a search from it NaN: the tile itself came back first, then arbitrary tiles;
    searched from elsewhere with a large k, NaN sorted last and the tile was returned as a neighbour too."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)
    a[1] = np.nan
    b[2, 0] = np.inf
    idx = FeatureIndex({"a": a, "b": b})
    assert len(idx) == 5  # 7 tiles, two of them not searched
    assert not idx.searchable("a", 1) and not idx.searchable("b", 2) and idx.searchable("a", 0)
    assert idx.query("a", 1, k=3) == []
    got = idx.query("a", 0, k=100)  # every other tile
    assert {(n.slide, n.index) for n in got} == {("a", 2), ("a", 3), ("b", 0), ("b", 1)}
    assert all(np.isfinite(n.similarity) for n in got)


def test_neighbours_of_a_nan_tile_say_why(tiny_copy):
    from fastapi.testclient import TestClient

    with h5py.File(tiny_copy.out / "features" / "s0.h5", "r+") as f:
        x = f["features"][:]
        x[1] = np.nan
        f["features"][...] = x
    c = TestClient(build_app(ViewerState([tiny_copy.out], [tiny_copy.run])))
    r = c.get("/api/slides/s0/tiles/1/neighbours?k=8")
    assert r.status_code == 404 and "NaN/inf features" in r.json()["detail"], r.text
    r = c.get("/api/slides/s1/tiles/0/neighbours?k=100")
    assert r.status_code == 200
    got = r.json()["neighbours"]
    assert len(got) == 100 and ("s0", 1) not in {(n["slide"], n["index"]) for n in got}
    assert all(n["similarity"] is not None for n in got)

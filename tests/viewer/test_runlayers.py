"""StreamingCLAM attention and slide-SSL cluster layers: values land at their level-0 positions, reasons when absent."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gigaslide.viewer import ViewerState, build_app
from gigaslide.viewer.overlays import lut, palette

TOP = 10  # top deep-zoom level of the 1024 x 768 tiny slides: level-0 px
SLPD = dict(epochs=1, region_mpp=1.0, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2, head_dim=64,
            n_local=2, log=lambda *a: None)


@pytest.fixture(scope="module")
def project(tiny, tmp_path_factory):
    from gigaslide.features import store
    from gigaslide.ssl.slide.slpd import pretrain_slpd
    from gigaslide.streaming.grids import AttentionGrid, save_grid

    tp = sys.modules["gigaslide_tiny_project"]
    root = tmp_path_factory.mktemp("runlayers")
    ff = store.load(tiny.out / "features" / "s0.h5")
    tile = len(ff) // 2  # the planted high-attention position (fold 1, s0's test fold) holds this tile's centre
    cell = tp.grid_cell(*(ff.coords[tile] + 32))
    stream = tp.streaming_run(root / "stream", {("s0", 1): cell, ("s0", 0): (7, 5)}, {"s0": 1, "s1": 0, "s2": 0},
                              with_probs=True)
    g = np.zeros((1, 2))
    save_grid(stream, AttentionGrid("s2", 0, g, [1.0], 100, (1, 1), [0.5, 0.5], (2048, 2048)))  # another slide's size
    pretrain_slpd(tiny.out / "features", root / "slpd", region_size=128, **SLPD)  # 2 x 2 tiles per region
    pretrain_slpd(tiny.out / "features", root / "slpd_big", region_size=1024, **SLPD)  # one region per slide
    (root / "giga").mkdir()
    (root / "giga" / "run.json").write_text(json.dumps({"run_kind": "gigassl", "config": {"data": {}, "train": {}}}))
    state = ViewerState([tiny.out], [tiny.run, stream, root / "slpd", root / "slpd_big", root / "giga"])
    from fastapi.testclient import TestClient

    return TestClient(build_app(state)), state, root, tile, cell


def _screen(c, layer: str, query: str = "") -> np.ndarray:  # noqa: ANN001
    """Slide s0's whole overlay at level-0 resolution, RGBA."""
    return sys.modules["gigaslide_tiny_project"].overlay_screen(c, "s0", layer, query)


def _box(cell: tuple[int, int]) -> tuple[slice, slice]:
    x0, y0 = 40 + cell[0] * 100, 24 + cell[1] * 100
    return slice(y0, y0 + 100), slice(x0, x0 + 100)


def test_streaming_attention_is_drawn_on_its_level0_grid(project):
    c, state, _, _, cell = project
    layers = {l["id"]: l for l in c.get("/api/slides/s0").json()["layers"]}
    att = layers["run1-attention"]
    assert att["available"] and att["folds"] == ["fold0", "fold1"] and att["fold"] == "fold1" and att["held_out"]
    assert layers["run1-prob1"]["available"]  # the grid has per-position probabilities
    top = lut("jet")[255]
    for fold, planted in ((None, cell), ("fold0", (7, 5))):  # the held-out fold by default, then the other fold
        img = _screen(c, "run1-attention", f"?fold={fold}" if fold else "")
        hot = (img[..., :3] == top).all(-1) & (img[..., 3] == 255)
        want = np.zeros_like(hot)
        want[_box(planted)] = True
        assert (hot == want).all()  # the highest attention exactly on its 100 px level-0 box, nowhere else
        assert img[:24, :, 3].max() == 0 and img[:, :40, 3].max() == 0 and img[724:, :, 3].max() == 0  # no grid there
        assert img[24:724, 40:940, 3].min() == 255
    # threshold: only the planted position (percentile 1) stays above 0.99
    shown = _screen(c, "run1-attention", "?threshold=0.99")[..., 3] == 255
    want = np.zeros_like(shown)
    want[_box(cell)] = True
    assert (shown == want).all()
    prob = _screen(c, "run1-prob1", "?cmap=viridis")
    vir = lut("viridis")
    for col in (0, 3, 8):  # P(class 1) = column / 8
        np.testing.assert_array_equal(prob[300, 40 + col * 100 + 50, :3], vir[int(col / 8 * 255)])


def test_streaming_layer_unavailable_with_a_reason(project):
    c, *_ = project
    s1 = {l["id"]: l for l in c.get("/api/slides/s1").json()["layers"]}["run1-attention"]
    assert not s1["available"] and "no attention grid of s1" in s1["reason"] and "heatmap-streaming" in s1["reason"]
    s2 = {l["id"]: l for l in c.get("/api/slides/s2").json()["layers"]}["run1-attention"]
    assert not s2["available"] and "2048x2048 px slide, this one is 1024x768" in s2["reason"]
    assert c.get(f"/api/slides/s1/overlay/run1-attention/{TOP}/0_0.png").status_code == 404


def test_slpd_prototype_ids_in_palette_colours_per_tile(project):
    from gigaslide.ssl.slide.assign import tile_clusters

    c, state, root, _, _ = project
    layers = {l["id"]: l for l in c.get("/api/slides/s0").json()["layers"]}
    lay = layers["run2-clusters"]
    assert lay["available"] and lay["kind"] == "category" and lay["palette"] == palette(2)
    ff = state.features("s0")
    ids = tile_clusters(root / "slpd", ff).ids
    assert set(ids.tolist()) == {0, 1}
    img = _screen(c, "run2-clusters")
    colours = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in palette(2)])
    for i, (x, y) in enumerate(ff.coords):
        for dx, dy in ((2, 2), (32, 32), (61, 61)):  # every tile is wholly its region's prototype colour
            assert img[y + dy, x + dx, 3] == 255
            np.testing.assert_array_equal(img[y + dy, x + dx, :3], colours[ids[i]])
    lat = state.lattice("s0")
    x, y = next((x, y) for x in range(8, 1024, 64) for y in range(8, 768, 64) if lat.at(x, y) < 0)
    assert img[y, x, 3] == 0  # no tile: transparent
    # one id per region (2 x 2 tiles of 64 px = 128 px regions)
    regions = {}
    for i, (x, y) in enumerate(ff.coords):
        regions.setdefault((x // 128, y // 128), set()).add(int(ids[i]))
    assert all(len(v) == 1 for v in regions.values())


def test_cluster_layers_unavailable_with_a_reason(project):
    c, *_ = project
    layers = {l["id"]: l for l in c.get("/api/slides/s0").json()["layers"]}
    big, giga = layers["run3-clusters"], layers["run4-clusters"]
    assert not big["available"] and "1 regions; SLPD gives prototypes to slides with at least 4" in big["reason"]
    assert not giga["available"] and "no model.safetensors" in giga["reason"]
    assert c.get(f"/api/slides/s0/overlay/run3-clusters/{TOP}/0_0.png").status_code == 404


def test_tile_info_has_streaming_scores_and_cluster_ids(project):
    from gigaslide.ssl.slide.assign import tile_clusters

    c, state, root, tile, _ = project
    t = c.get(f"/api/slides/s0/tiles/{tile}").json()
    stream = {s["fold"]: s for s in t["scores"] if s.get("source") == "streaming"}
    assert stream["fold1"]["held_out"] and stream["fold1"]["attention"] == 5.0
    assert stream["fold1"]["attention_percentile"] == 1.0 and stream["fold1"]["slide_probs"] == pytest.approx([0.3, 0.7])
    assert stream["fold0"]["attention_percentile"] < 1.0 and not stream["fold0"]["held_out"]
    assert [s["run"] for s in t["scores"] if s.get("source") != "streaming"] == ["run", "run"]  # the MIL folds, as before
    cl = {x["run"]: x for x in t["clusters"]}
    want = int(tile_clusters(root / "slpd", state.features("s0")).ids[tile])
    assert cl["slpd"]["cluster"] == want and cl["slpd"]["k"] == 2 and cl["slpd"]["colour"] == palette(2)[want]
    assert "SLPD gives prototypes" in cl["slpd_big"]["error"] and "no model.safetensors" in cl["giga"]["error"]


def test_streaming_grid_checked_against_each_slide_of_its_id(tiny, tmp_path):
    """Two folders each holding a slide ``s0`` (keys s0 and s0@1) of other sizes: the grid made on the 1024 x 768 one
    is shown on it and refused on the other, whichever is opened first (the check was kept per slide id)."""
    from fastapi.testclient import TestClient

    from gigaslide.testing import make_slide

    tp = sys.modules["gigaslide_tiny_project"]
    big = make_slide(tmp_path / "big.tiff", (2048, 1536), mpp=1.0, seed=3, blobs=2)
    out2 = tmp_path / "out2"
    out2.mkdir()
    manifest = {"slides": {"s0": {"status": "failed", "path": str(big), "error": "not encoded"}}}
    (out2 / "manifest.json").write_text(json.dumps(manifest))
    stream = tp.streaming_run(tmp_path / "stream", {("s0", 0): (3, 3)}, {"s0": 0})
    for order in (["s0", "s0@1"], ["s0@1", "s0"]):
        state = ViewerState([tiny.out, out2], [tiny.run, stream])
        got = {k: next(l for l in state.layers(k) if l["id"] == "run1-attention") for k in order}
        assert got["s0"]["available"] and got["s0"]["reason"] is None, order
        assert not got["s0@1"]["available"], order
        assert "1024x768 px slide, this one is 2048x1536" in got["s0@1"]["reason"], order
        c = TestClient(build_app(state))
        assert c.get(f"/api/slides/s0@1/overlay/run1-attention/{TOP + 1}/0_0.png").status_code == 404
        assert c.get(f"/api/slides/s0/overlay/run1-attention/{TOP}/0_0.png").status_code == 200

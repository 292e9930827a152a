"""The viewer's HTTP API in process (FastAPI TestClient): tiles, overlays, tile info, search, refusals."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.viewer import Server, ViewerState, bind, build_app
from gigaslide.viewer.deepzoom import Geometry
from gigaslide.viewer.overlays import lut


@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    state = ViewerState([tiny.out], [tiny.run])
    return TestClient(build_app(state)), state


def _png(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_deepzoom_tiles_match_the_slide(client, tiny):
    c, _ = client
    info = c.get("/api/slides/s0").json()
    assert (info["width"], info["height"], info["mpp"]) == (1024, 768, 1.0)
    assert info["levels"] == 11 and info["tile_size0"] == 64 and info["n_tiles"] == len(store.load(tiny.out / "features" / "s0.h5"))
    top = info["levels"] - 1  # full resolution: tile (1, 1) starts at 254 - 1 px
    img = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/s0/dz/{top}/1_1.jpeg").content)).convert("RGB"))
    assert img.shape == (256, 256, 3)
    from gigaslide.slides import open_slide

    with open_slide(tiny.slides[0]) as s:
        ref = s.read_region((253, 253), (256, 256), 1.0)
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 6  # JPEG re-encoding only
    dzi = c.get("/api/slides/s0.dzi").text
    assert 'Width="1024"' in dzi and 'TileSize="254"' in dzi and 'Overlap="1"' in dzi


def test_attention_overlay_paints_each_tile_its_colour(client, tiny):
    c, state = client
    ff = store.load(tiny.out / "features" / "s0.h5")
    pct = state.layer_values("s0", "run0-attention", None)
    g = Geometry(1024, 768, 256, 0)
    top = g.level_count - 1
    table = lut("jet")
    for col, row in ((0, 0), (1, 1), (2, 1), (3, 2)):
        img = _png(c.get(f"/api/slides/s0/overlay/run0-attention/{top}/{col}_{row}.png?cmap=jet"))
        for i, (x, y) in enumerate(ff.coords):
            cx, cy = x + 32 - col * 256, y + 32 - row * 256
            if 0 <= cx < img.shape[1] and 0 <= cy < img.shape[0]:
                assert img[cy, cx, 3] == 255
                np.testing.assert_array_equal(img[cy, cx, :3], table[int(np.clip(pct[i] * 255, 0, 255))])
    # the threshold hides tiles below it; a pixel without a tile is transparent
    half = _png(c.get(f"/api/slides/s0/overlay/run0-attention/{top}/1_1.png?threshold=0.5"))
    shown = [half[y + 32 - 256, x + 32 - 256, 3] for (x, y), p in zip(ff.coords, pct) if 256 <= x < 480 and 256 <= y < 480]
    expect = [255 if p >= 0.5 else 0 for (x, y), p in zip(ff.coords, pct) if 256 <= x < 480 and 256 <= y < 480]
    assert shown == expect and 0 in shown and 255 in shown
    lat = state.lattice("s0")
    empty = [(x, y) for x in range(8, 1024, 64) for y in range(8, 768, 64) if lat.at(x, y) < 0]
    x, y = empty[0]
    img = _png(c.get(f"/api/slides/s0/overlay/run0-attention/{top}/{x // 256}_{y // 256}.png"))
    assert img[y % 256, x % 256, 3] == 0


def test_tile_info_scores_and_neighbours(client, tiny):
    c, state = client
    ff = store.load(tiny.out / "features" / "s1.h5")
    x, y = ff.coords[3]
    t = c.get(f"/api/slides/s1/tile_at?x={x + 10}&y={y + 50}").json()
    assert t["index"] == 3 and (t["x"], t["y"]) == (int(x), int(y))
    assert 0.25 <= t["tissue"] <= 1.0
    held = [s for s in t["scores"] if s["held_out"]]
    assert [s["fold"] for s in held] == ["fold1"]  # s1 is tested in fold 1 (labels + 2-fold CV of the tiny run)
    from gigaslide.mil.train import load_model, predict
    import torch

    model, _ = load_model(tiny.run / "fold1")
    probs, scores = predict(model, [torch.from_numpy(ff.features)])
    assert held[0]["attention"] == pytest.approx(float(scores[0][3]), rel=1e-5)
    assert held[0]["slide_probs"] == pytest.approx(list(probs[0]), rel=1e-5)
    alone, _ = predict(model, [torch.from_numpy(ff.features[3:4])])
    assert held[0]["tile_probs"] == pytest.approx(list(alone[0]), rel=1e-5)
    nb = c.get("/api/slides/s1/tiles/3/neighbours?k=5").json()["neighbours"]
    # exact cosine search, checked by brute force over every tile of every slide
    allf = {k: store.load(tiny.out / "features" / f"{k}.h5").features for k in state.entries}
    q = ff.features[3] / np.linalg.norm(ff.features[3])
    ranked = sorted(((float(f[i] @ q / np.linalg.norm(f[i])), k, i) for k, f in allf.items() for i in range(len(f))
                     if not (k == "s1" and i == 3)), reverse=True)[:5]
    assert [(n["slide"], n["index"]) for n in nb] == [(k, i) for _, k, i in ranked]
    assert [n["similarity"] for n in nb] == pytest.approx([s for s, _, _ in ranked], abs=1e-5)
    thumb = Image.open(io.BytesIO(c.get(f"/api/slides/{nb[0]['slide']}/tiles/{nb[0]['index']}.jpeg").content))
    assert thumb.size == (96, 96)


def test_refusals_outside_tiles_traversal_read_only(client):
    c, _ = client
    for url in ("/api/slides/s0/dz/11/0_0.jpeg", "/api/slides/s0/dz/10/5_0.jpeg", "/api/slides/s0/dz/3/0_-1.jpeg",
                "/api/slides/s0/overlay/grid/10/0_9.png", "/api/slides/s0/tiles/999", "/api/slides/nope",
                "/api/slides/s0/tile_at?x=-5&y=3", "/api/slides/s0/overlay/run7-attention/3/0_0.png",
                "/api/slides/s0/overlay/xyz0-attention/3/0_0.png", "/api/slides/s0/overlay/run0/3/0_0.png",
                "/static/../../export/runs.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                "/api/slides/..%2F..%2Fetc%2Fpasswd", "/api/slides/s0/overlay/grid/3/0_0.png?cmap=__import__"):
        r = c.get(url)
        assert r.status_code == 404, url
        assert "Traceback" not in r.text and "def " not in r.text
    assert c.get("/api/slides/s0/overlay/run0-attention/3/0_0.png?threshold=2").status_code == 422
    assert c.get("/static/openseadragon.min.js").status_code == 200
    assert c.get("/static/openseadragon-LICENSE.txt").status_code == 200
    for method in ("post", "put", "delete"):
        assert getattr(c, method)("/api/state").status_code == 405


def test_bad_input_is_listed_not_fatal(tiny, tiny_copy):
    from fastapi.testclient import TestClient

    t = tiny_copy
    t.slides[5].write_bytes(b"II*\x00" + b"\x00" * 100)  # a slide that no longer opens
    (t.out / "features" / "s4.h5").unlink()  # a slide whose features are gone
    rj = t.run / "run.json"  # the features folder the run was trained on is gone (the viewer reads OUT_DIR's)
    assert str(tiny.out) in rj.read_text()
    rj.write_text(rj.read_text().replace(str(tiny.out), str(t.root / "gone")))
    state = ViewerState([t.out], [t.run])
    c = TestClient(build_app(state))
    st = c.get("/api/state").json()
    assert {s["status"] for s in st["slides"]} == {"pending"} and st["pending"] == 6  # nothing opened for the list
    state.warm()  # the CLI runs it in the background: every slide is opened once, the rows fill in
    known = c.get(f"/api/slides?since={st['checked']}").json()
    assert known["pending"] == 0 and known["checked"] == 6
    rows = {s["key"]: s for s in known["slides"]}
    assert rows["s5"]["status"] == "broken" and "s5.tiff" in rows["s5"]["reason"] and "width" not in rows["s5"]
    assert rows["s0"]["width"] == 1024 and rows["s4"]["height"] == 768
    assert c.get("/api/slides?since=6").json() == {"slides": [], "checked": 6, "pending": 0}
    assert rows["s4"]["status"] == "no features" and rows["s0"]["status"] == "ok"
    assert any("features folder" in p and "gone" in p for p in st["problems"])
    r = c.get("/api/slides/s5/dz/0/0_0.jpeg")
    assert r.status_code == 404 and "s5.tiff" in r.json()["detail"]
    info = c.get("/api/slides/s4").json()  # the slide is still shown, its layers say why they are not
    layers = {l["id"]: l for l in info["layers"]}
    assert not layers["run0-attention"]["available"] and "s4.h5" in layers["run0-attention"]["reason"]
    assert layers["tissue"]["available"]
    assert c.get("/api/slides/s4/dz/10/0_0.jpeg").status_code == 200
    assert c.get("/api/slides/s0/overlay/run0-attention/10/0_0.png").status_code == 200  # from OUT_DIR features
    r = c.get("/api/slides/s5/tiles/0/neighbours")  # a slide that does not open is not searched: why, in one line
    assert r.status_code == 404 and "s5.tiff" in r.json()["detail"] and r.json()["detail"].startswith("not found: ")
    nb = c.get("/api/slides/s0/tiles/0/neighbours?k=50").json()["neighbours"]
    assert {n["slide"] for n in nb} <= {"s0", "s1", "s2", "s3"}  # not the broken slide, not the one without features


def test_empty_folder_says_what_is_missing(tmp_path):
    from fastapi.testclient import TestClient

    st = TestClient(build_app(ViewerState([tmp_path], []))).get("/api/state").json()
    assert st["slides"] == []
    assert any("no slides" in p and "gigaslide encode" in p for p in st["problems"])
    assert any("no runs given" in p and "--runs" in p for p in st["problems"])


def test_port_in_use_is_one_line(tiny, capsys):
    from gigaslide.cli.main import main as cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(GigaslideError, match=f"port {port} on 127.0.0.1 is already in use"):
            Server(build_app(ViewerState([tiny.out])), port=port)
        assert cli(["view", str(tiny.out), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "--port" in err[0]


def test_nuclei_outlines_drawn_where_the_geojson_says(tiny_copy):
    from fastapi.testclient import TestClient

    t = tiny_copy
    ring = [[300, 200], [340, 200], [340, 240], [300, 240], [300, 200]]
    gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                                                     "properties": {"objectType": "detection"}}]}
    (t.out / "nuclei").mkdir()
    (t.out / "nuclei" / "s0.geojson").write_text(json.dumps(gj))
    c = TestClient(build_app(ViewerState([t.out], [t.run])))
    img = _png(c.get("/api/slides/s0/overlay/nuclei/10/1_0.png"))  # level-0 px 256..511
    assert img[200, 300 - 256 + 20, 3] == 255 and img[220, 300 - 256, 3] == 255  # on the outline
    assert img[220, 320 - 256, 3] == 0 and img[100, 100, 3] == 0  # inside it / elsewhere


def test_non_openslide_image_goes_through_open_slide(tmp_path):
    from fastapi.testclient import TestClient

    yy, xx = np.mgrid[0:300, 0:500]
    arr = np.stack([xx * 255 // 499, yy * 255 // 299, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth: JPEG keeps it
    Image.fromarray(arr).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"slides": {"photo": {"status": "failed", "path": str(tmp_path / "photo.png"),
                                                                         "error": "no mpp"}}}))
    c = TestClient(build_app(ViewerState([out])))
    info = c.get("/api/slides/photo").json()
    assert info["backend"].startswith("gigaslide-") and (info["width"], info["height"]) == (500, 300)
    assert info["mpp"] is None and info["status"] == "no features"
    top = info["levels"] - 1
    tile = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/photo/dz/{top}/1_0.jpeg").content)).convert("RGB"))
    assert tile.shape == (255, 247, 3)  # x 253..499 (1 px overlap on the left), y 0..254 (1 px overlap below)
    assert np.abs(tile.astype(int) - arr[:255, 253:].astype(int)).mean() < 3
    assert np.abs(tile.astype(int) - arr[45:300, 0:247].astype(int)).mean() > 40  # not some other crop
    small = np.asarray(Image.open(io.BytesIO(c.get(f"/api/slides/photo/dz/{top - 1}/0_0.jpeg").content)))
    assert small.shape[:2] == (150, 250)


def test_view_command_prints_the_url_serves_and_stops_on_ctrl_c(tiny):
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "gigaslide.cli.main", "view", str(tiny.out), "--runs", str(tiny.run),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "GIGASLIDE_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        while line.startswith("note:"):
            line = proc.stdout.readline()
        assert line.startswith("http://127.0.0.1:"), line
        url = line.split()[0]
        assert "6 slides, 1 run(s)" in line
        with urllib.request.urlopen(url + "/api/state", timeout=30) as r:
            assert [s["slide_id"] for s in json.loads(r.read())["slides"]] == [f"s{i}" for i in range(6)]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "viewer stopped" in out and "Traceback" not in err


@pytest.mark.parametrize("port", [70000, 65536, -1])
def test_port_outside_0_65535_is_one_line(tiny, capsys, port):
    """70000 used to bind port 4464 (70000 - 65536) and print that URL; -1 blamed the host 127.0.0.1."""
    from gigaslide.cli.main import main as cli

    with pytest.raises(GigaslideError, match=f"port {port} is not a TCP port"):
        bind("127.0.0.1", port)
    assert cli(["view", str(tiny.out), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"port {port} is not a TCP port" in err[0] and "--port 8765" in err[0]
    assert "http://" not in captured.out


def test_scale_bar_mpp_is_the_one_the_tiles_were_cut_with(tiny, tmp_path):
    """A slide whose metadata says 1.0 µm/px, encoded with a corrected --slide-mpp 0.5: the tile size in level-0 px
    follows 0.5, and so must the mpp the page draws its scale bar with (it said 1.0, 'slide metadata')."""
    from fastapi.testclient import TestClient

    from gigaslide.encoders import build_encoder
    from gigaslide.features.extract import encode_slides
    from gigaslide.tiling import TilingParams

    res = encode_slides([tiny.slides[0]], tmp_path / "out", build_encoder("test_resnet", "random", seed=0),
                        TilingParams(mpp=1.0, tile_size=32, min_tissue=0.1), workers=0, precision="fp32", slide_mpp=0.5)
    assert res.done == ["s0"]
    info = TestClient(build_app(ViewerState([tmp_path / "out"]))).get("/api/slides/s0").json()
    assert info["tile_size0"] == 64  # 32 px at 1.0 µm/px of a 0.5 µm/px slide
    assert info["mpp"] == 0.5 and info["mpp_source"].startswith("tiling record")
    same = TestClient(build_app(ViewerState([tiny.out]))).get("/api/slides/s0").json()  # no override: the metadata
    assert same["mpp"] == 1.0 and same["mpp_source"] == "slide metadata"


def test_mil_layers_of_a_run_on_another_encoder_say_why(tiny_copy):
    """A run trained on another encoder's features: every overlay tile is refused (404), so the layer must not be
    offered as available (it was, and drew nothing), and its reason names both encoders."""
    from fastapi.testclient import TestClient

    t = tiny_copy
    for cfg in t.run.glob("fold*/config.json"):
        cfg.write_text(cfg.read_text().replace('"encoder": "test_resnet"', '"encoder": "uni"'))
    c = TestClient(build_app(ViewerState([t.out], [t.run])))
    layers = {l["id"]: l for l in c.get("/api/slides/s0").json()["layers"]}
    for lid in ("run0-attention", "run0-prob1"):
        assert not layers[lid]["available"], lid
        assert "encoder 'test_resnet', the model from 'uni'" in layers[lid]["reason"]
    assert layers["grid"]["available"]
    r = c.get("/api/slides/s0/overlay/run0-attention/10/0_0.png")
    assert r.status_code == 404 and "the model from 'uni'" in r.json()["detail"]


def test_tile_urls_carry_the_servers_version(client):
    """Tiles are cached for 10 minutes under URLs that name a slide key and a run index only: a viewer restarted on
    the same port with other runs (or folders) would get the first one's pictures. Each server has its own version,
    which the page adds to every tile URL (tests/viewer/test_viewer_js.py) and the routes accept."""
    c, state = client
    v = c.get("/api/state").json()["version"]
    assert v == state.version and v != ViewerState([state.out_dirs[0]]).version
    for url in ("/api/slides/s0/dz/10/0_0.jpeg", "/api/slides/s0/overlay/grid/10/0_0.png?cmap=jet&threshold=0",
                "/api/slides/s0/tiles/0.jpeg"):
        r = c.get(f"{url}{'&' if '?' in url else '?'}v={v}")
        assert r.status_code == 200 and "max-age" in r.headers["cache-control"], url


def test_geojson_with_altitudes_or_of_another_shape(tiny_copy):
    """GeoJSON positions may carry a third coordinate (altitude; shapely / geopandas write one for 3-D geometries):
    nuclei and tissue overlays answered 500 (ValueError) for them; a file of another shape (a feature that is not an
    object) answered 500 AttributeError, without naming the file."""
    from fastapi.testclient import TestClient

    t = tiny_copy
    ring = [[300, 200, 0], [340, 200, 0], [340, 240, 0], [300, 240, 0], [300, 200, 0]]
    (t.out / "nuclei").mkdir()
    poly = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}
    (t.out / "nuclei" / "s0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [poly]}))
    flat = _png(TestClient(build_app(ViewerState([t.out]))).get("/api/slides/s1/overlay/tissue/10/1_0.png"))
    tissue = json.loads((t.out / "tissue" / "s1.geojson").read_text())
    for f in tissue["features"]:
        f["geometry"]["coordinates"] = [[p + [7.0] for p in r] for r in f["geometry"]["coordinates"]]
    (t.out / "tissue" / "s1.geojson").write_text(json.dumps(tissue))
    (t.out / "nuclei" / "s2.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": ["cell"]}))
    c = TestClient(build_app(ViewerState([t.out])))
    img = _png(c.get("/api/slides/s0/overlay/nuclei/10/1_0.png"))  # level-0 px 256..511, as without altitudes
    assert img[200, 300 - 256 + 20, 3] == 255 and img[220, 300 - 256, 3] == 255
    assert img[220, 320 - 256, 3] == 0 and img[100, 100, 3] == 0
    assert flat[..., 3].any() and (_png(c.get("/api/slides/s1/overlay/tissue/10/1_0.png")) == flat).all()
    r = c.get("/api/slides/s2/overlay/nuclei/10/1_0.png")
    assert r.status_code == 404
    assert r.json()["detail"].startswith(f"{t.out / 'nuclei' / 's2.geojson'}: not GeoJSON polygons")
    assert "fix: re-run the job that wrote it" in r.json()["detail"]


def test_thumbnail_of_an_edge_tile_is_not_black_past_the_slide(tmp_path):
    """The last tile column / row may reach past the slide (tiling reads that part as glass). Its thumbnail, read with
    OpenSlide, turned the transparent outside into black; it is the slide's background (white), as the encoder saw."""
    from gigaslide.slides import open_slide
    from gigaslide.testing import make_slide
    from gigaslide.viewer.deepzoom import SlideTiles

    p = make_slide(tmp_path / "edge.tiff", (1000, 700), mpp=1.0, seed=1, blobs=2)
    t = SlideTiles(p)
    assert t.backend == "openslide-deepzoom"
    thumb = np.asarray(t.region(960, 640, 64, 64)).astype(int)  # 40 x 60 px inside, the rest outside
    with open_slide(p) as s:
        seen = s.read_region((960, 640), (64, 64), 1.0).astype(int)  # what tiling and the encoder read
    assert (thumb[:, 42:] == 255).all() and (thumb[62:, :] == 255).all()
    assert np.abs(thumb - seen).mean() < 2


def test_colour_scale_strip_is_the_colour_map_the_layers_are_drawn_with(client):
    """A score layer's colour scale (the page shows it under the layer) is the table overlay tiles are painted with:
    pixel i of the strip is the colour of value i / 255 (there was no colour scale: values could not be read)."""
    c, _ = client
    for name in ("jet", "viridis"):
        strip = _png(c.get(f"/api/colormaps/{name}.png"))
        assert strip.shape == (1, 256, 4) and (strip[..., 3] == 255).all()
        np.testing.assert_array_equal(strip[0, :, :3], lut(name))
    r = c.get("/api/colormaps/nope.png")
    assert r.status_code == 404 and "colour map" in r.json()["detail"]


def test_the_search_index_does_not_keep_every_slides_features_besides_its_matrix(tiny, monkeypatch):
    """The first search read every slide's features through the viewer's per-slide cache and kept them there besides
    the index matrix (twice the features of the whole project in memory). Now only the slides shown are held; the
    neighbours are those of an index of every slide's full arrays, and a damaged feature file is left out."""
    from fastapi.testclient import TestClient

    import gigaslide.viewer.state as vs
    from gigaslide.viewer.neighbours import FeatureIndex

    full: list[str] = []
    real = vs.store.load

    def load(path, *, arrays=True):  # noqa: ANN001, ANN202
        if arrays:
            full.append(str(path))
        return real(path, arrays=arrays)

    monkeypatch.setattr(vs.store, "load", load)
    state = ViewerState([tiny.out], [])
    c = TestClient(build_app(state))
    res = c.get("/api/slides/s0/tiles/3/neighbours?k=4").json()
    shown = {"s0"} | {n["slide"] for n in res["neighbours"]}
    assert len(set(full)) <= len(shown) < len(state.entries)  # (s0 and the slides of its neighbours)
    ref = FeatureIndex({k: real(state.entries[k].features).features for k in state.entries})
    assert [(n["slide"], n["index"]) for n in res["neighbours"]] == [(n.slide, n.index) for n in ref.query("s0", 3, 4)]
    assert res["searched"] == len(ref)

    class Damaged:
        shape = (5, ref.matrix.shape[1])

        def __array__(self, dtype=None, copy=None):  # noqa: ANN001, ANN204
            raise GigaslideError("cannot read features (damaged)")

    idx = FeatureIndex({"s0": real(state.entries["s0"].features).features, "bad": Damaged()})
    assert idx.unreadable == ["bad"] and len(idx) == len(real(state.entries["s0"].features))
    assert all(n.slide == "s0" for n in idx.query("s0", 0, 50))


def test_page_and_slide_list_open_no_slide_file(tiny_copy, monkeypatch):
    """With thousands of slides the viewer opened every slide (and read every features / patches file's attributes)
    before its first page: seconds, growing with the project. The page and the slide list open nothing; a slide is
    opened when it is first asked for, and its row then says its status and size."""
    import h5py
    from fastapi.testclient import TestClient

    import gigaslide.viewer.state as state_mod

    opened: list[str] = []
    real_tiles, real_file = state_mod.SlideTiles, h5py.File

    class CountedTiles(real_tiles):
        def __init__(self, path, *a, **k):  # noqa: ANN001, ANN002, ANN003
            opened.append(Path(path).stem)
            super().__init__(path, *a, **k)

    class CountedFile(real_file):
        def __init__(self, name, *a, **k):  # noqa: ANN001, ANN002, ANN003
            opened.append(Path(str(name)).name)
            super().__init__(name, *a, **k)

    monkeypatch.setattr(state_mod, "SlideTiles", CountedTiles)
    monkeypatch.setattr(h5py, "File", CountedFile)
    t = tiny_copy
    state = ViewerState([t.out], [t.run])
    c = TestClient(build_app(state))
    assert c.get("/").status_code == 200
    st = c.get("/api/state").json()
    assert opened == []
    assert [s["key"] for s in st["slides"]] == [f"s{i}" for i in range(6)]
    assert {s["status"] for s in st["slides"]} == {"pending"} and st["pending"] == 6
    info = c.get("/api/slides/s2").json()
    assert info["status"] == "ok" and info["width"] == 1024 and info["mpp"] == 1.0
    assert sorted(set(opened)) == ["s2", "s2.h5"]  # that slide, its features / patches files, no other
    rows = {s["key"]: s for s in c.get("/api/state").json()["slides"]}
    assert rows["s2"]["status"] == "ok" and rows["s2"]["width"] == 1024 and rows["s2"]["levels"] == 11
    assert rows["s3"]["status"] == "pending" and "width" not in rows["s3"]
    assert c.get("/api/slides?since=0").json()["slides"] == [rows["s2"]]


def test_entries_completed_on_first_use_are_the_catalogues(tiny_copy, tmp_path):
    """The viewer lists slides without reading their files; an entry completed when first used is the one
    gigaslide.export.catalog.scan makes (slide path, level-0 mpp, feature attributes), keys of clashing ids too."""
    import shutil

    from gigaslide.export.catalog import scan
    from gigaslide.viewer.catalog import Catalog

    t = tiny_copy
    (t.out / "features" / "s4.h5").unlink()
    other = tmp_path / "other"
    shutil.copytree(t.out, other)
    man = json.loads((other / "manifest.json").read_text())
    del man["slides"]["s1"]  # a slide only its features / patches files name: its path is the one they record
    (other / "manifest.json").write_text(json.dumps(man))
    (other / "nuclei").mkdir()
    (other / "nuclei" / "s0.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    want, problems = scan([t.out, other])
    cat = Catalog([t.out, other])
    assert list(cat.entries) == list(want) and "s0@1" in want and cat.problems == problems
    assert cat.entries["s1@1"].slide_path is None  # not read yet
    for key in want:
        assert cat.complete(key) == want[key], key
    assert cat.entries["s1@1"].slide_path == want["s1@1"].slide_path != None  # noqa: E711


def test_the_viewer_catalogue_uses_the_exports_public_listing_and_completion():
    """The viewer lists and completes slides with export.catalog's public list_slides / complete_entry (it imported
    the private _read_attrs / _slide_path and repeated the per-slide reading: two copies to keep equal)."""
    import ast
    import inspect

    import gigaslide.viewer.catalog as vc

    imported = {a.name for node in ast.walk(ast.parse(inspect.getsource(vc))) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("gigaslide.") for a in node.names}
    assert {"list_slides", "complete_entry"} <= imported and not any(n.startswith("_") for n in imported), imported


def test_layers_of_a_slide_with_a_damaged_feature_file_say_why(tiny_copy):
    """A truncated features file: the tile grid and the run's layers were offered (available), and every one of their
    tiles then answered 404; they are listed unavailable with the file's one-line error, the tissue layer still is."""
    from fastapi.testclient import TestClient

    f = tiny_copy.out / "features" / "s1.h5"
    f.write_bytes(f.read_bytes()[:3000])
    c = TestClient(build_app(ViewerState([tiny_copy.out], [tiny_copy.run])))
    info = c.get("/api/slides/s1").json()
    layers = {layer["id"]: layer for layer in info["layers"]}
    for lid in ("grid", "run0-attention", "run0-prob1"):
        assert not layers[lid]["available"] and layers[lid]["reason"].startswith(f"{f}: "), layers[lid]
    assert layers["tissue"]["available"] and info["n_tiles"] == 0
    assert c.get("/api/slides/s1/overlay/tissue/8/0_0.png").status_code == 200


def test_a_run_trained_on_class_names_shows_them(tiny_copy):
    """A MIL run on a labels.csv of class names: its probability layer and the slide list's prediction name the
    class ('tile P(tumor)', label 'tumor'), not its number."""
    from fastapi.testclient import TestClient

    t = tiny_copy
    for cfg in t.run.glob("fold*/config.json"):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "class_names": ["normal", "tumor"]}))
    state = ViewerState([t.out], [t.run])
    c = TestClient(build_app(state))
    layers = {l["id"]: l for l in c.get("/api/slides/s0").json()["layers"]}
    assert layers["run0-prob1"]["name"] == "run: tile P(tumor)"
    row = state.slide_row("s0")["predictions"]["run"]
    assert row["class_name"] == ("normal", "tumor")[row["label"]]

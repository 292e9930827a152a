"""Round 7 (lens M, hostile inputs): what a web page of another site can make the viewer answer."""

from __future__ import annotations

import asyncio
import http.client
import json

import numpy as np
import pytest

from gigaslide.viewer import Server, ViewerState, build_app


def _get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("r7host") / "private-project-out"
    out.mkdir()
    server = Server(build_app(ViewerState([out]), allow_hosts=["hub.example.org"]), host="127.0.0.1", port=0).start()
    yield server, out
    server.stop()


def test_a_page_of_another_site_reached_through_dns_rebinding_is_refused(served):
    """A web page the user visits can point its own domain at 127.0.0.1 (DNS rebinding); the browser then reads the
    viewer as that site's, Host header and all. The viewer answered such a request like its own page: the slide list,
    the folders' absolute paths, every slide tile -- to any site open in the user's browser."""
    server, out = served
    for host in (f"evil.example:{server.port}", "evil.example", f"127.0.0.1.evil.example:{server.port}"):
        status, body = _get(server.port, "/api/state", host)
        assert status == 403, (host, status, body[:200])
        assert str(out).encode() not in body and b"private-project-out" not in body
        assert f"open http://127.0.0.1:{server.port}/".encode() in body  # the one line says where the viewer is
        assert b"start the viewer with --allow-host " in body
        assert _get(server.port, "/static/viewer.js", host)[0] == 403
        assert _get(server.port, "/", host)[0] == 403


def test_the_viewer_still_answers_its_own_addresses(served):
    """Loopback names, and the names given with ``--allow-host`` (a proxy that passes the browser's Host on:
    JupyterHub's jupyter-server-proxy)."""
    server, out = served
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}",
                 f"viewer.localhost:{server.port}", "127.0.0.2", f"0.0.0.0:{server.port}", "10.1.2.3",
                 "hub.example.org", "HUB.example.org:443"):
        status, body = _get(server.port, "/api/state", host)
        assert status == 200, (host, status, body[:200])
        assert json.loads(body)["out_dirs"] == [str(out)]


def _call(server_addr: tuple[str, int], host: str, allow: tuple[str, ...] = ()) -> int:
    """The status the middleware answers for a request that came in on ``server_addr`` with ``Host: host``."""
    from gigaslide.viewer.app import _LoopbackHost

    seen: list[int] = []

    async def app(scope, receive, send):  # noqa: ANN001, ARG001
        seen.append(200)

    async def receive():  # noqa: ANN202
        return {"type": "http.request", "body": b""}

    async def send(msg):  # noqa: ANN001
        if msg["type"] == "http.response.start":
            seen.append(msg["status"])

    scope = {"type": "http", "method": "GET", "path": "/api/state", "raw_path": b"/api/state", "query_string": b"",
             "headers": [(b"host", host.encode())], "server": server_addr, "client": ("10.0.0.9", 5000),
             "scheme": "http", "root_path": "", "http_version": "1.1"}
    asyncio.run(_LoopbackHost(app, allow)(scope, receive, send))
    return seen[0]


def test_a_viewer_shared_on_the_network_takes_any_name_of_the_machine():
    """``--host 0.0.0.0`` shares the viewer: a colleague's browser comes in on the machine's address with its name;
    a local browser's loopback connection is still checked (an IPv4 loopback reaching a dual-stack socket too)."""
    assert _call(("192.168.1.5", 8765), "gpu-node-3.lab:8765") == 200
    assert _call(("127.0.0.1", 8765), "gpu-node-3.lab:8765") == 403
    assert _call(("::ffff:127.0.0.1", 8765), "evil.example:8765") == 403
    assert _call(("::1", 8765), "[::1]:8765") == 200
    assert _call(("127.0.0.1", 8765), "gpu-node-3.lab:8765", allow=("*",)) == 200


# -- a slide with very many nuclei (the nuclei overlay read line by line, bucketed by centre) -----------------------

def _nuclei_file(path, n_side: int, seed: int = 0, step: float = 40.0, pieces: int = 7):  # noqa: ANN001, ANN202
    """``n_side`` x ``n_side`` nuclei written as the nuclei stage writes them (one feature per line), some in pieces
    (a MultiPolygon: both pieces drawn) and with holes (not drawn); returns every outer ring in file order."""
    from gigaslide.nuclei.export import GeoJSONWriter, Nucleus

    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, 9)[:-1]
    outer = []
    with open(path, "w") as f:
        w = GeoJSONWriter(f, "s0")
        k = 0
        for j in range(n_side):
            for i in range(n_side):
                k += 1
                cx, cy = step / 2 + step * i + rng.uniform(-6, 6), step / 2 + step * j + rng.uniform(-6, 6)
                r = rng.uniform(4, 12, 8)
                ring = np.round(np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1), 2)
                ring = np.vstack([ring, ring[:1]])
                if pieces and k % pieces == 0:  # in two pieces, the first with a hole
                    hole = np.round([[cx - 1, cy - 1], [cx + 1, cy - 1], [cx + 1, cy + 1], [cx - 1, cy - 1]], 2)
                    piece = ring + (15.0, 0.0)
                    poly = [[ring, hole], [piece]]
                    outer += [ring, piece]
                else:
                    poly = ring
                    outer.append(ring)
                w.add(Nucleus(k, poly, (cx, cy), 40.0, (cx - 12, cy - 12, cx + 12, cy + 12), 1, "tumor", 0.9))
        w.close()
    return outer


def _reference(rings, box, scale, limit: int = 20000) -> np.ndarray:  # noqa: ANN001
    """The nuclei overlay as drawn before the index: every nucleus tested, in file order (dots: vertex means)."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = x0 * scale, y0 * scale, x1 * scale, y1 * scale
    if scale > 4:
        rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
        closed = [len(r) > 3 and bool((r[0] == r[-1]).all()) for r in rings]  # the closing vertex counted once
        c = np.array([(np.add.reduceat(r, [0])[0] - r[-1] * z) / (len(r) - z) for r, z in zip(rings, closed)])
        px = np.floor((c - (bx0, by0)) / scale).astype(np.int64)
        ok = (px[:, 0] >= 0) & (px[:, 0] < x1 - x0) & (px[:, 1] >= 0) & (px[:, 1] < y1 - y0)
        rgba[px[ok, 1], px[ok, 0]] = (255, 255, 0, 255)
        return rgba
    img = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    hit = [r for r in rings if r[:, 0].max() >= bx0 and r[:, 0].min() <= bx1 and r[:, 1].max() >= by0
           and r[:, 1].min() <= by1]
    for r in hit[:limit]:
        pts = np.floor((r - (bx0, by0)) / scale)
        draw.line([tuple(p) for p in pts] + [tuple(pts[0])], fill=(255, 255, 0, 255), width=1)
    return np.asarray(img)


def test_nuclei_overlay_tiles_are_those_of_every_nucleus_tested(tmp_path):
    """The overlay looks only at the nuclei of the buckets near a tile: each tile, zoomed in and out, at tile seams
    and past the nuclei, is the one drawn by testing every nucleus; the file read line by line holds the same rings
    as the same collection written on one line (read whole)."""
    import json as _json

    from gigaslide.viewer.deepzoom import Geometry
    from gigaslide.viewer.overlays import NucleiOutlines

    rings = _nuclei_file(tmp_path / "lines.geojson", 40)  # 1600 nuclei over 1600 x 1600 level-0 px
    nuc = NucleiOutlines(tmp_path / "lines.geojson")
    assert len(nuc) == len(rings) == 1600 + 1600 // 7
    for i in (0, 5, 6, 7, len(rings) - 1):
        np.testing.assert_array_equal(nuc.ring(i), rings[i])
    whole = tmp_path / "whole.geojson"
    whole.write_text(_json.dumps(_json.loads((tmp_path / "lines.geojson").read_text())))  # one line: read whole
    other = NucleiOutlines(whole)
    np.testing.assert_array_equal(other.vertices, nuc.vertices)
    np.testing.assert_array_equal(other.starts, nuc.starts)
    g = Geometry(2100, 1900, 256, 0)
    top = g.level_count - 1
    drawn = 0
    for level in (top, top - 1, top - 2, top - 3, top - 5):
        lw, lh = g.level_size(level)
        for col in range(-(-lw // 256)):
            for row in range(-(-lh // 256)):
                box, scale = g.tile_box(level, col, row), g.scale(level)
                got = nuc.render(box, scale)
                np.testing.assert_array_equal(got, _reference(rings, box, scale), err_msg=f"{level}/{col}_{row}")
                drawn += int((got[..., 3] > 0).sum())
    assert drawn > 50_000


def test_nuclei_files_of_other_layouts_or_damaged_are_read_whole(tmp_path):
    """Only-Polygon files (read as numbers, no JSON tree), an altitude on a vertex, a cut-off file: the same rings as
    the file read whole, or its one-line error."""
    import json as _json

    from gigaslide.errors import GigaslideError
    from gigaslide.viewer.overlays import NucleiOutlines

    def whole(path):  # noqa: ANN001, ANN202
        out = tmp_path / f"whole-{path.name}"
        out.write_text(_json.dumps(_json.loads(path.read_text())))
        return NucleiOutlines(out)

    rings = _nuclei_file(tmp_path / "polygons.geojson", 70, pieces=0)  # 4900 one-ring nuclei: two chunks
    nuc = NucleiOutlines(tmp_path / "polygons.geojson")
    np.testing.assert_array_equal(nuc.vertices, np.concatenate(rings))
    np.testing.assert_array_equal(nuc.vertices, whole(tmp_path / "polygons.geojson").vertices)
    lines = (tmp_path / "polygons.geojson").read_text().splitlines()
    i, j = lines[5].index('"coordinates":'), lines[5].index("]]]")
    z3 = '"coordinates":[[[1.5,2.5,9],[5.5,2.5,9],[5.5,6.5,9],[1.5,2.5,9'  # every vertex with an altitude
    lines[5] = lines[5][:i] + z3 + lines[5][j:]
    (tmp_path / "z.geojson").write_text("\n".join(lines))
    z = NucleiOutlines(tmp_path / "z.geojson")
    np.testing.assert_array_equal(z.vertices, whole(tmp_path / "z.geojson").vertices)
    np.testing.assert_array_equal(z.ring(4), [[1.5, 2.5], [5.5, 2.5], [5.5, 6.5], [1.5, 2.5]])
    assert len(z) == len(nuc) and np.array_equal(z.ring(5), nuc.ring(5))
    plain = (tmp_path / "polygons.geojson").read_text().splitlines()
    (tmp_path / "two.geojson").write_text("\n".join(plain[:7] + [plain[7] + plain[8]] + plain[9:]))  # two on a line
    np.testing.assert_array_equal(NucleiOutlines(tmp_path / "two.geojson").vertices, nuc.vertices)
    (tmp_path / "cut.geojson").write_text("\n".join(lines[:100]))
    with pytest.raises(GigaslideError, match="cut.geojson: unreadable GeoJSON"):
        NucleiOutlines(tmp_path / "cut.geojson")


def test_nuclei_file_is_read_without_its_whole_json_tree(tmp_path):
    """The nuclei stage's GeoJSON of a slide holds 10^5-10^6 nuclei (about 500 bytes each). Read as one JSON tree
    (and then a NumPy array per ring), 10^6 nuclei took about 4.5 GB and minutes before the first tile was drawn;
    read line by line into one vertex array, the memory is the rings' vertices plus a few thousand lines."""
    import tracemalloc

    from gigaslide.viewer.overlays import NucleiOutlines

    path = tmp_path / "n.geojson"
    _nuclei_file(path, 120)  # 14,400 nuclei (+ 2,057 second pieces), 9 vertices each: 2.4 MB of vertices
    size = path.stat().st_size
    tracemalloc.start()
    try:
        nuc = NucleiOutlines(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(nuc) == 14_400 + 14_400 // 7
    # measured: read whole, 54 MB (7.7 times the file's 7.0 MB); line by line 13.5 MB (the vertices, their copy when
    # the chunks are joined, and 4096 lines' rings at a time)
    assert peak < 3 * size, (peak, size)

"""The viewer in a real headless Chromium (Debian's ``chromium``, driven by Playwright), as a person uses it.

Load the page, wait for the deep-zoom tiles, toggle every overlay, change opacity and threshold with
the keyboard on the sliders, click a tile and follow a neighbour; assertions are on screenshot pixels
(the attention colours appear where the model's attention says, blend with the opacity, vanish below the
threshold and when toggled off) and on an empty browser console.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)"),
    pytest.mark.timeout(120),
]
OSD_LEFT = 361  # the viewer starts right of the 360 px side panel
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip, test extra) is not installed")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _serve(out_dirs, runs, warm: bool = True):  # noqa: ANN001, ANN202
    """A viewer as ``gigaslide view`` runs it: slides opened in the background (``warm``) after the server starts."""
    import threading

    from gigaslide.viewer import Server, ViewerState, build_app

    state = ViewerState(out_dirs, runs)
    server = Server(build_app(state), port=0).start()
    if warm:
        threading.Thread(target=state.warm, daemon=True).start()
    return server, state


def _page(browser, url):  # noqa: ANN001, ANN202
    page = browser.new_page(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.goto(url)
    return page, console


def _loaded(page) -> None:  # noqa: ANN001
    page.wait_for_function("window.gigaslide && window.gigaslide.allLoaded()", timeout=60000)
    page.evaluate("() => new Promise(r => setTimeout(() => requestAnimationFrame(() => requestAnimationFrame(r)), 50))")


def _shot(page, path: Path) -> np.ndarray:  # noqa: ANN001
    png = page.screenshot(path=str(path))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)


def _screen(page, x: float, y: float) -> tuple[int, int]:  # noqa: ANN001
    sx, sy = page.evaluate("""([x, y]) => {
        const p = gigaslide.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const r = document.querySelector('#osd').getBoundingClientRect();
        return [r.left + p.x, r.top + p.y]; }""", [float(x), float(y)])
    return int(round(sx)), int(round(sy))


def _slider(page, layer: str, cls: str, key: str, n: int) -> None:  # noqa: ANN001
    s = page.locator(f'[data-layer="{layer}"] input.{cls}')
    s.focus()
    for _ in range(n):
        s.press(key)


def test_viewer_in_chromium_overlays_click_neighbours(browser, tiny, tmp_path_factory):
    import sys

    from gigaslide.viewer.overlays import lut

    t = sys.modules["gigaslide_tiny_project"].copy(tiny, tmp_path_factory.mktemp("browser") / "p")
    t.slides[5].write_bytes(b"II*\x00" + b"\x00" * 100)  # a slide that no longer opens: listed as broken
    shots = Path(os.environ.get("GIGASLIDE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))  # to look at them
    shots.mkdir(parents=True, exist_ok=True)
    stream = sys.modules["gigaslide_tiny_project"].streaming_run(t.root / "stream", {("s0", 1): (4, 3)}, {"s0": 1})
    server, state = _serve([t.out], [t.run, stream])
    try:
        ff = state.features("s0")
        pct = state.layer_values("s0", "run0-attention", None)
        hi, lo = int(np.argmax(pct)), int(np.argmin(pct))
        size0 = state.lattice("s0").size0
        ring = [[float(ff.coords[hi, 0]) + d[0], float(ff.coords[hi, 1]) + d[1]] for d in ((8, 8), (56, 8), (56, 56), (8, 56), (8, 8))]
        (t.out / "nuclei").mkdir()
        (t.out / "nuclei" / "s0.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"objectType": "detection"}}]}))
        state.entries["s0"].nuclei_geojson = t.out / "nuclei" / "s0.geojson"  # written after the scan

        page, console = _page(browser, server.url)
        _loaded(page)
        # opened in the background after the page came: its row fills in
        page.wait_for_function("document.querySelector('#slides tr[data-slide=\"s5\"] td.st').textContent === 'broken'",
                               timeout=20000)
        assert "s5.tiff" in page.locator('#slides tr[data-slide="s5"]').get_attribute("title")
        assert page.locator('#slides tr[data-slide="s0"]').get_attribute("class").endswith("current")
        assert page.locator("#scalebar-label").inner_text().endswith("µm")
        base = _shot(page, shots / "0-slide.png")
        (hx, hy), (lx, ly) = (_screen(page, *(ff.coords[i] + size0 / 2)) for i in (hi, lo))
        # the slide itself is drawn (tissue, not the empty background) under both tiles
        assert base[hy, hx].sum() < 3 * 235 and base[ly, lx].sum() < 3 * 235
        table = lut("jet")

        page.locator('[data-layer="run0-attention"] input.toggle').check()
        _slider(page, "run0-attention", "opacity", "ArrowRight", 10)  # 0.5 -> 1.0
        _loaded(page)
        full = _shot(page, shots / "1-attention-opaque.png")
        assert np.abs(full[hy, hx] - table[255]).max() <= 3  # highest attention: the top of the colour map
        assert np.abs(full[ly, lx] - table[0]).max() <= 3

        _slider(page, "run0-attention", "opacity", "ArrowLeft", 10)  # back to 0.5: blended with the slide
        _loaded(page)
        half = _shot(page, shots / "2-attention-half.png")
        assert np.abs(half[hy, hx] - (base[hy, hx] + table[255]) / 2).max() <= 4

        _slider(page, "run0-attention", "threshold", "ArrowRight", 10)  # threshold 0.5: low tiles vanish
        _loaded(page)
        thr = _shot(page, shots / "3-attention-threshold.png")
        assert page.locator('[data-layer="run0-attention"] .thv').inner_text() == "0.50"
        assert np.abs(thr[ly, lx] - base[ly, lx]).max() <= 3
        assert np.abs(thr[hy, hx] - half[hy, hx]).max() <= 3
        shown = [int(np.abs(thr[sy, sx] - base[sy, sx]).max() > 12) for sx, sy in
                 (_screen(page, *(c + size0 / 2)) for c in ff.coords)]
        assert shown == [int(p >= 0.5) for p in pct]  # every tile: coloured exactly when at or above the threshold

        page.locator('[data-layer="run0-attention"] input.toggle').uncheck()
        _loaded(page)
        off = _shot(page, shots / "4-attention-off.png")
        assert np.abs(off[hy, hx] - base[hy, hx]).max() <= 3

        # the per-tile probability of another fold's model, in another colour map
        prob = state.layer_values("s0", "run0-prob1", "fold1")
        page.locator('[data-layer="run0-prob1"] input.toggle').check()
        page.locator('[data-layer="run0-prob1"] select.cmap').select_option("magma")
        page.locator('[data-layer="run0-prob1"] select.fold').select_option("fold1")
        _loaded(page)
        pr = _shot(page, shots / "4b-probability-fold1-magma.png")
        magma = lut("magma")
        for i in (hi, lo):
            sx, sy = _screen(page, *(ff.coords[i] + size0 / 2))
            assert np.abs(pr[sy, sx] - (base[sy, sx] + magma[int(np.clip(prob[i] * 255, 0, 255))]) / 2).max() <= 4
        page.locator('[data-layer="run0-prob1"] input.toggle').uncheck()

        # a StreamingCLAM run's saved attention grid: its highest position (column 4, row 3 of 100 px boxes) is the
        # top of the colour map, and nothing is drawn outside the grid
        page.locator('[data-layer="run1-attention"] input.toggle').check()
        _slider(page, "run1-attention", "opacity", "ArrowRight", 10)
        _loaded(page)
        sc = _shot(page, shots / "4c-streaming-attention.png")
        px, py = _screen(page, 40 + 4 * 100 + 50, 24 + 3 * 100 + 50)
        assert np.abs(sc[py, px] - table[255]).max() <= 3
        qx, qy = _screen(page, 40 + 5 * 100 + 50, 24 + 3 * 100 + 50)  # its neighbour: lower attention, another colour
        assert np.abs(sc[qy, qx] - table[255]).max() > 30
        gx, gy = _screen(page, 10, 10)
        assert np.abs(sc[gy, gx] - base[gy, gx]).max() <= 3
        page.locator('[data-layer="run1-attention"] input.toggle').uncheck()

        page.locator('[data-layer="tissue"] input.toggle').check()
        _loaded(page)
        tis = _shot(page, shots / "5-tissue.png")
        assert np.abs(tis[hy, hx] - (base[hy, hx] + np.array([0, 170, 0])) / 2).max() <= 4
        gx, gy = _screen(page, 4, 4)  # the slide's corner is glass: no tissue there
        assert np.abs(tis[gy, gx] - base[gy, gx]).max() <= 3
        page.locator('[data-layer="tissue"] input.toggle').uncheck()

        page.locator('[data-layer="grid"] input.toggle').check()
        _loaded(page)
        grid = _shot(page, shots / "6-grid.png")
        d = grid - base
        blue = (d[..., 2] - d[..., 0] > 20) & (np.abs(d).max(-1) > 12)
        x0, y0 = _screen(page, *ff.coords[hi])
        assert blue[y0 - 1:y0 + 2, x0 + 5:x0 + 40].any(axis=0).mean() > 0.9  # the tile's top edge is drawn
        assert not blue[hy - 5:hy + 5, hx - 5:hx + 5].any()  # its centre is not
        page.locator('[data-layer="grid"] input.toggle').uncheck()

        page.locator('[data-layer="nuclei"] input.toggle').check()
        _loaded(page)
        nuc = _shot(page, shots / "7-nuclei.png")
        d = nuc - base
        yellow = (d[..., 2] < -20) & (np.abs(d).max(-1) > 12)
        (ax, ay), (bx, by) = _screen(page, *ring[0]), _screen(page, *ring[2])
        assert yellow[ay - 1:by + 2, ax - 1:bx + 2].sum() > 2 * (bx - ax)  # the outline
        yellow[ay - 2:by + 3, ax - 2:bx + 3] = False
        yellow[:, :OSD_LEFT] = False  # the side panel (its checkbox changed)
        assert not yellow.any(), np.argwhere(yellow)[:10]  # nothing anywhere else on the slide
        page.locator('[data-layer="nuclei"] input.toggle').uncheck()
        _loaded(page)

        page.mouse.click(hx, hy)  # click a tile: its info and its most similar tiles
        page.wait_for_selector(".neighbour img", timeout=20000)
        info = page.locator("#tile table").inner_text()
        assert f"#{hi}" in info and f"{ff.coords[hi, 0]}, {ff.coords[hi, 1]}" in info and "held out" in info
        want = [(n.slide, n.index) for n in state.index("s0").query("s0", hi, 8)]
        got = page.eval_on_selector_all(".neighbour", "els => els.map(e => [e.dataset.slide, +e.dataset.index])")
        assert [tuple(g) for g in got] == want and "s5" not in {s for s, _ in want}
        page.wait_for_function("[...document.querySelectorAll('.neighbour img')].every(i => i.complete && i.naturalWidth === 96)")
        _shot(page, shots / "8-tile-clicked.png")
        far = next((n for n in want if n[0] != "s0"), want[0])
        page.locator(f'.neighbour[data-slide="{far[0]}"][data-index="{far[1]}"]').click()
        page.wait_for_function(f"gigaslide.selected && gigaslide.selected.slide === '{far[0]}' && gigaslide.selected.index === {far[1]}")
        _loaded(page)
        _shot(page, shots / "9-jumped.png")
        assert page.locator(".selected-tile").count() == 1
        assert page.locator(f'#slides tr[data-slide="{far[0]}"]').get_attribute("class").endswith("current")
        assert console == [], console
        page.close()
    finally:
        server.stop()


def test_a_first_slide_that_does_not_open_is_skipped_and_listed_broken(browser, tiny_copy):
    """The slide list comes before any slide is opened: the first slide, not known to be broken, fails to open; the
    page says so in its row and opens the next one."""
    tiny_copy.slides[0].write_bytes(b"II*\x00" + b"\x00" * 100)
    server, _ = _serve([tiny_copy.out], [tiny_copy.run], warm=False)
    try:
        page, console = _page(browser, server.url)
        _loaded(page)
        assert page.evaluate("gigaslide.slide.key") == "s1"
        assert page.locator('#slides tr[data-slide="s1"]').get_attribute("class") == "slide current"
        assert page.locator('#slides tr[data-slide="s0"] td.st').inner_text() == "broken"
        assert "s0.tiff" in page.locator('#slides tr[data-slide="s0"]').get_attribute("title")
        assert page.locator('#slides tr[data-slide="s2"] td.st').inner_text() == "pending"
        page.locator('#slides tr[data-slide="s2"]').click()  # opened by the user: its row says so
        page.wait_for_function("document.querySelector('#slides tr[data-slide=\"s2\"] td.st').textContent === 'ok'")
        assert page.locator('#slides tr[data-slide="s2"]').get_attribute("class") == "slide current"
        # s0's details, refused
        assert console == ["error: Failed to load resource: the server responded with a status of 404 (Not Found)"]
        page.close()
    finally:
        server.stop()


def test_slide_list_filter(browser, tiny):
    """Many slides: typing in the filter shows the rows whose id, status or run label has every word typed; Enter opens
    the first one shown. There was no way to find a slide but scrolling the whole list."""
    server, _ = _serve([tiny.out], [tiny.run])
    try:
        page, console = _page(browser, server.url)
        _loaded(page)
        shown = ("() => [...document.querySelectorAll('#slides tr.slide')].filter(r => !r.hidden)"
                 ".map(r => r.dataset.slide)")
        assert page.evaluate(shown) == [f"s{i}" for i in range(6)]
        assert page.locator("#slide-count").inner_text() == "(6)"
        page.locator("#filter").fill("S3")
        assert page.evaluate(shown) == ["s3"] and page.locator("#slide-count").inner_text() == "(1 of 6)"
        page.locator("#filter").press("Enter")
        page.wait_for_function("gigaslide.slide && gigaslide.slide.key === 's3'")
        _loaded(page)
        page.locator("#filter").fill("label 1")  # labels.csv: s1, s3, s5 are class 1
        assert page.evaluate(shown) == ["s1", "s3", "s5"]
        page.locator("#filter").fill("")
        assert page.evaluate(shown) == [f"s{i}" for i in range(6)]
        assert page.locator("#slide-count").inner_text() == "(6)"
        assert console == [], console
        page.close()
    finally:
        server.stop()


def test_a_layer_whose_tiles_are_refused_says_why(browser, tiny_copy):
    """A damaged tissue GeoJSON: the layer is offered (the file is there), its every tile is refused with a one-line
    reason; the page showed an empty layer and said nothing. Now the reason is under the layer and in the status."""
    (tiny_copy.out / "tissue" / "s0.geojson").write_text("{not json")
    server, _ = _serve([tiny_copy.out], [tiny_copy.run])
    try:
        page, console = _page(browser, server.url)
        _loaded(page)
        page.locator('[data-layer="tissue"] input.toggle').check()
        err = page.locator('[data-layer="tissue"] .layer-error')
        err.wait_for(timeout=20000)
        assert err.inner_text().startswith(f"{tiny_copy.out / 'tissue' / 's0.geojson'}: unreadable GeoJSON")
        assert "fix: re-run the job that wrote it" in page.locator("#status").inner_text()
        assert console and all("404" in m or "failed to load" in m for m in console), console
        page.close()
    finally:
        server.stop()


def test_empty_folder_page_says_what_is_missing(browser, tmp_path):
    server, _ = _serve([tmp_path], [])
    try:
        page, console = _page(browser, server.url)
        page.wait_for_selector("#problems .problem")
        text = page.locator("#problems").inner_text()
        assert "no slides" in text and "gigaslide encode" in text and "no runs given" in text
        assert "No slides" in page.locator("#slides").inner_text()
        assert console == [], console
        page.close()
    finally:
        server.stop()


def test_score_layers_show_their_colour_scale(browser, tiny):
    """Under each score layer, its colour scale from 0 to 1 in the layer's colour map; another colour map redraws it,
    and the part under the threshold (left undrawn on the slide) is greyed out."""
    from gigaslide.viewer.overlays import lut

    server, _ = _serve([tiny.out], [tiny.run])
    try:
        page, console = _page(browser, server.url)
        _loaded(page)
        box = page.locator('[data-layer="run0-attention"] .cbar-box')
        assert box.locator(".cbar-ticks").inner_text().split() == ["0", "0.5", "1"]

        def strip() -> np.ndarray:
            page.wait_for_function("document.querySelector('[data-layer=\"run0-attention\"] img.cbar-img').complete")
            png = box.locator("img.cbar-img").screenshot()
            img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
            return img[img.shape[0] // 2]

        for name in ("jet", "viridis"):
            if name != "jet":
                page.locator('[data-layer="run0-attention"] select.cmap').select_option(name)
                page.wait_for_function(
                    f"document.querySelector('[data-layer=\"run0-attention\"] img.cbar-img').alt === '{name}'")
            row, table = strip(), lut(name)
            w = len(row)
            for v in (0.02, 0.25, 0.5, 0.75, 0.98):  # the colour at v along the bar is the colour of value v
                assert np.abs(row[int(v * (w - 1))] - table[int(v * 255)]).max() <= 25, (name, v)
        _slider(page, "run0-attention", "threshold", "ArrowRight", 10)  # 0.5: the lower half greyed out
        page.wait_for_function(
            "document.querySelector('[data-layer=\"run0-attention\"] .cbar-cut').style.width === '50%'")
        cut = np.asarray(Image.open(io.BytesIO(box.screenshot())).convert("RGB")).astype(int)[5]
        w = box.bounding_box()["width"]
        table = lut("viridis")
        assert np.abs(cut[int(0.9 * w)] - table[int(0.9 * 255)]).max() <= 25
        assert np.abs(cut[int(0.2 * w)] - table[int(0.2 * 255)]).max() > 40
        assert console == [], console
        page.close()
    finally:
        server.stop()

"""Viewer speed on a generated 40k x 40k slide: deep-zoom tile latency, overlay tile latency, first screenful.

A pyramidal TIFF of 40,000^2 px (0.25 µm/px, generated once and cached in --work: tissue pieces
textured with a repeated patch of :func:`gigaslide.testing.tissue_fn`) is tiled by gigaslide (tissue mask +
224 px tiles at 0.5 µm/px); its tile features are random 64-d vectors (the encoder is not what is
measured) scored by a small ABMIL run trained on random bags of the same dimension. The viewer runs
in a real uvicorn server; requests go over HTTP on 127.0.0.1, one at a time, to tile addresses drawn
at random from the levels a person zooms through (each address once: no tile is served from a cache
of ours; OpenSlide keeps its own small cache). Time to first screenful is measured in headless
Chromium (when installed): page load until every visible tile of the slide (then also of the
attention overlay) is drawn, viewport 1200 x 800. Neighbour search is timed on random unit vectors.

    .venv/bin/python benchmarks/bench_viewer.py [--size 40000] [--requests 150] [--work /tmp/gigaslide_bench_viewer]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, write_result  # noqa: E402

os.environ.setdefault("GIGASLIDE_THREADS", "1")


def fast_tissue_fn(width: int, height: int, seed: int = 3, blobs: int = 4):  # noqa: ANN201
    """Elliptical tissue pieces like :func:`gigaslide.testing.tissue_fn`, textured by one repeated 512 px patch of
    it (a 40k^2 slide is then written in about a minute instead of ten)."""
    from gigaslide.testing import tissue_fn

    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.2, 0.8, blobs) * width, rng.uniform(0.2, 0.8, blobs) * height
    rx, ry = rng.uniform(0.12, 0.25, blobs) * width, rng.uniform(0.12, 0.25, blobs) * height
    big = tissue_fn(4096, 4096, seed=seed, blobs=1)
    texture = big(1536, 1536, 1024, 1024, 1.0).astype(np.float32)
    glass = (texture >= 240).all(-1)  # the patch may cross the blob's edge: fill that part with eosin
    texture[glass] = np.array([200, 120, 170], np.float32) + rng.normal(0, 8, (int(glass.sum()), 3))

    def fn(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        xs = x0 + (np.arange(w) + 0.5) * ds
        ys = y0 + (np.arange(h) + 0.5) * ds
        inside = np.zeros((h, w), bool)
        for i in range(blobs):
            inside |= ((xs[None, :] - cx[i]) / rx[i]) ** 2 + ((ys[:, None] - cy[i]) / ry[i]) ** 2 <= 1.0
        tex = texture[(ys.astype(np.int64) % 1024)[:, None], (xs.astype(np.int64) % 1024)[None, :]]
        return np.where(inside[..., None], tex, 245).astype(np.uint8)

    return fn


def build(work: Path, size: int) -> tuple[Path, Path, Path, dict]:
    """(slide, OUT_DIR, RUN_DIR, timings) -- the slide is generated once and kept in ``work``."""
    import torch

    from gigaslide.features import store
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.train import TrainConfig
    from gigaslide.slides.writer import write_pyramidal_tiff
    from gigaslide.tiling import TilingParams, tile_slide

    torch.set_num_threads(1)
    t: dict = {}
    slide = work / f"generated-{size}.tiff"
    if not slide.is_file():
        t0 = time.perf_counter()
        write_pyramidal_tiff(slide, size, size, fast_tissue_fn(size, size), mpp=0.25, tile=512)
        t["generate slide (s)"] = time.perf_counter() - t0
    out = work / f"out-{size}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    grid = tile_slide(slide, out, TilingParams(mpp=0.5, tile_size=224, min_tissue=0.25))
    t["tissue + tile grid (s)"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    attrs = {"encoder": "bench-random-64", "slide_id": slide.stem, "slide_path": str(slide), "mpp": 0.5, "tile_size": 224,
             "overlap": 0, "slide_mpp": 0.25}
    cattrs = {"patch_size": 224, "patch_size_level0": grid.tile_size_level0, "target_mpp": 0.5, "level0_mpp": 0.25}
    store.save(out / "features" / f"{slide.stem}.h5", rng.normal(size=(len(grid), 64)).astype(np.float32), grid.coords,
               attrs=attrs, coords_attrs=cattrs)
    bags = work / "train-bags"
    shutil.rmtree(bags, ignore_errors=True)
    rows = ["slide_id,label"]
    for i in range(8):
        x = rng.normal(size=(50, 64)).astype(np.float32) + (i % 2) * 0.5
        store.save(bags / f"b{i}.h5", x, rng.integers(0, 1000, (50, 2)), attrs={**attrs, "slide_id": f"b{i}"})
        rows.append(f"b{i},{i % 2}")
    (work / "labels.csv").write_text("\n".join(rows) + "\n")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    run_cv(bags, work / "labels.csv", run, cfg=TrainConfig(model="abmil", epochs=2, hidden=32), folds=2, val_fraction=0.0,
           n_bootstrap=0, verbose=False)
    t["tiles"] = len(grid)
    return slide, out, run, t


def addresses(geom, levels: list[int], n: int, rng) -> list[tuple[int, int, int]]:  # noqa: ANN001
    """``n`` distinct random tile addresses spread over ``levels``."""
    out = set()
    while len(out) < n:
        lv = int(rng.choice(levels))
        w, h = geom.level_size(lv)
        out.add((lv, int(rng.integers(0, -(-w // geom.tile_size))), int(rng.integers(0, -(-h // geom.tile_size)))))
    return sorted(out, key=lambda a: rng.random())


def timed_gets(client, urls: list[str]) -> list[float]:  # noqa: ANN001
    ms = []
    for u in urls:
        t0 = time.perf_counter()
        r = client.get(u)
        ms.append(1000 * (time.perf_counter() - t0))
        assert r.status_code == 200, (u, r.status_code, r.text[:200])
    return ms


def first_screenful(url: str, runs: int = 3) -> list[tuple[float, float]] | None:
    """(slide drawn, + attention drawn) seconds per fresh page in headless Chromium; None without it."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not chromium:
        return None
    out = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(runs):
            ctx = b.new_context(viewport={"width": 1200, "height": 800})  # fresh context: empty browser cache
            page = ctx.new_page()
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_function("window.gigaslide && window.gigaslide.allLoaded()", timeout=120000)
            t1 = time.perf_counter()
            page.locator('[data-layer="run0-attention"] input.toggle').check()
            page.wait_for_function("window.gigaslide.allLoaded()", timeout=120000)
            out.append((t1 - t0, time.perf_counter() - t1))
            ctx.close()
        b.close()
    return out


def search_times(ns: list[int], dim: int = 512, queries: int = 20) -> list[tuple[int, float, float]]:
    from gigaslide.viewer.neighbours import FeatureIndex

    rows = []
    rng = np.random.default_rng(0)
    for n in ns:
        idx = FeatureIndex({"a": rng.standard_normal((n, dim), dtype=np.float32)})
        ms = []
        for q in rng.integers(0, n, queries):
            t0 = time.perf_counter()
            idx.query("a", int(q), 8)
            ms.append(1000 * (time.perf_counter() - t0))
        rows.append((n, statistics.median(ms), float(np.percentile(ms, 95))))
        del idx
    return rows


def pct(ms: list[float]) -> str:
    return f"{statistics.median(ms):.1f} | {np.percentile(ms, 95):.1f} | {max(ms):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--work", default="/tmp/gigaslide_bench_viewer")
    ap.add_argument("--search", default="100000,500000", help="tiles in the neighbour-search timing (512-d)")
    args = ap.parse_args()
    import httpx

    from gigaslide.viewer import Server, ViewerState, build_app
    from gigaslide.viewer.deepzoom import Geometry

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    slide, out, run, setup = build(work, args.size)
    state = ViewerState([out], [run])
    server = Server(build_app(state), port=0).start()
    key = slide.stem
    rng = np.random.default_rng(1)
    rows = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            info = c.get(f"/api/slides/{key}").json()
            g = Geometry(info["width"], info["height"], info["tile_size"], info["overlap"])
            og = Geometry(info["width"], info["height"], info["overlay_tile_size"], 0)
            top = g.level_count - 1
            zoom_levels = {"full resolution (level-0 px)": [top], "2-16x zoomed out": [top - 1, top - 2, top - 3, top - 4]}
            t0 = time.perf_counter()
            c.get(f"/api/slides/{key}/overlay/run0-attention/{top - 6}/0_0.png")
            first_layer = time.perf_counter() - t0
            for name, levels in zoom_levels.items():
                a = addresses(g, levels, args.requests, rng)
                rows.append(("slide JPEG", name, timed_gets(c, [f"/api/slides/{key}/dz/{lv}/{x}_{y}.jpeg" for lv, x, y in a])))
                oa = addresses(og, levels, args.requests, rng)
                for layer in ("run0-attention", "grid", "tissue"):
                    rows.append((f"overlay PNG: {layer}", name, timed_gets(
                        c, [f"/api/slides/{key}/overlay/{layer}/{lv}/{x}_{y}.png?threshold=0.2" for lv, x, y in oa])))
        screen = first_screenful(server.url)
    finally:
        server.stop()
    search = search_times([int(n) for n in args.search.split(",")])

    lines = ["## Viewer", "",
             f"Generated slide {args.size:,}² px (0.25 µm/px), {setup['tiles']:,} tissue tiles of 224 px at 0.5 µm/px "
             f"(tissue + grid in {setup['tissue + tile grid (s)']:.1f} s); random 64-d features, ABMIL run on random bags. "
             f"{args.requests} distinct random tile addresses per row, one request at a time over HTTP (uvicorn, 127.0.0.1). "
             f"{load_note()[0].upper() + load_note()[1:]}.", "",
             "| tile | zoom | median ms | p95 ms | max ms |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {zoom} | {pct(ms)} |" for what, zoom, ms in rows]
    lines += ["", f"First request of the attention layer (loads the model, scores {setup['tiles']:,} tiles): "
              f"{1000 * first_layer:.0f} ms; later tiles reuse the scores."]
    if screen:
        lines += ["", "Time to first screenful in headless Chromium (fresh browser context each run, 1200 x 800):", "",
                  "| run | page load → slide drawn (s) | + attention overlay drawn (s) |", "|---|---|---|"]
        lines += [f"| {i + 1} | {a:.2f} | {b:.2f} |" for i, (a, b) in enumerate(screen)]
    else:
        lines += ["", "Time to first screenful: not measured (chromium or playwright missing)."]
    lines += ["", "Exact cosine neighbour search (FeatureIndex: normalised float32 matrix, one mat-vec + argpartition, "
              "k = 8, 512-d random vectors, 20 queries):", "", "| tiles | median ms | p95 ms |", "|---|---|---|"]
    lines += [f"| {n:,} | {m:.1f} | {p:.1f} |" for n, m, p in search]
    slide_p95 = max(np.percentile(ms, 95) for what, _, ms in rows if what == "slide JPEG")
    over_p95 = max(np.percentile(ms, 95) for what, _, ms in rows if what.startswith("overlay"))
    fits = [n for n, m, p in search if p <= 200]
    slow = [(n, p) for n, m, p in search if p > 200]
    lines += ["", "Verdicts (computed from the rows above):", "",
              f"- slide tiles: worst p95 {slide_p95:.0f} ms, overlay tiles: worst p95 {over_p95:.0f} ms "
              f"({'within' if max(slide_p95, over_p95) <= 250 else 'above'} 250 ms per tile).",
              (f"- exact search answers within 200 ms (p95) up to {max(fits):,} tiles" if fits else
               "- exact search is above 200 ms (p95) at every size measured") +
              (f"; above it at {', '.join(f'{n:,} ({p:.0f} ms)' for n, p in slow)}: past that size a faiss-cpu index "
               "(or a smaller feature matrix) would be needed." if slow else
               ": no approximate (faiss) index is needed at the sizes measured.")]
    if screen:
        lines.append(f"- first screenful: median {statistics.median(a for a, _ in screen):.2f} s for the slide, "
                     f"{statistics.median(b for _, b in screen):.2f} s more for the attention overlay.")
    print(write_result("viewer", "\n".join(lines)))


if __name__ == "__main__":
    main()

"""Reads at 2, 4 or 8 times a pyramid level's µm/px: box averages of the decoded level (the default) vs the JPEG
decoder's DCT scaling (``iter_tiles(..., downsample="dct")``, ``encode --downsample dct``), side by side.

For each (slide, target µm/px): reader-only tiles/s of both, in alternating order on the same coordinates
(median over pairs, after one untimed pass of each), stored tiles decoded, and how far apart the pixels are (every
tile: mean, 99th percentile and max of the per-channel absolute difference). Slides: a generated 40x-like slide with
level 0 only (0.25 µm/px, so 0.5 / 1.0 / 2.0 are /2, /4, /8 reads of it), and ``cmu-1-small-region.svs`` (an
Aperio SVS, RGB JPEG tiles, one level at 0.499 µm/px) where ../shared/data has it. Coordinates: every tile of a
regular grid over the slide at the tiling grid's level-0 stride (floored per tile, so on a scan whose µm/px is not
exactly half the target's some corners fall between pixels of the reduced grid), in grid order.

    .venv/bin/python benchmarks/bench_downsample.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, write_result  # noqa: E402

from gigaslide.slides import Slide, TileReader  # noqa: E402
from gigaslide.slides.writer import write_pyramidal_tiff  # noqa: E402
from gigaslide.testing import shared_data_dir, tissue_fn  # noqa: E402

TILE = 224


def _read(path: Path, coords: np.ndarray, mpp: float, mode: str) -> tuple[float, np.ndarray, int, str]:
    """(seconds from opening the slide to the last tile, the tiles, stored tiles decoded, the mode in use)."""
    out = np.empty((len(coords), TILE, TILE, 3), np.uint8)
    t = time.perf_counter()
    with Slide(path) as s:
        r = TileReader(s, TILE, mpp, downsample=mode)
        r.read_batch(coords, out=out)
        decoded, used = r.decoded_tiles, r.downsample
        r.close()
    return time.perf_counter() - t, out, decoded, used


def measure(path: Path, mpp: float, repeats: int) -> dict:
    with Slide(path) as s:
        W, H = s.dimensions
        stride = TILE * mpp / s.mpp  # level-0 px, floored per tile as the tiling grid does
        r = TileReader(s, TILE, mpp)
        k, ds = r.factor, r.level.level_downsample
    xs, ys = np.floor(np.arange(0, W - stride / 2, stride)), np.floor(np.arange(0, H - stride / 2, stride))
    coords = np.stack(np.meshgrid(xs.astype(int), ys.astype(int)), -1).reshape(-1, 2)
    _, box, dec_box, _ = _read(path, coords, mpp, "box")  # untimed: first-use costs out of the pairs
    _, dct, dec_dct, used = _read(path, coords, mpp, "dct")
    times: dict[str, list[float]] = {"box": [], "dct": []}
    for r in range(repeats):
        for mode in (("box", "dct") if r % 2 == 0 else ("dct", "box")):
            times[mode].append(_read(path, coords, mpp, mode)[0])
    diff = np.abs(box.astype(np.int16) - dct)
    lx = coords / ds / k  # corners in pixels of the reduced grid: dct rounds those between pixels to the nearest
    on = np.all(np.abs(lx - np.round(lx)) < 1e-6, axis=1)
    return {"off_grid": int((~on).sum()), "mean_on": float(diff[on].mean()) if on.any() else None,
            "slide": path.name, "mpp": mpp, "k": k, "tiles": len(coords), "used": used,
            "box_tps": len(coords) / statistics.median(times["box"]), "dct_tps": len(coords) / statistics.median(times["dct"]),
            "speedup": statistics.median([b / d for b, d in zip(times["box"], times["dct"])]),
            "speedups": [round(b / d, 2) for b, d in zip(times["box"], times["dct"])],
            "decoded": (dec_box, dec_dct), "mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
            "max": int(diff.max())}


def report(rows: list[dict], repeats: int) -> str:
    lines = ["# Downsampling by 2, 4, 8: box averages vs the JPEG decoder's DCT scaling", "",
             f"Tiles of {TILE} px, every tile of a regular grid in grid order, `TileReader.read_batch` timed from "
             f"opening the slide to the last tile; {repeats} alternating pairs after one untimed pass of each, "
             f"`× box` = median over pairs of box time / dct time; {load_note()}. `|Δ|` = per-channel absolute "
             "difference between the two modes' pixels over every tile. `dct in use`: the mode the reader ran (box "
             "where DCT scaling cannot apply). `off the reduced grid`: tiles whose corner falls between pixels of the "
             "1/k grid, which dct rounds to the nearest (a shift of half an output pixel, so their differences "
             "include the shift); `mean abs diff, on-grid tiles`: the filters alone.", "",
             "| slide | µm/px | reduction | tiles | box tiles/s | dct tiles/s | × box (per pair) | stored tiles decoded "
             "(box, dct) | dct in use | off the reduced grid | mean abs diff, on-grid tiles | mean abs diff | p99 abs "
             "diff | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on = "-" if r["mean_on"] is None else f"{r['mean_on']:.2f}"
        lines.append(f"| {r['slide']} | {r['mpp']} | /{r['k']} | {r['tiles']} | {r['box_tps']:.0f} | {r['dct_tps']:.0f} | "
                     f"×{r['speedup']:.2f} ({', '.join(f'{x:.2f}' for x in r['speedups'])}) | {r['decoded'][0]}, "
                     f"{r['decoded'][1]} | {r['used']} | {r['off_grid']} | {on} | {r['mean']:.2f} | {r['p99']:.0f} | "
                     f"{r['max']} |")
    faster = [r for r in rows if r["used"] == "dct" and r["speedup"] > 1]
    ran = [r for r in rows if r["used"] == "dct"]
    lines += ["", "Verdicts (computed from the rows above):"]
    if ran:
        lines.append(f"* DCT scaling faster than box averaging on {len(faster)} of {len(ran)} rows (×"
                     f"{min(r['speedup'] for r in ran):.2f} to ×{max(r['speedup'] for r in ran):.2f}).")
        ons = [r["mean_on"] for r in ran if r["mean_on"] is not None]
        on_text = f"; on-grid tiles alone {min(ons):.2f}-{max(ons):.2f}" if ons else ""
        lines.append(f"* Not the same pixels: mean |Δ| {min(r['mean'] for r in ran):.2f}-{max(r['mean'] for r in ran):.2f}"
                     f"{on_text}, max |Δ| {min(r['max'] for r in ran)}-{max(r['max'] for r in ran)} grey levels (the "
                     "2-level tolerance between reader paths does not hold), so box stays the default and dct is opt-in "
                     "(`encode --downsample dct`; features record which ran and are encoded again when it changes).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small generated slide, 2 pairs")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-downsample-"))
    side = 3072 if args.quick else 12288
    gen = write_pyramidal_tiff(work / f"one-level-{side}.tiff", side, side, tissue_fn(side, side, 7, 6), mpp=0.25,
                               min_level_size=10**9)
    cases = [(gen, 0.5), (gen, 1.0), (gen, 2.0)]
    shared = shared_data_dir()
    if shared and (shared / "slides" / "cmu-1-small-region.svs").is_file() and not args.quick:
        cmu = shared / "slides" / "cmu-1-small-region.svs"
        cases += [(cmu, 1.0), (cmu, 2.0)]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for path, mpp in cases:
        rows.append(measure(path, mpp, repeats))
        print(rows[-1], flush=True)
    print(write_result("downsample", report(rows, repeats)).read_text())


if __name__ == "__main__":
    main()

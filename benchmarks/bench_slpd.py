"""SLPD pre-training cost: crops encoded at their own length vs at the whole region's, and start-up memory.

SLPD's region views are contiguous sub-grids of a region's tiles (2 global crops of 50-100 % of the side,
8 local crops of 20-45 %). Each crop used to run through the region encoder at the full region length with
the tiles outside it masked; now a crop is compacted to its own tiles first
(:func:`gigaslide.ssl.slide.regions.compact`), which does not change the encoder's output. Both ways run
side by side here, alternating, on the same synthetic cohort and seed (the full-length way by replacing
``compact`` with the identity), and the loss histories are compared.

Two cohort shapes: the mosaic benchmark's (4 x 4-tile regions, ~78 tissue tiles per slide) and SLPD's
own (4096-px regions of 256-px tiles: 16 x 16 tiles per region). Start-up memory, on a third, larger
cohort: peak RSS of a process that opens the cohort and computes its input statistics (``epochs=0``) minus
one that only imports, next to the bytes of the features on disk (SLPD keeps them in their stored dtype).

    .venv/bin/python benchmarks/bench_slpd.py [--epochs 2 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import load_note, run_child_peak_rss, write_result  # noqa: E402

# name: (slides, region side in tiles, tissue tiles per slide (None = every cell), region sides per slide (x, y))
COHORTS = {"mosaic (4 × 4-tile regions)": (200, 4, 78, (4, 4)),
           "SLPD scale (16 × 16-tile regions)": (40, 16, None, (2, 1))}
DIM, TILE = 256, 64
#: Start-up memory only: 60 slides x 4,900 tiles x 1,024-d (0.6 GB of float16 features), 14 x 14-tile regions.
MEMORY = (60, 14, None, (5, 5), 1024)


def make_cohort(folder: Path, slides: int, side: int, tissue: int | None, regions: tuple[int, int], dim: int = DIM,
                seed: int = 0) -> int:
    """Feature files (float16, as `encode` writes them) of tiles of 64 px at 0.5 µm/px; returns bytes of features."""
    from gigaslide.features import store

    rng = np.random.default_rng(seed)
    gx, gy = side * regions[0], side * regions[1]
    cells = np.stack(np.meshgrid(np.arange(gx), np.arange(gy)), -1).reshape(-1, 2)
    total = 0
    for s in range(slides):
        xy = cells if tissue is None else cells[np.sort(rng.choice(len(cells), tissue, replace=False))]
        f = rng.standard_normal((len(xy), dim), dtype=np.float32).astype(np.float16)
        total += f.nbytes
        store.save(folder / f"s{s:03d}.h5", f, xy * TILE,
                   attrs={"encoder": "synthetic", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": TILE,
                          "slide_id": f"s{s:03d}"}, coords_attrs={"patch_size_level0": float(TILE), "level0_mpp": 0.5})
    return total


def train(folder: Path, out: Path, side: int, epochs: int, compact: bool) -> dict:
    import torch

    from gigaslide.ssl.slide import slpd

    torch.set_num_threads(1)
    if not compact:  # the former way: every crop at the whole region's length, the tiles outside it masked
        slpd.compact = lambda f, p, m: (f, p, m)
    t = time.perf_counter()
    res = slpd.pretrain_slpd(folder, out, epochs=epochs, warmup=1, region_size=side * TILE, region_mpp=0.5,
                             prototypes=2, log=lambda *a: None)
    seconds = time.perf_counter() - t
    cfg = json.loads((out / "run.json").read_text())["config"]
    return {"seconds": seconds, "regions": cfg["data"]["n_regions"], "history": res["history"]}


def _child(folder: Path, out: Path, side: int, epochs: int, compact: bool) -> dict:
    code = (f"import json, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "from bench_slpd import train\nfrom pathlib import Path\n"
            f"print(json.dumps(train(Path({str(folder)!r}), Path({str(out)!r}), {side}, {epochs}, {compact})))\n")
    peak, stdout = run_child_peak_rss(code)
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating (compact, full-length) pairs per cohort")
    ap.add_argument("--topic", default="slpd")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-slpd-"))
    rows = []
    try:
        base_gb, _ = run_child_peak_rss("import gigaslide.ssl.slide.slpd\nfrom lightly.loss import DINOLoss\n"
                                        "from lightly.models.modules import DINOProjectionHead")
        slides, side, tissue, regions, dim = MEMORY
        folder = work / "memory"
        mem = {"slides": slides, "tiles": side * side * regions[0] * regions[1], "dim": dim,
               "features_gb": make_cohort(folder, slides, side, tissue, regions, dim) / 1e9}
        mem["start_above_gb"] = _child(folder, work / "memory-start", side, 0, True)["peak_gb"] - base_gb
        shutil.rmtree(folder, ignore_errors=True)
        for name, (slides, side, tissue, regions) in COHORTS.items():
            folder = work / name.split()[0]
            nbytes = make_cohort(folder, slides, side, tissue, regions)
            start_gb = _child(folder, work / f"{folder.name}-start", side, 0, True)["peak_gb"]
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for k in range(args.rounds):
                for compact in ((True, False) if k % 2 == 0 else (False, True)):
                    out = work / f"{folder.name}-{int(compact)}-{k}"
                    runs[compact].append(_child(folder, out, side, args.epochs, compact))
                    print(name, compact, round(runs[compact][-1]["seconds"], 1), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            rows.append({"cohort": name, "slides": slides, "side": side, "tissue": tissue, "features_gb": nbytes / 1e9,
                         "start_above_gb": start_gb - base_gb, "runs": runs})
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.topic, render(rows, args, mem))


def _loss_diff(a: list[dict], b: list[dict]) -> float:
    keys = ("dino", "intra", "inter")
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in keys if x[k] is not None)


def render(rows: list[dict], args: argparse.Namespace, mem: dict) -> str:
    lines = ["# SLPD pre-training: crops at their own length vs at the region's length", "",
             f"Synthetic cohorts of {DIM}-d float16 tile features (64-px tiles at 0.5 µm/px); `pretrain_slpd` with its "
             f"defaults (region encoder dim 192, depth 2, batch 64 regions, 2 global + 8 local crops) for {args.epochs} "
             "epochs (the first DINO only, then + intra + inter prototypes), 1 torch thread, each run in a fresh "
             f"process, {args.rounds} alternating pairs per cohort; seconds are the median of the pairs. "
             "**Full length** = every crop encoded at the whole region's length with the tiles outside it masked (the "
             "former way); **compact** = each crop gathered to its own tiles first. Start-up = peak RSS of a process "
             "that opens the cohort and computes its input statistics, minus that of one that only imports. "
             f"Load: {load_note()}.", "",
             "| cohort | slides | regions | tiles per region (max) | features on disk GB | start-up above imports GB | "
             "full length s | compact s | speed-up | largest loss difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in rows:
        full = float(np.median([x["seconds"] for x in r["runs"][False]]))
        comp = float(np.median([x["seconds"] for x in r["runs"][True]]))
        diff = _loss_diff(r["runs"][True][0]["history"], r["runs"][False][0]["history"])
        lines.append(f"| {r['cohort']} | {r['slides']} | {r['runs'][True][0]['regions']} | {r['side'] ** 2} | "
                     f"{r['features_gb']:.3f} | {r['start_above_gb']:.2f} | {full:.1f} | {comp:.1f} | "
                     f"×{full / comp:.2f} | {diff:.1e} |")
        same = diff < 1e-3
        verdicts.append(f"- {r['cohort']}: compact crops train ×{full / comp:.2f} as fast; the loss histories "
                        f"{'agree' if same else 'DIFFER'} (largest difference {diff:.1e} over {args.epochs} epochs).")
    ratio = mem["start_above_gb"] / mem["features_gb"]
    lines += ["", f"Start-up memory at a larger cohort ({mem['slides']} slides × {mem['tiles']} tiles × {mem['dim']}-d, float16):", "",
              "| features on disk GB | start-up above imports GB | ratio |", "|---|---|---|",
              f"| {mem['features_gb']:.2f} | {mem['start_above_gb']:.2f} | {ratio:.2f} |"]
    verdicts.append(f"- start-up holds {ratio:.2f}× the float16 features on disk (a float32 copy alone would be 2×).")
    return "\n".join([*lines, "", "Verdicts (computed from the rows above):", "", *verdicts])


if __name__ == "__main__":
    main()

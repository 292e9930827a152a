"""Slide-level pre-training cost (SLPD, Giga-SSL): the current code vs the former way, side by side, and SLPD's
start-up memory.

* **SLPD**: its region views are contiguous sub-grids of a region's tiles (2 global crops of 50-100 % of the side,
  8 local crops of 20-45 %). Each crop used to run through the region encoder at the whole region's length with
  the tiles outside it masked; now a crop is compacted to its own tiles first
  (:func:`gigaslide.ssl.slide.regions.compact`), which does not change the encoder's output. The former way is
  run by replacing ``compact`` with the identity.
* **Giga-SSL**: SparseConvMIL's submanifold convolution used to gather all k x k neighbours of every site (absent
  ones as zeros) into one matrix product; now it runs one product per kernel offset over the sites that have a
  neighbour there. A view of 16 tiles drawn from a slide's tissue has few neighbours. The former way is run by
  putting :func:`gather_forward` (that code, kept here as the reference) back in place.

Each run is a fresh process, the two ways alternate, and the loss histories of the two are compared (same
seed, same data). Cohorts: SLPD on the mosaic benchmark's shape (4 x 4-tile regions, 78 tissue tiles per slide)
and on SLPD's own (4096-px regions of 256-px tiles: 16 x 16 tiles per region); Giga-SSL on the mosaic
benchmark's cache shape (200 slides, 25 cached views of 32 tiles). SLPD start-up memory, on a larger cohort:
peak RSS of a process that opens the cohort and computes its input statistics (``epochs=0``) minus one that
only imports, next to the bytes of the features on disk (SLPD keeps them in their stored dtype).

    .venv/bin/python benchmarks/bench_slide_pretrain_speed.py [--epochs 2 --gigassl-epochs 30 --rounds 3]
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
#: SLPD start-up memory only: 60 slides x 4,900 tiles x 1,024-d (0.6 GB of float16 features), 14 x 14-tile regions.
MEMORY = (60, 14, None, (5, 5), 1024)
#: Giga-SSL cache: slides, cached views, tiles per view, tissue tiles per slide (on a 16 x 16 grid).
CACHE = (200, 25, 32, 78)


def _grid(side_x: int, side_y: int) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(side_x), np.arange(side_y)), -1).reshape(-1, 2)


def _attrs(sid: str) -> dict:
    return {"encoder": "synthetic", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": TILE, "slide_id": sid}


COORDS_ATTRS = {"patch_size": TILE, "patch_size_level0": float(TILE), "target_mpp": 0.5, "level0_mpp": 0.5}


def make_cohort(folder: Path, slides: int, side: int, tissue: int | None, regions: tuple[int, int], dim: int = DIM,
                seed: int = 0) -> int:
    """Feature files (float16, as `encode` writes them) of tiles of 64 px at 0.5 µm/px; returns bytes of features."""
    from gigaslide.features import store

    rng = np.random.default_rng(seed)
    cells = _grid(side * regions[0], side * regions[1])
    total = 0
    for s in range(slides):
        xy = cells if tissue is None else cells[np.sort(rng.choice(len(cells), tissue, replace=False))]
        f = rng.standard_normal((len(xy), dim), dtype=np.float32).astype(np.float16)
        total += f.nbytes
        store.save(folder / f"s{s:03d}.h5", f, xy * TILE, attrs=_attrs(f"s{s:03d}"), coords_attrs=COORDS_ATTRS)
    return total


def make_cache(folder: Path, slides: int, views: int, tiles: int, tissue: int, seed: int = 0) -> None:
    """An augment-cache folder (as `augment-cache` writes it): each slide's tissue tiles on a 16 x 16 grid and
    ``views`` cached views of ``tiles`` of them, with per-view noise standing in for the augmentations."""
    from gigaslide.features import store

    rng = np.random.default_rng(seed)
    cells = _grid(16, 16)
    for s in range(slides):
        xy = cells[np.sort(rng.choice(len(cells), tissue, replace=False))] * TILE
        feats = rng.standard_normal((tissue, DIM), dtype=np.float32) + rng.normal(size=DIM).astype(np.float32)
        idx = np.stack([rng.choice(tissue, tiles, replace=False) for _ in range(views)])
        vf = (feats[idx] + rng.normal(scale=0.3, size=(views, tiles, DIM))).astype(np.float16)
        store.save(folder / "features" / f"s{s:03d}.h5", feats.astype(np.float16), xy,
                   attrs={**_attrs(f"s{s:03d}"), "views": views, "tiles_per_view": tiles, "complete": 1},
                   coords_attrs=COORDS_ATTRS, extra={"views": vf, "view_coords": xy[idx], "view_tiles": idx})


def gather_forward(self, feats, nbr):  # noqa: ANN001, ANN201 - the former SubmanifoldConv2d.forward (reference)
    import torch

    m, c = feats.shape
    padded = torch.cat([feats, feats.new_zeros(1, c)], dim=0)
    gathered = padded[torch.where(nbr < 0, m, nbr)]  # [M, k*k, C_in]: absent neighbours as zeros
    w = self.weight.permute(2, 3, 1, 0).reshape(-1, self.out_channels)
    out = gathered.reshape(m, -1) @ w.to(feats.dtype)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def train(method: str, data: Path, out: Path, epochs: int, current: bool, side: int = 0) -> dict:
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    if method == "slpd":
        from gigaslide.ssl.slide import slpd

        if not current:  # the former way: every crop at the whole region's length, the tiles outside it masked
            slpd.compact = lambda f, p, m: (f, p, m)
        res = slpd.pretrain_slpd(data, out, epochs=epochs, warmup=1, region_size=side * TILE, region_mpp=0.5,
                                 prototypes=2, log=lambda *a: None)
        losses = [[h[k] for k in ("dino", "intra", "inter") if h[k] is not None] for h in res["history"]]
    else:
        from gigaslide.ssl.slide import gigassl, sparse

        if not current:  # the former way: all k x k neighbours gathered, absent ones as zeros
            sparse.SubmanifoldConv2d.forward = gather_forward
        res = gigassl.pretrain_gigassl(data, out, epochs=epochs, log=lambda *a: None)
        losses = [[h["loss"]] for h in res["history"]]
    seconds = time.perf_counter() - t
    cfg = json.loads((out / "run.json").read_text())["config"]
    return {"seconds": seconds, "losses": losses, "regions": cfg.get("data", {}).get("n_regions")}


def _child(method: str, data: Path, out: Path, epochs: int, current: bool, side: int = 0) -> dict:
    code = (f"import json, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "from bench_slide_pretrain_speed import train\nfrom pathlib import Path\n"
            f"print(json.dumps(train({method!r}, Path({str(data)!r}), Path({str(out)!r}), {epochs}, {current}, {side})))\n")
    peak, stdout = run_child_peak_rss(code)
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_gb": peak}


def _pairs(method: str, data: Path, work: Path, epochs: int, rounds: int, side: int = 0, label: str = "") -> dict:
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for k in range(rounds):
        for current in ((True, False) if k % 2 == 0 else (False, True)):
            out = work / f"{method}-{data.name}-{int(current)}-{k}"
            runs[current].append(_child(method, data, out, epochs, current, side))
            print(label, "current" if current else "former", round(runs[current][-1]["seconds"], 1), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2, help="SLPD epochs per run (the first DINO only)")
    ap.add_argument("--gigassl-epochs", type=int, default=30, help="Giga-SSL epochs per run (one step each: all slides)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (current, former) pairs per cohort")
    ap.add_argument("--topic", default="slide_pretrain_speed")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-slidept-"))
    rows = []
    try:
        base_gb, _ = run_child_peak_rss("import gigaslide.ssl.slide.slpd\nfrom lightly.loss import DINOLoss\n"
                                        "from lightly.models.modules import DINOProjectionHead")
        slides, side, tissue, regions, dim = MEMORY
        folder = work / "memory"
        mem = {"slides": slides, "tiles": side * side * regions[0] * regions[1], "dim": dim,
               "features_gb": make_cohort(folder, slides, side, tissue, regions, dim) / 1e9}
        mem["start_above_gb"] = _child("slpd", folder, work / "memory-start", 0, True, side)["peak_gb"] - base_gb
        shutil.rmtree(folder, ignore_errors=True)
        for name, (slides, side, tissue, regions) in COHORTS.items():
            folder = work / name.split()[0]
            make_cohort(folder, slides, side, tissue, regions)
            runs = _pairs("slpd", folder, work, args.epochs, args.rounds, side, f"SLPD {name}")
            rows.append({"method": "SLPD", "cohort": f"{name}, {slides} slides, {runs[True][0]['regions']} regions",
                         "change": "crops at their own length (`regions.compact`)", "epochs": args.epochs, "runs": runs})
            shutil.rmtree(folder, ignore_errors=True)
        slides, views, tiles, tissue = CACHE
        cache = work / "cache"
        make_cache(cache, slides, views, tiles, tissue)
        runs = _pairs("gigassl", cache, work, args.gigassl_epochs, args.rounds, label="Giga-SSL")
        rows.append({"method": "Giga-SSL", "cohort": f"cache of {slides} slides × {views} views × {tiles} tiles "
                     f"({tissue} tissue tiles each)", "change": "sparse conv: one product per kernel offset",
                     "epochs": args.gigassl_epochs, "runs": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.topic, render(rows, args, mem))


def loss_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest absolute difference between two runs' per-epoch losses."""
    return max(abs(x - y) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True))


def render(rows: list[dict], args: argparse.Namespace, mem: dict) -> str:
    lines = ["# Slide-level pre-training cost: SLPD and Giga-SSL, current code vs the former way", "",
             f"Synthetic {DIM}-d float16 tile features (64-px tiles at 0.5 µm/px); `pretrain_slpd` and `pretrain_gigassl` "
             "with their defaults (SLPD: region encoder dim 192, depth 2, batch 64 regions, 2 global + 8 local crops, "
             "the first epoch DINO only; Giga-SSL: SparseConvMIL with 2 sparse blocks, all slides per step, 16 tiles per "
             f"view, the label-free monitor every epoch), 1 torch thread, each run in a fresh process, {args.rounds} "
             "alternating pairs per row; seconds are the median of the runs. The former way is described in the script's "
             f"docstring. Load: {load_note()}.", "",
             "| method | cohort | change | epochs | former s | current s | speed-up | largest loss difference |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in rows:
        former = float(np.median([x["seconds"] for x in r["runs"][False]]))
        current = float(np.median([x["seconds"] for x in r["runs"][True]]))
        diff = loss_diff(r["runs"][True][0]["losses"], r["runs"][False][0]["losses"])
        lines.append(f"| {r['method']} | {r['cohort']} | {r['change']} | {r['epochs']} | {former:.1f} | {current:.1f} | "
                     f"×{former / current:.2f} | {diff:.1e} |")
        verdicts.append(f"- {r['method']}, {r['cohort']}: ×{former / current:.2f} as fast; the loss histories "
                        f"{'agree' if diff < 1e-3 else 'DIFFER'} (largest difference {diff:.1e} over {r['epochs']} epochs).")
    ratio = mem["start_above_gb"] / mem["features_gb"]
    lines += ["", f"SLPD start-up memory ({mem['slides']} slides × {mem['tiles']} tiles × {mem['dim']}-d, float16):", "",
              "| features on disk GB | start-up above imports GB | ratio |", "|---|---|---|",
              f"| {mem['features_gb']:.2f} | {mem['start_above_gb']:.2f} | {ratio:.2f} |"]
    verdicts.append(f"- SLPD start-up holds {ratio:.2f}× the float16 features on disk (a float32 copy alone would be 2×).")
    return "\n".join([*lines, "", "Verdicts (computed from the rows above):", "", *verdicts])


if __name__ == "__main__":
    main()

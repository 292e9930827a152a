"""GPU check of `pretrain --method dinov2` (issue #12): the recipe under CUDA autocast, fp32 beside it, and the
Lightning engine, each a few optimiser steps on generated tiles.

    .venv/bin/python benchmarks/gpu_dinov2.py --mode tiny --out /tmp/gpu_dinov2.md   # CPU, seconds (CI)
    .venv/bin/python benchmarks/gpu_dinov2.py --mode full --out benchmarks/results/gpu_dinov2.md   # a lent GPU

``full``: ViT-S/14 (DINOv2 layout, random init) at 224 px, 2 global + 8 local crops of 98 px, batch 64, the paper's
recipe defaults; rows: ``--precision auto`` (bf16 autocast on a GPU with bf16) and ``fp32`` on the native engine,
and ``auto`` on the Lightning engine (``--devices 1``; the multi-GPU path). Each row: images/s after the first step,
peak GPU memory, first and last loss (finite, and whether it fell). ``tiny``: the same code on CPU with the tiny
test ViT, so CI keeps it running.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from gigaslide.ssl.tile.engine import PretrainConfig, pretrain  # noqa: E402
from gigaslide.testing import make_tile_folder  # noqa: E402

MODES = {
    "tiny": {"backbone": "test_vit_dinov2", "tile": 56, "batch": 4, "n_local": 2, "steps": 3, "tiles": 16, "workers": 1,
             "heads": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 1}},
    "full": {"backbone": "vit_small_dinov2", "tile": 224, "batch": 64, "n_local": 8, "steps": 8, "tiles": 256, "workers": 8,
             "heads": {}},
}
ROWS = [("native", "auto"), ("native", "fp32"), ("lightning", "auto")]


def run_row(engine: str, precision: str, data: Path, out: Path, m: dict) -> dict:
    cfg = PretrainConfig(data=str(data), out=str(out), method="dinov2", backbone=m["backbone"], tile_size=m["tile"],
                         batch_size=m["batch"], n_local=m["n_local"], steps=m["steps"], method_args=dict(m["heads"]),
                         data_kind="tiles", precision=precision, engine=engine, devices=1, monitor_every=0,
                         log_every=1, workers=m["workers"], checkpoint_every_s=1e9)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    s = pretrain(cfg)
    wall = time.perf_counter() - t
    return {"engine": engine, "precision": precision, "resolved": (s.get("precision") or {}).get("resolved", "?"),
            "steps": s.get("steps"), "images_per_s": s.get("images_per_s"), "wall_s": wall,
            "peak_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"),
            "first_loss": s.get("first_loss"), "last_loss": s.get("final_loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    mode = a.mode if torch.cuda.is_available() else "tiny"
    m = MODES[mode]
    work = Path(tempfile.mkdtemp(prefix="gs-gpu-dinov2-"))
    data = make_tile_folder(work / "tiles", None, size=m["tile"], flat=m["tiles"])
    lines = [f"## DINOv2 pre-training on the device ({mode} mode)", "",
             f"{machine()}. `{m['backbone']}` at {m['tile']} px, 2 global + {m['n_local']} local crops, "
             f"batch {m['batch']}, {m['steps']} optimiser steps per row on {m['tiles']} generated tiles, "
             f"{m['workers']} data-loader worker(s); the recipe's defaults otherwise.", "",
             "| engine | --precision (resolved) | steps | images/s | wall s | peak GPU GB | first loss | last loss |",
             "|---|---|---|---|---|---|---|---|"]
    rows: list[dict] = []
    for engine, prec in ROWS:
        try:
            r = run_row(engine, prec, data, work / f"{engine}-{prec}", m)
        except Exception as e:  # noqa: BLE001 - one row failing must not lose the others (full mode)
            if mode == "tiny":
                raise
            r = {"engine": engine, "steps": None, "last_loss": float("nan"), "images_per_s": None}
            lines.append(f"| {engine} | {prec} | failed: {type(e).__name__}: {str(e)[:160]} | | | | | |")
        else:
            lines.append(f"| {r['engine']} | {r['precision']} ({r['resolved']}) | {r['steps']} | {r['images_per_s']} "
                         f"| {r['wall_s']:.1f} | {r['peak_gb']:.2f} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
        rows.append(r)
        Path(a.out).write_text("\n".join(lines) + "\n")  # the rows so far survive gpu_check.sh's time limit
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ok = all(r["steps"] == m["steps"] and math.isfinite(r["last_loss"]) for r in rows)
    auto, fp32, light = rows
    lines += ["", f"- every row ran its {m['steps']} steps with a finite loss: {'yes' if ok else 'NO'}."]
    if light["steps"] and auto["steps"]:
        lines.append(f"- Lightning vs native engine, same precision ({auto['resolved']}): last loss "
                     f"{light['last_loss']:.4f} vs {auto['last_loss']:.4f} "
                     f"(difference {light['last_loss'] - auto['last_loss']:+.2e}).")
    if auto["images_per_s"] and fp32["images_per_s"]:
        lines.append(f"- auto ({auto['resolved']}) runs at {auto['images_per_s'] / fp32['images_per_s']:.2f}× the images/s "
                     "of fp32 on the native engine.")
    if mode == "tiny":
        lines.append("- Tiny mode (no CUDA device): the rows check the code path on CPU, not GPU speed.")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

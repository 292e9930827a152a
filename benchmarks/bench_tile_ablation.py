"""Kang et al.'s (2023) domain-specific augmentations for pathology SSL, measured one factor at a time.

One method (default SimCLR, ResNet-18) is pre-trained on the unlabelled PCam train tiles at their
native 96 px (training crops 96 px too) for the same number of optimiser steps in every setting,
with 2 seeds per setting. Each setting changes one factor of the ``pathology`` preset:

* stain augmentation off (``stain=0``), and RandStainNA (Lab statistics drawn from the training set's
  own distribution, ``stain_mode=randstainna``) instead of HED jitter;
* vertical flips + 90° rotations off (``vflip=0,rot90=0``);
* solarisation on (``solarize=0.2``; Kang et al. drop it for pathology);
* multi-magnification views: not measurable here (PCam is a tile folder at one magnification; the
  real slides in ../shared/data have no tile labels to probe) -- reported as such.

Frozen features are probed on PCam valid (linear probe and 20-NN, ``gigaslide.evaluation.tiles``);
each setting is compared with the baseline by a paired bootstrap over the same test tiles of the
seed-averaged difference in balanced accuracy / AUC.

    .venv/bin/python benchmarks/bench_tile_ablation.py --steps 300      # full (~2 h on 2 quiet cores)
    .venv/bin/python benchmarks/bench_tile_ablation.py --steps 2 --probe-train 200 --valid 200   # does it run

Writes ``benchmarks/results/tile_ablation.md`` (+ ``.json``); runs go to ``--runs-dir`` and resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_note, stop_if_interrupted, write_result  # noqa: E402
from bench_tile_ssl import load_split, pcam_dir  # noqa: E402

from gigaslide import atomic  # noqa: E402

LOAD_AT_START = load_note()  # before this benchmark loads the machine

#: Small-run heads (the papers' sizes do not fit CPU minutes); recorded in the report.
METHOD_ARGS = {"simclr": {"hidden_dim": 512, "out_dim": 128, "temperature": 0.2},
               "barlowtwins": {"proj_dim": 1024}, "mocov2": {"hidden_dim": 512, "out_dim": 128, "queue": 1024}}
#: (name, --augment, what changes against the baseline)
SETTINGS = [
    ("baseline", "pathology", "Kang et al.'s pathology preset: HED stain jitter, v+h flips, 90° rotations, no solarisation"),
    ("stain_off", "pathology,stain=0", "no stain augmentation"),
    ("randstainna", "pathology,stain_mode=randstainna", "RandStainNA (Lab) instead of HED jitter"),
    ("no_vflip_rot90", "pathology,vflip=0,rot90=0", "no vertical flips, no 90° rotations"),
    ("solarize_on", "pathology,solarize=0.2", "solarisation p = 0.2 added"),
]
NOT_MEASURED = [("multi_magnification", "PCam is one magnification (~0.97 µm/px tile folder) and the real slides here have "
                 "no tile labels to probe, so views across magnifications cannot be tested on this data")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per run (equal for every setting)")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=96, help="PCam's native size; training crops are this size too")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--probe-train", type=int, default=2000)
    ap.add_argument("--valid", type=int, default=None, help="PCam valid tiles (default: all 3,000)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", default="/tmp/gigaslide-bench-tile-ablation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GIGASLIDE_THREADS", str(args.threads))
    logging.basicConfig(level=logging.WARNING)
    from gigaslide.encoders import build_encoder
    from gigaslide.evaluation.metrics import METRICS, bootstrap_replicates, percentile_ci, summarize
    from gigaslide.evaluation.tiles import knn_probe, linear_probe
    from gigaslide.features.tiles import embed_arrays
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    t_all = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")]
    pcam = pcam_dir()
    tr = load_split(pcam / "train", args.probe_train, 0)
    te = load_split(pcam / "valid", args.valid, 0)
    y = te[1]
    runs, probs = {}, {}
    for name, augment, _ in SETTINGS:
        for seed in seeds:
            out = Path(args.runs_dir) / f"{name}-seed{seed}"
            cfg = PretrainConfig(data=str(pcam / "train"), out=str(out), method=args.method, backbone=args.backbone,
                                 tile_size=args.tile_size, crop_size=args.tile_size, augment=augment,
                                 batch_size=args.batch_size, steps=args.steps, seed=seed, data_kind="tiles",
                                 method_args=METHOD_ARGS.get(args.method, {}), monitor_every=0, workers=args.workers,
                                 log_every=max(1, args.steps // 10))
            t0 = time.monotonic()
            s = stop_if_interrupted(pretrain(cfg))
            runs[(name, seed)] = {"steps": s["steps"], "wall_s": round(time.monotonic() - t0, 1),
                                  "images_per_s": s["images_per_s"]}
            enc = build_encoder(str(out / "encoder"))
            xtr, xte = embed_arrays(enc, tr[0], 128), embed_arrays(enc, te[0], 128)
            probs[(name, seed)] = {"linear": linear_probe(xtr, tr[1], xte, 2, seed=0)[0], "knn": knn_probe(xtr, tr[1], xte, 2, k=20)}
    rows = {}
    for name, augment, what in SETTINGS:
        row = {"augment": augment, "what": what}
        for pr in ("linear", "knn"):
            per_seed = [summarize(y, probs[(name, s)][pr], n_bootstrap=args.bootstrap, metrics=("balanced_accuracy", "auc"))
                        for s in seeds]
            row[pr] = {m: float(np.mean([p[m]["value"] for p in per_seed])) for m in ("balanced_accuracy", "auc")}
            row[pr + "_per_seed"] = [round(p["balanced_accuracy"]["value"], 4) for p in per_seed]
            if name != "baseline":
                for m in ("balanced_accuracy", "auc"):
                    fn = METRICS[m]

                    def stat(i, name=name, pr=pr, fn=fn):  # noqa: ANN001, ANN202
                        return np.mean([fn(y[i], probs[(name, s)][pr][i]) - fn(y[i], probs[("baseline", s)][pr][i]) for s in seeds])

                    reps = bootstrap_replicates(stat, len(y), n_bootstrap=args.bootstrap, seed=0)
                    lo, hi = percentile_ci(reps[~np.isnan(reps)])
                    d = float(stat(np.arange(len(y))))
                    row[f"{pr}_diff_{m}"] = {"diff": d, "ci_low": float(lo), "ci_high": float(hi)}
        rows[name] = row
    report = {"args": vars(args), "seeds": seeds, "n_test": int(len(y)), "n_probe_train": int(len(tr[1])),
              "runs": {f"{k[0]}-seed{k[1]}": v for k, v in runs.items()}, "rows": rows,
              "not_measured": dict(NOT_MEASURED), "total_s": round(time.monotonic() - t_all, 1), "load_note": LOAD_AT_START}
    atomic.write_json(ROOT / "benchmarks" / "results" / "tile_ablation.json", report)
    write_result("tile_ablation", markdown(report))
    print((ROOT / "benchmarks" / "results" / "tile_ablation.md").read_text())


def _d(d: dict) -> str:
    from gigaslide.evaluation.metrics import fmt_diff

    return fmt_diff(d, p=False)


def _verdict(d: dict) -> str:
    """:func:`gigaslide.evaluation.compare.verdict` in this report's words."""
    from gigaslide.evaluation.compare import verdict

    return {"better": "helps", "worse": "hurts", "not distinguishable": "no difference resolved"}[verdict(d)]


def markdown(r: dict) -> str:
    a = r["args"]
    steps = ", ".join(str(v) for v in sorted({v["steps"] for v in r["runs"].values()}))
    smoke = a["steps"] < 100
    lines = ["# Pathology augmentations one factor at a time (Kang et al. 2023)", "",
             f"{a['method']} / {a['backbone']} pre-trained on the unlabelled PCam train tiles at the native {a['tile_size']} px "
             f"(crops {a['tile_size']} px), {steps} optimiser steps per run (equal for all), batch {a['batch_size']}, "
             f"seeds {r['seeds']}. Probes fitted on {r['n_probe_train']} PCam train tiles, tested on {r['n_test']} PCam valid "
             f"tiles; differences against the baseline are seed-averaged, paired bootstrap over the same test tiles "
             f"({a['bootstrap']} resamples, 95 % CI). Heads: {METHOD_ARGS.get(a['method'], 'the method defaults')}.", ""]
    if smoke:
        lines += [f"**This is a run at {a['steps']} steps to check that the benchmark works: "
                  "the numbers say nothing about the augmentations. The full run (`--steps 300` or more) is pending a quiet "
                  "machine.**", ""]
    lines += ["| setting | --augment | linear bal. acc. (per seed) | 20-NN bal. acc. (per seed) | Δ linear bal. acc. | "
              "Δ linear AUC | Δ 20-NN bal. acc. | verdict (linear) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        if name == "baseline":
            diffs = "— | — | — | —"
        else:
            verdict = "— (smoke run)" if smoke else _verdict(row["linear_diff_balanced_accuracy"])
            diffs = (f"{_d(row['linear_diff_balanced_accuracy'])} | {_d(row['linear_diff_auc'])} | "
                     f"{_d(row['knn_diff_balanced_accuracy'])} | {verdict}")
        seeds_lin = ", ".join(f"{v:.3f}" for v in row["linear_per_seed"])
        seeds_knn = ", ".join(f"{v:.3f}" for v in row["knn_per_seed"])
        lines.append(f"| {name} | `{row['augment']}` | {row['linear']['balanced_accuracy']:.3f} ({seeds_lin}) | "
                     f"{row['knn']['balanced_accuracy']:.3f} ({seeds_knn}) | {diffs} |")
    for name, why in r["not_measured"].items():
        lines.append(f"| {name} | — | not measured: {why} | | | | | |")
    lines += ["", "| run | steps | train s (this invocation) | train img/s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['wall_s']} | {v['images_per_s'] or '— (trained in an earlier invocation)'} |"
              for k, v in r["runs"].items()]
    lines += ["", f"Whole benchmark: {r['total_s']} s wall-clock ({r.get('load_note', 'machine load not recorded')})."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

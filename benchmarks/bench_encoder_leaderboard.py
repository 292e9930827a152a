"""Encoders at patch and slide level in one run: self-supervised encoders vs a random init of the same network, paired.

    E=/tmp/gigaslide-bench-tile-ssl-defaults/mocov2-resnet18-96-15m/encoder
    .venv/bin/python benchmarks/bench_encoder_leaderboard.py --encoders $E@random,$E

What a user runs (``gigaslide benchmark``): each encoder's linear and 20-NN probes on PCam (train -> valid) and
ABMIL cross-validated on mosaic slides built from PCam train tiles (``gigaslide mosaic``), then every encoder
minus the first, paired on the same test tiles and the same slides (``gigaslide.evaluation.compare``).
``ENCODER@random`` is that export's architecture and input size with random weights: the SSL run's from-scratch
baseline. Writes ``benchmarks/results/encoder_leaderboard.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_result  # noqa: E402
from bench_tile_ssl import pcam_dir  # noqa: E402

SSL_RUN = "/tmp/gigaslide-bench-tile-ssl-defaults/mocov2-resnet18-96-15m/encoder"  # bench_tile_ssl.py's MoCo v2 run


def verdict_lines(paired: dict, baseline: str) -> list[str]:
    """One line per compared row (balanced accuracy, then AUC), computed from the paired CIs."""
    from gigaslide.evaluation.compare import verdict
    from gigaslide.evaluation.metrics import fmt_diff

    out = []
    for row, d in paired.items():
        enc, _, level = row.rpartition(": ")
        words = [f"{name} {verdict(d[m])} ({fmt_diff(d[m], p=False)})"
                 for m, name in (("balanced_accuracy", "balanced accuracy"), ("auc", "AUC"))]
        out.append(f"- {level}: `{enc}` vs `{baseline}`: {'; '.join(words)}")
    return out


def summary_lines(paired: dict) -> list[str]:
    """Per level (tile linear, tile 20-NN, slide MIL): how many encoders are better / not distinguishable / worse
    than the first, on balanced accuracy and on AUC."""
    from gigaslide.evaluation.compare import tally, verdict

    levels: dict[str, dict[str, list[str]]] = {}
    for row, d in paired.items():
        level = row.rpartition(": ")[2]
        for m in ("balanced_accuracy", "auc"):
            levels.setdefault(level, {}).setdefault(m, []).append(verdict(d[m]))
    out = []
    for level, ms in levels.items():
        parts = [f"{'balanced accuracy' if m == 'balanced_accuracy' else 'AUC'}: {tally(vs)}" for m, vs in ms.items()]
        out.append(f"- {level}, {len(next(iter(ms.values())))} encoder(s) vs the first: {'; '.join(parts)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default=f"{SSL_RUN}@random,{SSL_RUN}",
                    help="comma-separated, the first is the baseline; ENCODER@random: that export with random weights")
    ap.add_argument("--slides", type=int, default=60, help="mosaic slides (half positive)")
    ap.add_argument("--tumor-fraction", default="0.05-0.2", help="tumour share of a positive slide's tissue tiles")
    ap.add_argument("--max-tiles-per-class", type=int, default=1000, help="PCam tiles per class for the probes")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/gigaslide-bench-encoder-leaderboard")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from gigaslide.evaluation.compare import comparison_markdown
    from gigaslide.mil.benchmark import leaderboard_markdown, run_benchmark, split_weights
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, parse_range

    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    for e in encoders:
        model = split_weights(e)[0]
        if ("/" in model or os.sep in model) and not (Path(model) / "encoder.json").is_file():
            sys.exit(f"{model}: no encoder export here -- run benchmarks/bench_tile_ssl.py first (or pass --encoders)")
    pcam = pcam_dir()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    work = Path(args.work)
    cfg = MosaicConfig(slides=args.slides, tumor_fraction=parse_range(args.tumor_fraction), seed=0)
    build_mosaic(pcam / "train", work / "mosaic", cfg, verbose=False)
    rows = run_benchmark(encoders, work / "bench", tiles=pcam, slides=work / "mosaic", mpp=cfg.mpp, tile_size=96,
                         folds=args.folds, epochs=args.epochs, max_tiles_per_class=args.max_tiles_per_class,
                         n_bootstrap=args.bootstrap, seed=0, verbose=False)
    paired = json.loads((work / "bench" / "leaderboard.json").read_text())["paired_vs_first"]
    total = time.perf_counter() - t0
    timing = [f"| `{r['encoder']}` | {r.get('tile_encode_seconds')} | {r.get('slide_encode_seconds')} | "
              f"{statistics.median(r['slide']['seconds_per_fold']):.1f} |" for r in rows]
    lines = [
        "# Encoders at patch and slide level: SSL encoders vs a random init of the same network, paired "
        "(`gigaslide benchmark`)", "",
        f"Load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} cores, "
        f"{args.threads} torch threads. Wall time {total / 60:.1f} min (finished parts in `{args.work}` are reused: "
        "their times below are those of reading them back).",
        "",
        f"Patch level: linear and 20-NN probes fitted on ≤ {args.max_tiles_per_class} PCam train tiles per class, "
        f"tested on ≤ {args.max_tiles_per_class} PCam valid tiles per class (96 px, 0.97 µm/px). Slide level: "
        f"{args.slides} mosaic slides of PCam train tiles (half positive, tumour {args.tumor_fraction} of a positive "
        f"slide's tissue tiles, `MosaicConfig` seed 0), encoded by `gigaslide encode`, ABMIL {args.folds}-fold "
        f"cross-validated (≤ {args.epochs} epochs); the attention-localisation AUC is against the mosaic's tumour "
        "tiles. An encoder pre-trained by `bench_tile_ssl.py` (the default ones) saw the unlabelled PCam train tiles, "
        "so the mosaic's tiles were in its (label-free) training data: the user's own-data setting, not a "
        "held-out-domain test. Paired rows: the "
        "encoder minus the first one on the same test tiles / the same slides (bootstrap "
        f"{args.bootstrap} resamples, slides stratified by label).", "",
        leaderboard_markdown(rows), comparison_markdown(paired, rows[0]["encoder"], "test tiles / slides"),
        "Verdicts (computed from the paired rows above):", "", *summary_lines(paired), "",
        *verdict_lines(paired, rows[0]["encoder"]), "",
        "| encoder | tile embedding s | slide encoding s | ABMIL s per fold (median) |", "|---|---|---|---|",
        *timing, "",
    ]
    print(write_result("encoder_leaderboard", "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()

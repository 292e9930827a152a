"""Fine-tune evaluation on real PCam tiles: a self-supervised encoder vs a random init of the same
architecture, fine-tuned end to end on 1 %, 10 % and 100 % of the training labels.

    .venv/bin/python benchmarks/bench_tile_finetune.py --encoders random,/tmp/gigaslide-bench-tile-ssl-defaults/simclr-resnet18-96-15m/encoder

``random`` is a randomly initialised ResNet-18 exported at ``--tile-size`` (the same architecture and
input size as the SSL runs of ``bench_tile_ssl.py``). Every encoder is fine-tuned with the same
settings (``gigaslide.ssl.tile.finetune``) and tested on PCam valid with bootstrap 95 % CIs.
Writes the ``finetune`` section of ``benchmarks/results/tile_ssl.md`` (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tile_ssl import ci, cpu_name, dci, merge_section, pcam_dir, random_trunk, verdict  # noqa: E402

from gigaslide import atomic  # noqa: E402


def random_encoder(folder: Path, backbone: str, tile_size: int) -> Path:
    """A random-init ``backbone`` exported at ``tile_size`` (seed 0), like the SSL runs' starting point."""
    from gigaslide.encoders.model import export_encoder

    return export_encoder(folder, *random_trunk(backbone, tile_size))


def verdict_lines(verdicts: dict[str, list[str]]) -> list[str]:
    """One line per label fraction: how many encoders are better / not distinguishable / worse than random init."""
    from gigaslide.evaluation.compare import tally

    return [f"- {proto.removeprefix('finetune_')} labels: of {len(vs)} SSL encoders, {tally(vs)}"
            for proto, vs in verdicts.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default="random,/tmp/gigaslide-bench-tile-ssl-defaults/simclr-resnet18-96-15m/encoder",
                    help="comma-separated: 'random' and/or encoder export folders (default: bench_tile_ssl.py's SimCLR run)")
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=96, help="PCam's native size, as bench_tile_ssl.py")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/gigaslide-bench-tile-finetune")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tile_ssl.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pcam = pcam_dir()
    from gigaslide.ssl.tile.finetune import FinetuneConfig, compare_reports, finetune_tiles

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    work = Path(args.work)
    reused = len(list(work.glob("finetune_*/fraction_*/result.json")))  # finished in an earlier invocation
    fractions = tuple(float(f) for f in args.fractions.split(","))
    cfg = FinetuneConfig(fractions=fractions, epochs=args.epochs, batch_size=args.batch_size, precision=args.precision,
                         workers=1, n_bootstrap=args.bootstrap)
    rows = []
    for name in args.encoders.split(","):
        if name != "random" and not (Path(name) / "encoder.json").is_file():
            sys.exit(f"{name}: no encoder export here -- run benchmarks/bench_tile_ssl.py first (or pass --encoders)")
    base: dict | None = None  # the random init's report: every other encoder is compared with it, paired
    verdicts: dict[str, list[str]] = {}  # label fraction -> each encoder's verdict vs random init
    for k, name in enumerate(args.encoders.split(",")):
        enc = str(random_encoder(work / "random-encoder", args.backbone, args.tile_size)) if name == "random" else name
        label = f"random init ({args.backbone})" if name == "random" else f"`{name}`"
        rep = finetune_tiles(pcam / "train", pcam / "valid", enc, work / f"finetune_{k}", cfg=cfg)
        base = rep if name == "random" else base
        diffs = {} if base is None or base is rep else compare_reports(rep, base, n_bootstrap=args.bootstrap)
        for proto, r in rep["protocols"].items():
            vs = ["-", "-"]
            if d := diffs.get(proto):
                vs = [dci(d["balanced_accuracy"]), dci(d["auc"])]
                verdicts.setdefault(proto, []).append(verdict(d["balanced_accuracy"]))
            rows.append(f"| {label} | {proto.removeprefix('finetune_')} ({r['n_labels']} labels) | {r['epochs_run']} "
                        f"(best {r['best_epoch']}) | {r['train_images_per_s']} | {ci(r['balanced_accuracy'])} | "
                        f"{vs[0]} | {ci(r['auc'])} | {vs[1]} | {ci(r['macro_f1'])} |")
            print(rows[-1], flush=True)
    total = time.perf_counter() - t_start
    cmd = "`.venv/bin/python benchmarks/bench_tile_finetune.py " + shlex.join(sys.argv[1:]) + "`"
    lines = [
        f"## Fine-tune evaluation: SSL encoder vs random init, {' / '.join(f'{f * 100:g} %' for f in fractions)} of "
        "PCam labels", "",
        f"Command: {cmd}  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end), "
        f"{args.threads} torch threads, no GPU. Total wall time {total / 60:.1f} min"
        + (f" ({reused} fine-tuned results reused from an earlier invocation in `{args.work}`: their epochs and img/s "
           "are from the run that trained them; their test predictions are scored here)." if reused else "."), "",
        f"Setup (`gigaslide evaluate finetune`): the whole {args.backbone} plus a linear head trained end to end on a "
        f"stratified fraction of the 10,000 PCam train tiles (resized to {args.tile_size} px), 20 % of those labels held "
        f"out for model selection (lowest validation loss, early stopping, patience 3), AdamW (encoder lr 1e-4, head "
        f"1e-3, warm-up + cosine), batch {args.batch_size}, at most {args.epochs} epochs, {args.precision} autocast, "
        "flips / 90° rotations / light stain jitter. Tested on PCam valid (3000 tiles); 95 % bootstrap CIs; Δ = the "
        "encoder minus random init at the same label fraction, paired bootstrap on the same test tiles "
        f"({args.bootstrap} resamples; p two-sided).", "",
        "| encoder | labels | epochs run | train img/s | balanced acc. | Δ bal. acc. vs random (paired) | AUC | "
        "Δ AUC vs random (paired) | macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        *([] if not verdicts else ["Verdicts (balanced accuracy vs random init, paired, computed from the rows above):",
                                   "", *verdict_lines(verdicts), ""]),
    ]
    atomic.write_text(args.out, merge_section(Path(args.out), "finetune", "\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

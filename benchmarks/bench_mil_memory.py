"""`train-mil` on a cohort of bags: peak memory and time with every bag in memory vs a bag budget below the cohort.

Before ``gigaslide.mil.bags`` every slide's features were loaded as float32 tensors before training
(1,000 slides x 10,000 tiles x 1,024-d = 41 GB, over this machine's 24 GB). Now a bag is read from its
file when first used and kept while the kept bags fit in ``--bag-memory-gb`` (default: half of the
available memory); the others are read at every use.

Synthetic cohorts of two sizes (float32 HDF5 feature files as `encode` writes them, a planted signal in
a few tiles of the positive slides), ``run_cv`` with the same settings under each budget, each in a fresh
process: peak RSS of that process minus that of a process that only opens the folder (imports,
coordinates, attributes), how that grows with the cohort, wall time, and whether the predictions are
byte-identical to the first budget's. The files were just written, so reads come from the OS page
cache; on a cold disk each bag read at every use costs a disk read.

    .venv/bin/python benchmarks/bench_mil_memory.py [--slides 75,150 --tiles 5000 --dim 1024 --budgets auto,1,0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import load_note, run_child_peak_rss, write_result  # noqa: E402

TRAIN = dict(model="abmil", epochs=3, patience=10, hidden=64)


def make_cohort(folder: Path, slides: int, tiles: int, dim: int, seed: int = 0) -> Path:
    """``folder/features/*.h5`` + ``folder/labels.csv``: half the slides positive, 5 % of their tiles shifted."""
    from gigaslide.features import store

    rng = np.random.default_rng(seed)
    rows = ["slide_id,patient_id,label"]
    for i in range(slides):
        y = i % 2
        x = rng.standard_normal((tiles, dim), dtype=np.float32)
        if y:
            x[: max(1, tiles // 20), :8] += 1.5
        store.save(folder / "features" / f"s{i:04d}.h5", x, rng.integers(0, 50_000, (tiles, 2)),
                   attrs={"encoder": "synthetic", "slide_id": f"s{i:04d}", "mpp": 0.5, "tile_size": 224})
        rows.append(f"s{i:04d},p{i:04d},{y}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _child_code(folder: Path, out: Path, budget: str | None) -> str:
    if budget is None:  # the baseline: open the folder only
        return (f"from gigaslide.mil.cv import load_bags\nload_bags({str(folder / 'features')!r})\n")
    return (
        "import json, time, torch\n"
        "torch.set_num_threads(1)\n"
        "from gigaslide.mil.cv import run_cv\nfrom gigaslide.mil.train import TrainConfig\n"
        "t = time.perf_counter()\n"
        f"run_cv({str(folder / 'features')!r}, {str(folder / 'labels.csv')!r}, {str(out)!r}, "
        f"cfg=TrainConfig(**{TRAIN!r}), folds=2, n_bootstrap=200, bag_memory_gb={budget!r}, verbose=False)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t}))\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", default="75,150", help="cohort sizes (slides), each its own cohort")
    ap.add_argument("--tiles", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--budgets", default="auto,1,0", help="bag budgets in GB (auto = half the available memory); "
                    "the first is the reference of each cohort")
    ap.add_argument("--topic", default="mil_memory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-milmem-"))
    rows = []
    try:
        for n in (int(v) for v in args.slides.split(",")):
            folder = make_cohort(work / f"cohort-{n}", n, args.tiles, args.dim)
            base_gb, _ = run_child_peak_rss(_child_code(folder, work, None))
            for b in args.budgets.split(","):
                out = work / f"run-{n}-{b}"
                peak, stdout = run_child_peak_rss(_child_code(folder, out, b))
                rec = json.loads((out / "run.json").read_text())
                preds = b"".join((out / f"fold{k}" / "predictions.csv").read_bytes() for k in range(2))
                ev = json.loads((out / "evaluation.json").read_text())
                rows.append({"slides": n, "cohort_gb": n * args.tiles * args.dim * 4 / 1e9, "budget": b,
                             "peak_gb": peak, "base_gb": base_gb, "bags": rec["bags"],
                             "seconds": json.loads(stdout.strip().splitlines()[-1])["seconds"],
                             "auc": ev["metrics"]["auc"]["value"], "preds_sha": hashlib.sha256(preds).hexdigest()})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "bags"}), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.topic, render(rows, args))


def _budget(b: str) -> str:
    return "auto (half the available memory)" if b == "auto" else f"{float(b):g} GB"


def render(rows: list[dict], args: argparse.Namespace) -> str:
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    lines = ["# `train-mil` on a cohort larger than its bag budget: memory and time", "",
             f"Synthetic cohorts of {args.slides} slides × {args.tiles} tiles × {args.dim}-d float32 HDF5 files; `run_cv` "
             f"({TRAIN['model']}, hidden {TRAIN['hidden']}, {TRAIN['epochs']} epochs, 2 folds, 1 torch thread) under "
             "each bag budget, each in a fresh process. **Above opening** = that process's peak RSS minus the peak of a "
             "process that only opens the folder (imports, coordinates, attributes); **beyond the kept bags** = above "
             "opening minus the bags kept in memory (the model, one bag and its temporaries, and what `malloc` keeps of "
             f"freed blocks). Reads come from the page cache (files just written). Load: {load_note()}.", "",
             "| slides | features GB | bag budget | bags kept in memory | kept GB | bag reads from disk | peak RSS GB | "
             "above opening GB | beyond the kept bags GB | time s | AUC | predictions identical to the first budget's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, ref = r["bags"], next(x for x in rows if x["slides"] == r["slides"])
        above = r["peak_gb"] - r["base_gb"]
        lines.append(f"| {r['slides']} | {r['cohort_gb']:.2f} | {_budget(r['budget'])} | {b['kept_bags']} of {b['bags']} | "
                     f"{b['kept_bytes'] / 1e9:.2f} | {b['reads']} | {r['peak_gb']:.2f} | {above:.2f} | "
                     f"{above - b['kept_bytes'] / 1e9:.2f} | {r['seconds']:.1f} | {r['auc']:.3f} | "
                     f"{'yes' if r['preds_sha'] == ref['preds_sha'] else 'NO'} |")
    lines += ["", "Verdicts (computed from the rows above):", ""]
    sizes = sorted({r["slides"] for r in rows})
    for b in budgets:
        rs = {r["slides"]: r for r in rows if r["budget"] == b}
        if len(sizes) > 1 and sizes[0] in rs and sizes[-1] in rs:
            lo, hi = rs[sizes[0]], rs[sizes[-1]]
            grow = ((hi["peak_gb"] - hi["base_gb"]) - (lo["peak_gb"] - lo["base_gb"])) / (hi["cohort_gb"] - lo["cohort_gb"])
            lines.append(f"- budget {_budget(b)}: from {sizes[0]} to {sizes[-1]} slides, memory above opening grows by "
                         f"{grow:.2f} GB per GB of features added ({lo['peak_gb'] - lo['base_gb']:.2f} → "
                         f"{hi['peak_gb'] - hi['base_gb']:.2f} GB).")
    for n in sizes:
        ref = next(r for r in rows if r["slides"] == n)
        for r in (x for x in rows if x["slides"] == n and x is not ref):
            lines.append(f"- {n} slides, budget {_budget(r['budget'])} vs {_budget(ref['budget'])}: time "
                         f"×{r['seconds'] / ref['seconds']:.2f}, {r['bags']['reads']} bag reads instead of "
                         f"{ref['bags']['reads']}; predictions "
                         f"{'identical' if r['preds_sha'] == ref['preds_sha'] else 'DIFFERENT'}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

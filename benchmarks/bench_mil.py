"""MIL benchmark on mosaic slides built from PCam train tiles, processed by the normal spine.

    .venv/bin/python benchmarks/bench_mil.py [--slides 120] [--grid 16] [--quick]

1. ``gigaslide mosaic``: two CAMELYON-like mosaics from ``tiles/pcam/train`` (tumour fraction 2 %
   and 10 % of the tissue tiles in positive slides, half the slides positive).
2. ``gigaslide encode`` (``encode_slides``): tiled at 0.97 um/px, 96 px tiles, ResNet-18 with
   **random initialisation** exported at 96 px input (no pretrained weights are available
   offline; random-init CNN features are the honest baseline here, not a pathology encoder).
3. ``gigaslide train-mil`` (``run_cv``): every MIL model, 5-fold stratified CV, full training folds
   and few-shot n = 50 training slides (3 draws per fold), AUC and balanced accuracy with 95 %
   bootstrap CIs, attention-localisation AUC against the mosaic ground truth, seconds per fold.
4. Tile level for the same encoder: linear probe and 20-NN on PCam train -> valid.
5. TransMIL with the paper's Nystrom attention (``--model-args '{"attention": "nystrom"}'``, model name
   ``transmil:nystrom`` here) against exact attention, paired on the same out-of-fold test slides.

Writes benchmarks/results/mil.md. Intermediate artefacts go to --work (default /tmp/gigaslide_bench_mil)
and are reused when the script is re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gigaslide.evaluation.metrics import fmt_ci  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402

MODELS = ["mean", "max", "abmil", "clam_sb", "clam_mb", "transmil", "transmil:nystrom"]
#: The exact-vs-approximate pair compared paired on the same test slides (model names as in --models).
ATTENTION_PAIR = ("transmil:nystrom", "transmil")


def train_config(model: str, **kw) -> "TrainConfig":  # noqa: ANN003, F821
    """``name`` or ``name:attention`` (TransMIL's attention kind, as ``--model-args '{"attention": ...}'``)."""
    from gigaslide.mil.train import TrainConfig

    name, _, attention = model.partition(":")
    return TrainConfig(model=name, model_kwargs={"attention": attention} if attention else {}, **kw)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_encoder(work: Path) -> str:
    from gigaslide.encoders import ENCODERS, create_trunk, export_encoder

    folder = work / "encoder_resnet18_random_96px"
    if not (folder / "encoder.json").is_file():
        spec = dataclasses.replace(ENCODERS.get("resnet18"), name="resnet18_random_96px", input_size=96, hub=None,
                                   weight_source="random init (torch seed 0)",
                                   description="ResNet-18, random weights, 96 px input (benchmark baseline)")
        torch.manual_seed(0)
        export_encoder(folder, create_trunk(spec), spec)
    return str(folder)


def reuse_identical_slides(prev: Path | None, cur: Path) -> int:
    """Negative slides are pixel-identical across the mosaics (same seed, same masks): link the
    features the spine already wrote for them instead of encoding the same pixels twice."""
    import hashlib

    if prev is None:
        return 0
    n = 0
    (cur / "encoded" / "features").mkdir(parents=True, exist_ok=True)
    for f in sorted((cur / "slides").glob("*.tiff")):
        src_slide, src_feat = prev / "slides" / f.name, prev / "encoded" / "features" / f"{f.stem}.h5"
        dst = cur / "encoded" / "features" / f"{f.stem}.h5"
        if dst.exists() or not src_feat.is_file() or not src_slide.is_file():
            continue
        if hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(src_slide.read_bytes()).digest():
            os.link(src_feat, dst)
            n += 1
    print(f"{cur.name}: reused the spine's features of {n} pixel-identical slides from {prev.name}")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--few-shot", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tile-cap", type=int, default=1000, help="PCam tiles per class and split for the tile probes")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--fractions", default="0.02,0.10")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--work", default="/tmp/gigaslide_bench_mil")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mil.md"))
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not for reporting)")
    a = ap.parse_args()
    if a.quick:
        a.slides, a.grid, a.folds, a.epochs, a.repeats, a.tile_cap, a.bootstrap = 24, 12, 3, 4, 1, 200, 100
        a.few_shot = 12
    data = shared_data_dir()
    if data is None:
        sys.exit("no ../shared/data: the benchmark needs PCam tiles")
    torch.set_num_threads(2)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from gigaslide.encoders import build_encoder
    from gigaslide.evaluation.tiles import evaluate_tile_features
    from gigaslide.features.extract import encode_slides
    from gigaslide.features.tiles import embed_tile_folder
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.heatmap import run_localisation
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic
    from gigaslide.slides import find_slides
    from gigaslide.tiling import TilingParams

    t_all = time.perf_counter()
    enc = build_encoder(make_encoder(work))
    timings: dict[str, float] = {}
    # tile level
    t0 = time.perf_counter()
    pcam = data / "tiles" / "pcam"
    tr = embed_tile_folder(enc, pcam / "train", work / "tiles" / f"train_{a.tile_cap}.h5", max_per_class=a.tile_cap)["out"]
    te = embed_tile_folder(enc, pcam / "valid", work / "tiles" / f"valid_{a.tile_cap}.h5", max_per_class=a.tile_cap)["out"]
    from gigaslide.features import store

    tile_rep = evaluate_tile_features(store.load(tr), store.load(te), ["linear", "knn"], n_bootstrap=a.bootstrap,
                                      out=work / "tile_report")
    timings["tile encode + probes"] = time.perf_counter() - t0
    print("tile level:", {p: round(tile_rep["protocols"][p]["auc"]["value"], 3) for p in ("linear", "knn")})

    results = []
    prev_mdir = None
    fractions = [float(f) for f in a.fractions.split(",")]
    for frac in fractions:
        mdir = work / f"mosaic_{int(round(frac * 100)):02d}pct_{a.slides}x{a.grid}"
        t0 = time.perf_counter()
        build_mosaic(pcam / "train", mdir, MosaicConfig(slides=a.slides, grid=a.grid, tumor_fraction=(frac, frac), seed=0),
                     verbose=False)
        timings[f"mosaic {frac:.0%}"] = time.perf_counter() - t0
        reuse_identical_slides(prev_mdir, mdir)
        prev_mdir = mdir
        t0 = time.perf_counter()
        res = encode_slides(find_slides([str(mdir / "slides")]), mdir / "encoded", enc, TilingParams(0.97, 96, 0, 0.25),
                            batch_size=128, workers=1, overlays=False)
        timings[f"encode {frac:.0%}"] = time.perf_counter() - t0
        if res.failed:
            print("encode failures:", res.failed)
        print(f"mosaic {frac:.0%}: encoded {res.tiles} tiles in {timings[f'encode {frac:.0%}']:.0f}s ({res.precision})")
        for model in a.models.split(","):
            for n in (None, a.few_shot):
                cfg = train_config(model, epochs=a.epochs, patience=a.patience, seed=0)
                run = mdir / "runs" / f"{model.replace(':', '-')}_{'full' if n is None else f'n{n}'}"
                t0 = time.perf_counter()
                ev = run_cv(mdir / "encoded" / "features", mdir / "labels.csv", run, cfg=cfg, folds=a.folds,
                            train_slides=n, repeats=1 if n is None else a.repeats, n_bootstrap=a.bootstrap, verbose=False)
                loc = run_localisation(run, mdir / "ground_truth", n_bootstrap=a.bootstrap)
                secs = ev["seconds_per_fold"]
                results.append({"fraction": frac, "model": model, "n": n, "auc": ev["metrics"]["auc"], "run": run,
                                 "bacc": ev["metrics"]["balanced_accuracy"], "loc": loc,
                                 "sec_fold": statistics.median(secs) if secs else float("nan"),
                                 "wall": time.perf_counter() - t0})
                r = results[-1]
                print(f"{frac:.0%} {model:8s} {('n=' + str(n)) if n else 'full':5s} AUC {fmt_ci(r['auc'])}  "
                      f"loc {fmt_ci(loc)}  {r['sec_fold']:.1f}s/fold")
    total = time.perf_counter() - t_all
    write_report(a, results, tile_rep, timings, total, enc)


def write_report(a, results, tile_rep, timings, total, enc) -> None:  # noqa: ANN001
    from gigaslide.atomic import write_text

    cmd = ".venv/bin/python benchmarks/bench_mil.py " + " ".join(sys.argv[1:])
    lines = [
        "# MIL on mosaic slides (PCam train tiles) -- slide-level benchmark", "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (1-min load average at the end {os.getloadavg()[0]:.1f}), no GPU; torch "
        f"{torch.__version__}. Total wall time {total / 60:.1f} min.", "",
        "## Setup", "",
        f"* Mosaic slides: {a.slides} per setting ({a.grid}x{a.grid} PCam tiles of 96 px = {a.grid * 96} px, "
        "mpp 0.97, half positive), built by `gigaslide mosaic` from `tiles/pcam/train` only. Positive slides contain "
        "one contiguous tumour region of 2 % or 10 % of the tissue tiles (PCam label-1 tiles), everything else "
        "is PCam label-0 tiles; tiles are reused across slides (random rotation/flip). Both mosaics use seed 0, so "
        "their negative slides are pixel-identical (checked by SHA-256) and are encoded once.",
        "* Processed by the spine (`encode_slides` = `gigaslide encode`): tissue detection, 96 px tiles at 0.97 um/px, "
        f"min tissue 0.25. Encoder: **ResNet-18 with random weights** at 96 px input (D={enc.embed_dim}) -- no "
        "pretrained weights are available offline, so these features are a weak, honest baseline; a pathology "
        "encoder should do far better.",
        f"* MIL: {a.folds}-fold stratified CV (patient = slide), early stopping on a 20 % validation split inside the "
        f"training folds (val loss, patience {a.patience}, max {a.epochs} epochs), Adam 1e-3, weighted CE, hidden 128, tile features z-scored with training-fold statistics. "
        f"Few-shot: n = {a.few_shot} training slides (incl. validation) drawn from each training fold, "
        f"{a.repeats} draws per fold (Giga-SSL protocol); metrics averaged over draws.",
        f"* AUC / balanced accuracy: pooled out-of-fold predictions, 95 % bootstrap CI (B={a.bootstrap}) resampling "
        "slides within folds. Attention localisation: per positive test slide, ROC AUC of the tile attention "
        "(instance score for mean/max) against the ground-truth tumour tiles; mean over slides with a bootstrap CI "
        "(repeat 0 only for few-shot).", "",
        "## Tile level (same encoder, PCam train -> valid"
        f"{'' if not a.tile_cap else f', <= {a.tile_cap} tiles per class'})", "",
        "| probe | AUC | balanced acc |", "|---|---|---|"]
    for p in ("linear", "knn"):
        r = tile_rep["protocols"][p]
        lines.append(f"| {p} | {fmt_ci(r['auc'])} | {fmt_ci(r['balanced_accuracy'])} |")
    lines += ["", "## Slide level", ""]
    for frac in sorted({r["fraction"] for r in results}):
        lines += [f"### Tumour fraction {frac:.0%}", "",
                  "| model | train | slide AUC [95 % CI] | balanced acc | attention loc. AUC | s / fold (median) |",
                  "|---|---|---|---|---|---|"]
        for r in (x for x in results if x["fraction"] == frac):
            lines.append(f"| {r['model']} | {'full' if r['n'] is None else 'n=' + str(r['n'])} | {fmt_ci(r['auc'])} | "
                         f"{fmt_ci(r['bacc'])} | {fmt_ci(r['loc'])} | {r['sec_fold']:.1f} |")
        lines.append("")
    lines += attention_pair_lines(a, results)
    lines += ["## Timings (wall, s)", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [""]
    write_text(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def attention_pair_lines(a, results: list[dict]) -> list[str]:  # noqa: ANN001
    """TransMIL Nystrom minus exact: slide AUC difference paired on the same pooled out-of-fold test slides (full
    training folds; one resample of the slides, stratified by label, for both), per tumour fraction."""
    import numpy as np

    from gigaslide.evaluation.metrics import paired_difference
    from gigaslide.evaluation.slides import read_predictions

    approx, exact = ATTENTION_PAIR
    runs = {(r["fraction"], r["model"]): r for r in results if r["n"] is None}
    fracs = sorted(f for f, m in runs if m == approx and (f, exact) in runs)
    if not fracs:
        return []
    out = ["## TransMIL: Nystrom vs exact attention (paired)", "",
           f"`{approx}` minus `{exact}`, full training folds: slide AUC difference on the same pooled out-of-fold "
           f"test slides, 95 % paired bootstrap CI (B={a.bootstrap}, one resample of the slides for both, "
           "stratified by label) and two-sided p; time per fold from the rows above.", "",
           "| tumour fraction | slides | AUC exact | AUC Nystrom | Δ AUC (Nystrom − exact) [95 % CI], p "
           "| s / fold exact | s / fold Nystrom |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for f in fracs:
        pe, pn = (read_predictions(runs[(f, m)]["run"] / "predictions.csv") for m in (exact, approx))
        order = {s: i for i, s in enumerate(pn.slide_ids)}
        idx = np.array([order[s] for s in pe.slide_ids])
        assert np.array_equal(pn.labels[idx], pe.labels)  # the same slides with the same labels
        y = pe.labels
        d = paired_difference(y, pn.probs[idx], pe.probs, "auc", n_bootstrap=a.bootstrap, seed=0, strata=y)
        re, rn = runs[(f, exact)], runs[(f, approx)]
        out.append(f"| {f:.0%} | {len(y)} | {re['auc']['value']:.3f} | {rn['auc']['value']:.3f} | "
                   f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p={d['p_value']:.3g} | "
                   f"{re['sec_fold']:.1f} | {rn['sec_fold']:.1f} |")
        if d["ci_low"] > 0:
            verdicts.append(f"{f:.0%}: Nystrom better")
        elif d["ci_high"] < 0:
            verdicts.append(f"{f:.0%}: Nystrom worse")
        else:
            verdicts.append(f"{f:.0%}: not distinguishable")
    out += ["", "Verdict (from the paired CIs above, 0 inside = not distinguishable): " + "; ".join(verdicts) + ".", ""]
    return out


if __name__ == "__main__":
    main()

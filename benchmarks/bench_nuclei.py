"""Nuclei instance segmentation on MoNuSeg (Kang et al. 2023's HoVer-Net experiment, reduced to CPU minutes).

Arms, each trained for the same wall-clock budget (or, with --arm-steps, the same number of optimiser
steps) on the same organ-stratified split (test images are never used for training or selection):
random-init ResNet-18, the project's own SSL-pretrained ResNet-18 (a `gigaslide pretrain` run on PCam
tiles: made here, or an existing run's encoder via --ssl-encoder), and the same SSL backbone frozen; at
100 % and ~20 % of the training images. Then whole-slide throughput and peak RSS on a generated slide
and on CMU-1-small-region.

    .venv/bin/python benchmarks/bench_nuclei.py                      # reduced run (~20 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_nuclei.py --arm-steps 300 --ssl-encoder RUN/encoder   # equal steps
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from gigaslide.devices import BF16_MIN_COSINE  # noqa: E402
from _common import RESULTS, load_note, run_child_peak_rss, stop_if_interrupted, write_result  # noqa: E402

from gigaslide.testing import make_slide, shared_data_dir  # noqa: E402

REFERENCE = {"dice": 0.826, "aji": 0.641, "pq": 0.597}  # HoVer-Net, GPU, ImageNet init, 30 MoNuSeg-train images


def pretrain(args: argparse.Namespace, data: Path) -> tuple[Path, dict]:
    """The SSL encoder of the SSL arms and its run summary: --ssl-encoder's, or a SimCLR run made here."""
    from gigaslide.ssl.tile.config import PretrainConfig
    from gigaslide.ssl.tile.engine import pretrain as run_pretrain

    if args.ssl_encoder:
        enc = Path(args.ssl_encoder)
        run_json = enc.parent / "run.json"
        summary = json.loads(run_json.read_text()).get("summary", {}) if run_json.is_file() else {}
        return enc, {**summary, "given": str(enc)}
    out = Path(args.work) / "ssl-simclr-resnet18"
    cfg = PretrainConfig(data=str(data / "tiles" / "pcam" / "train"), out=str(out), method="simclr", backbone="resnet18",
                         mpp=[0.97], tile_size=64, budget_s=args.pretrain_budget, batch_size=32, n_local=0, workers=1,
                         lr=1e-3, warmup_frac=0.1, data_kind="tiles", checkpoint_every_s=1e9, precision="bf16")
    s = stop_if_interrupted(run_pretrain(cfg))
    return out / "encoder", {**s, "crop_size": 64}


def describe_pretrain(ps: dict) -> str:
    """One phrase for the report, from the run's own summary."""
    what = (f"{ps.get('method', '?')} {ps.get('backbone', '?')}, {ps.get('steps', '?')} steps"
            f" ({ps.get('elapsed_s', float('nan')) / 60:.1f} min) on {ps.get('crop_size', '?')}-px crops of PCam train")
    return f"the given encoder `{ps['given']}` ({what})" if "given" in ps else f"pre-trained here: {what}"


def train_arm(args: argparse.Namespace, mon: Path, name: str, backbone: str, weights: str, freeze: bool,
              fraction: float) -> dict:
    from gigaslide.nuclei.evaluate import evaluate
    from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei

    out = Path(args.work) / f"arm-{name}-{int(fraction * 100)}"
    cfg = NucleiTrainConfig(images=str(mon / "images"), annotations=str(mon / "annotations"), out=str(out),
                            backbone=backbone, weights=weights, freeze_encoder=freeze, fraction=fraction,
                            budget_s=None if args.arm_steps else args.arm_budget,
                            epochs=1 if args.arm_steps else args.max_epochs,
                            steps_per_epoch=args.arm_steps or args.steps_per_epoch,
                            batch_size=4, crop=args.crop, lr=args.lr, precision=args.precision, seed=0)
    t = time.perf_counter()
    s = train_nuclei(cfg)
    train_s = time.perf_counter() - t
    cached = out / "test_report" / "report.json"
    if cached.is_file() and json.loads(cached.read_text()).get("bootstrap") == args.bootstrap:
        r = json.loads(cached.read_text())  # the finished run was scored already (a resumed benchmark)
    else:
        r = evaluate(out, mon / "images", mon / "annotations", out / "test_report", n_bootstrap=args.bootstrap,
                     precision="fp32")
    steps = sum(h["steps"] for h in s["history"])
    return {"name": name, "fraction": fraction, "train_images": s["train_images"], "val_images": s["val_images"],
            "steps": steps, "epochs": s["epochs"], "best_epoch": s["best_epoch"], "train_s": round(train_s, 1),
            "train_s_recorded": round(sum(h.get("seconds", 0.0) for h in s["history"]), 1),
            "precision": s["precision"]["resolved"], "test_images": r["images"], "metrics": r["metrics"],
            "per_image_pq": [row["pq"] for row in r["per_image"]], "run": str(out)}


def paired(a: dict, b: dict, n_boot: int) -> dict:
    """Mean per-image PQ difference b - a on the same test images, with a bootstrap CI over images."""
    from gigaslide.evaluation.metrics import bootstrap_ci

    # images where PQ is undefined on either side (no nucleus in truth or prediction: None) are left out
    both = [(x, y) for x, y in zip(a["per_image_pq"], b["per_image_pq"]) if x is not None and y is not None]
    if not both:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "wins": 0, "n": 0}
    d = np.array([y for _, y in both]) - np.array([x for x, _ in both])
    idx = np.arange(len(d))
    lo, hi = bootstrap_ci(lambda y, _p: float(d[y].mean()), idx, np.zeros(len(d)), n_bootstrap=n_boot)
    return {"mean": float(d.mean()), "ci_low": lo, "ci_high": hi, "wins": int((d > 0).sum()), "n": len(d)}


def throughput(run: Path, slide: Path, out: Path, slide_mpp: float | None, precision: str = "auto",
               threads: int = 2) -> dict:
    code = (f"import torch, json, time; torch.set_num_threads({threads})\n"
            f"from gigaslide.nuclei.slide import segment_slides, SlideParams\n"
            f"t=time.perf_counter(); r=segment_slides([{str(slide)!r}], {str(run)!r}, {str(out)!r}, "
            f"SlideParams(precision={precision!r}), slide_mpp={slide_mpp!r})\n"
            f"print(json.dumps({{'nuclei': r.nuclei, 'mp': r.megapixels, 's': time.perf_counter()-t, 'failed': r.failed}}))\n")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    rss, stdout = run_child_peak_rss(code, timeout=900)
    d = json.loads(stdout.strip().splitlines()[-1])
    from gigaslide.nuclei.slide import outputs
    from gigaslide.slides import slide_id_from_path

    record = outputs(out, slide_id_from_path(slide))["record"]
    rec = json.loads(record.read_text()) if record.is_file() else {}  # none when the slide was refused
    return {"slide": slide.name, "precision": precision, "resolved": rec.get("precision", {}).get("resolved", "-"),
            "bf16_cosine": rec.get("precision", {}).get("bf16_cosine"), "nuclei": d["nuclei"], "megapixels": round(d["mp"], 2), "seconds": round(d["s"], 1),
            "nuclei_per_s": round(d["nuclei"] / d["s"], 1), "mp_per_s": round(d["mp"] / d["s"], 3),
            "peak_rss_gb": round(rss, 2), "failed": d["failed"], "slide_mpp_override": slide_mpp}


def outline_png(run: Path, mon: Path, image_id: str, path: Path) -> None:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    from gigaslide.nuclei.data import find_pairs, load_item
    from gigaslide.nuclei.evaluate import predict_item
    from gigaslide.nuclei.infer import load_model

    model = load_model(run)
    pair = next(p for p in find_pairs(mon / "images", mon / "annotations")[0] if p.id == image_id)
    item = load_item(pair, model.spec.mpp)
    pred, _ = predict_item(model, item)
    img = item_img = np.asarray(Image.open(pair.image).convert("RGB")).copy()
    img[find_boundaries(item.inst_orig, mode="inner")] = (0, 200, 0)
    img[find_boundaries(pred, mode="inner")] = (255, 255, 0)
    crop = img[:400, :400]
    del item_img
    Image.fromarray(crop).quantize(64).save(path, optimize=True)


def fmt(d: dict) -> str:
    v = d["value"]
    return "n/a" if v is None or v != v else f"{v:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arm-budget", type=float, default=75.0, help="training seconds per arm")
    ap.add_argument("--pretrain-budget", type=float, default=120.0, help="SSL pre-training seconds (PCam, SimCLR)")
    ap.add_argument("--ssl-encoder", default=None,
                    help="an exported `gigaslide pretrain` encoder (RUN/encoder) for the SSL arms, instead of pre-training here")
    ap.add_argument("--arm-steps", type=int, default=None,
                    help="equal compute: train every arm for exactly N steps (one epoch) instead of --arm-budget seconds")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--steps-per-epoch", type=int, default=1000, help="(default: the budget ends the first epoch)")
    ap.add_argument("--crop", type=int, default=128, help="training crop px (HoVer-Net: 256 or more)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", default="1.0,0.2")
    ap.add_argument("--slide-size", type=int, default=2500, help="side of the generated slide (px at 0.25 µm/px)")
    ap.add_argument("--work", default="/tmp/gigaslide-bench-nuclei")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found")
    mon = data / "nuclei" / "monuseg2018-test"
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    enc, ps = pretrain(args, data)
    print("pretrain:", describe_pretrain(ps), flush=True)
    arms = []
    ssl_name = f"SSL (PCam {ps.get('method', 'simclr')})"
    for frac in [float(f) for f in args.fractions.split(",")]:
        for name, bb, w, fr in (("random init", "resnet18", "random", False), (ssl_name, str(enc), "default", False),
                                ("SSL frozen", str(enc), "default", True)):
            a = train_arm(args, mon, name, bb, w, fr, frac)
            arms.append(a)
            print(name, frac, a["steps"], "steps", fmt(a["metrics"]["image_mean"]["pq"]), flush=True)
    best = max((a for a in arms if a["fraction"] == 1.0), key=lambda a: a["metrics"]["image_mean"]["pq"]["value"])
    gen = make_slide(Path(args.work) / "generated.tiff", (args.slide_size, args.slide_size), mpp=0.25, seed=1)
    cmu = data / "slides" / "cmu-1-small-region.svs"
    thr = []
    for slide, smpp, tag in ((gen, None, "gen"), (cmu, 0.25, "cmu")):
        for prec in ("fp32", "auto"):  # side by side: the same model and slide, one precision after the other
            thr.append(throughput(Path(best["run"]), slide, Path(args.work) / f"slide-{tag}-{prec}", smpp, prec, args.threads))
    refused = throughput(Path(best["run"]), cmu, Path(args.work) / "slide-cmu-refused", None, "fp32", args.threads)
    from gigaslide.nuclei.evaluate import evaluate

    bf = evaluate(Path(best["run"]), mon / "images", mon / "annotations", Path(best["run"]) / "test_report_bf16",
                  n_bootstrap=args.bootstrap, precision="bf16")
    best_bf16 = {**best, "metrics": bf["metrics"], "per_image_pq": [row["pq"] for row in bf["per_image"]]}
    png = RESULTS / "nuclei_outlines.png"
    outline_png(Path(best["run"]), mon, best["test_images"][0], png)
    total = time.perf_counter() - t0
    # ---- report (every number below comes from the rows measured above)
    L = ["# Nuclei instance segmentation (HoVer-Net-style, MoNuSeg)", "",
         f"**Reduced run on a 2-core CPU** ({load_note()}; {args.threads} torch threads). SSL backbone: "
         f"{describe_pretrain(ps)}; then "
         f"{str(args.arm_steps) + ' steps' if args.arm_steps else f'{args.arm_budget:.0f} s'} of training per "
         f"arm ({args.crop}-px crops, batch 4, AdamW lr {args.lr}); {total / 60:.1f} min wall-clock for this invocation"
         + (" (arms finished by an earlier invocation with the same settings were reused: column *train s* is what "
            "each run recorded while training)" if any(a["train_s"] < 0.5 * a["train_s_recorded"] for a in arms) else "")
         + ". "
         f"Data: the {len(arms[0]['test_images']) + arms[0]['train_images'] + arms[0]['val_images']} shared MoNuSeg-2018 "
         f"images (1000², 0.2527 µm/px, resampled to 0.25), split by image, organ-stratified, fixed (seed 0): "
         f"test = {', '.join(arms[0]['test_images'])} (never used for training or selection); "
         + ("the budget ended the first epoch of every arm, so the model is the last (and only) epoch's "
            "(validation PQ is recorded but selected nothing)." if all(a["epochs"] == 1 for a in arms)
            else "best epoch by validation PQ."),
         "", "| arm | train images | steps | train s | PQ | AJI | Dice | F1 (IoU 0.5) | SQ |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        m = a["metrics"]["image_mean"]
        L.append(f"| {a['name']} | {a['train_images']} ({a['fraction']:.0%}) | {a['steps']} | {a['train_s_recorded']:.0f} | "
                 f"{fmt(m['pq'])} | {fmt(m['aji'])} | "
                 f"{fmt(m['dice'])} | {fmt(m['f1'])} | {fmt(m['sq'])} |")
    steps = [a["steps"] for a in arms]
    if min(steps) == max(steps):
        L += ["", f"**Equal compute:** every arm ran {steps[0]} optimiser steps (column *steps*)."]
    else:
        L += ["", f"**Unequal compute:** budgets are wall-clock, so the arms got {min(steps)} to {max(steps)} optimiser "
                  f"steps (column *steps*); the comparisons below (SSL vs random, 100 % vs 20 %) are confounded by that."]
    L[-1] += " The throughput model is the 100 % arm with the highest test PQ (used for timing only)."
    L += ["", "Values are means over the test images with percentile-bootstrap 95 % CIs over images "
              "(pooled values are in each run's `test_report/report.json`). PQ = DQ × SQ at IoU > 0.5; F1 at IoU 0.5 equals DQ.", ""]
    L += ["Paired comparisons (same test images; mean per-image PQ difference, bootstrap CI over images):", ""]
    verdicts, losses = [], []
    for frac in sorted({a["fraction"] for a in arms}, reverse=True):
        by = {a["name"]: a for a in arms if a["fraction"] == frac}
        for other in (ssl_name, "SSL frozen"):
            p = paired(by["random init"], by[other], args.bootstrap)
            shows, worse = p["ci_low"] > 0, p["ci_high"] < 0
            word = "gain shows" if shows else (f"worse than random init (CI below 0, over only {p['n']} images)"
                                               if worse else "no significant difference")
            L.append(f"- {frac:.0%} of training images, {other} − random init: {p['mean']:+.3f} "
                     f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], better on {p['wins']}/{p['n']} images → {word}")
            verdicts.append(shows)
            losses.append(worse)
    ref_best = best["metrics"]["image_mean"]
    L += ["", f"Reference (HoVer-Net, GPU, ImageNet init, all 30 MoNuSeg-train images): Dice {REFERENCE['dice']}, "
              f"AJI {REFERENCE['aji']}, PQ {REFERENCE['pq']}. The best CPU arm here ({best['name']}, {best['train_images']} images, "
              f"{best['steps']} steps) reaches PQ {ref_best['pq']['value']:.3f} = {ref_best['pq']['value'] / REFERENCE['pq']:.0%} "
              f"of the reference, Dice {ref_best['dice']['value']:.3f}, AJI {ref_best['aji']['value']:.3f}.",
          f"Verdict: the SSL gain {'shows in ' + str(sum(verdicts)) + ' of ' + str(len(verdicts)) + ' paired comparisons' if any(verdicts) else 'does not show at this scale'}"
          + (f"; SSL is worse than random init in {sum(losses)} of {len(losses)}" if any(losses) else "")
          + f" "
          f"(only {len(best['per_image_pq'])} test images: CIs are wide; CPU training of at most {max(steps)} steps, far from convergence).", ""]
    L += [f"## Whole-slide inference (best arm, tissue-only, regions of 1024² + 64 px margin, 512-px windows, "
          f"{args.threads} torch threads)", "",
          "`--precision auto` (the default of `gigaslide nuclei`) runs bf16 autocast on a CPU with native bf16 when the NP and HV logits of "
          f"the first region's most stained window in bf16 agree with fp32 (cosine >= {BF16_MIN_COSINE}), else fp32; "
          "each row is its own process, fp32 and auto one after the other on the same slide.", "",
          "| slide | precision (resolved, cosine) | nuclei | megapixels (regions) | seconds | nuclei/s | MP/s | peak RSS GB |",
          "|---|---|---|---|---|---|---|---|"]
    for t in thr:
        note = " (read as 0.25 µm/px via --slide-mpp to measure throughput)" if t["slide_mpp_override"] else ""
        cos = f", {t['bf16_cosine']:.6f}" if t["bf16_cosine"] is not None else ""
        L.append(f"| {t['slide']}{note} | {t['precision']} ({t['resolved']}{cos}) | {t['nuclei']} | {t['megapixels']} | "
                 f"{t['seconds']} | {t['nuclei_per_s']} | {t['mp_per_s']} | {t['peak_rss_gb']} |")
    L.append("")
    for tag in sorted({t["slide"] for t in thr}):
        f32 = next(t for t in thr if t["slide"] == tag and t["precision"] == "fp32")
        au = next(t for t in thr if t["slide"] == tag and t["precision"] == "auto")
        L.append(f"- {tag}: auto ({au['resolved']}) runs at {au['mp_per_s'] / f32['mp_per_s']:.2f}× the MP/s of fp32.")
    pb = paired(best, best_bf16, args.bootstrap)
    m32, m16 = best["metrics"]["image_mean"], best_bf16["metrics"]["image_mean"]
    L += [f"- Accuracy of bf16 on the test images (best arm, same images, bf16 − fp32): PQ {m16['pq']['value']:.4f} vs "
          f"{m32['pq']['value']:.4f}, mean per-image difference {pb['mean']:+.4f} [{pb['ci_low']:+.4f}, {pb['ci_high']:+.4f}]; "
          f"Dice {m16['dice']['value']:.4f} vs {m32['dice']['value']:.4f}.", ""]
    L += ["", f"CMU-1-small-region at its real resolution (0.499 µm/px) is refused, as it must be for a 0.25 µm/px model: "
              f"`{next(iter(refused['failed'].values()), 'NOT REFUSED')}`", "",
          f"![outlines](nuclei_outlines.png) — `nuclei_outlines.png`: predicted outlines (yellow) and ground truth (green) "
          f"on {best['test_images'][0]} (test image, top-left 400²).", ""]
    (Path(args.work) / "nuclei.json").write_text(json.dumps({"arms": arms, "throughput": thr, "pretrain": ps,
                                                             "best_bf16": best_bf16}, default=str, indent=1))
    print(write_result("nuclei", "\n".join(L)))


if __name__ == "__main__":
    main()

"""DINOv2 continued pre-training (Roth et al. 2024) in miniature, on real tissue, side by side in one run.

Roth et al. continue DINOv2 training of a pre-trained ViT on the user's own tiles and find that a
short continuation beats both the frozen foundation model and training from scratch. Here, with no
downloadable weights, the mechanism is reproduced at small scale:

1. a "foundation" ViT (``vit_tiny_dinov2``: ViT-Ti/14, DINOv2 layout) is pre-trained with
   ``--method dinov2`` for budget B on one source of real tissue that is *not* PCam: crops of the real
   slides (CMU-1 small region) and of the MoNuSeg images (7 organs), resampled to PCam's ~0.97 µm/px;
2. it is continued (``--init FOUNDATION/encoder``) on the unlabelled PCam train tiles for budget b, and
   compared with the same architecture trained from scratch on PCam for B + b and with the foundation
   frozen; ablations of the continuation: iBOT off, KoLeo off, layer-wise lr decay 1.0 instead of 0.9;
3. frozen features are probed on PCam valid: 20-NN and linear (logistic regression) balanced accuracy
   and AUC with 95 % bootstrap CIs (``gigaslide.evaluation.tiles`` probes), paired bootstrap of
   differences on the same test tiles; training and embedding images/s.

Budgets are optimiser steps by default (fair on a shared machine) or wall-clock seconds
(``--foundation-budget-s`` / ``--continue-budget-s``)::

    .venv/bin/python benchmarks/bench_dinov2.py                                   # full miniature (~1-2 h on 2 quiet cores)
    .venv/bin/python benchmarks/bench_dinov2.py --foundation-steps 12 --continue-steps 6 --batch-size 16 \\
        --probe-train 600 --valid 1000                                             # smoke (~10 min on a busy machine)

Writes ``benchmarks/results/dinov2.md`` (+ ``dinov2.json``); runs go to ``--runs-dir`` and resume.
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
from bench_tile_ssl import load_split, pcam_dir, random_trunk  # noqa: E402

from gigaslide import atomic  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402

PCAM_MPP = 0.97
#: Heads shrunk for CPU minutes (the paper: 65,536 prototypes); recorded in the report.
HEADS = {"hidden_dim": 256, "bottleneck_dim": 64, "out_dim": 1024, "freeze_last_layer_steps": 2}


#: colorectal tile samples and their resolution (Kather et al. 2016: 150 px at 0.495 µm/px; NCT-CRC-HE-100K: 224 px
#: at 0.5 µm/px); their glob under the shared data's ``tiles`` folder
CRC_SAMPLES = {"kather2016-samples/*/*": 0.495, "nct-crc-he-samples/*": 0.5}


def foundation_tiles(out: Path, mpps: tuple[float, ...] = (PCAM_MPP,), tile: int = 96) -> Path:
    """Real non-PCam tissue, cut into ``tile``-px tiles at each of ``mpps`` (µm/px): the MoNuSeg images (0.2527 µm/px,
    7 organs), the CMU-1 slide and, where they hold a whole tile at that resolution, the colorectal tile samples."""
    from PIL import Image

    from gigaslide.slides import open_slide

    if out.is_dir() and len(list(out.glob("*.png"))) > 20:
        return out
    import shutil

    tmp = out.with_name(out.name + ".partial")  # a half-cut folder is never taken for a finished one
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted cut starts over
    tmp.mkdir(parents=True)
    data = shared_data_dir()
    n = 0

    def cut(rgb: np.ndarray, name: str) -> None:
        nonlocal n
        for y in range(0, rgb.shape[0] - tile + 1, tile * 3 // 4):
            for x in range(0, rgb.shape[1] - tile + 1, tile * 3 // 4):
                t = rgb[y:y + tile, x:x + tile]
                if (t.mean(-1) < 210).mean() >= 0.5:  # at least half stained tissue
                    Image.fromarray(t).save(tmp / f"{name}_{y}_{x}.png")
                    n += 1

    def resampled(im: Image.Image, src_mpp: float, mpp: float) -> np.ndarray:
        scale = src_mpp / mpp
        return np.asarray(im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS))

    for mpp in mpps:
        for f in sorted((data / "nuclei" / "monuseg2018-test" / "images").glob("*.png")):
            cut(resampled(Image.open(f), 0.2527, mpp), f"{mpp:g}_{f.stem}")
        for pattern, src_mpp in CRC_SAMPLES.items():
            for f in sorted((data / "tiles").glob(pattern)):
                cut(resampled(Image.open(f), src_mpp, mpp), f"{mpp:g}_crc_{f.stem}")
        with open_slide(data / "slides" / "cmu-1-small-region.svs") as s:
            w, h = s.dimensions
            cut(np.asarray(s.read_region((0, 0), (int(w * s.mpp / mpp), int(h * s.mpp / mpp)), mpp)), f"{mpp:g}_cmu1")
    if n < 20:
        sys.exit(f"only {n} foundation tiles found under {data}")
    tmp.rename(out)
    return out


def source_counts(folder: Path) -> dict[str, int]:
    """Foundation tiles per source and resolution, from the names :func:`foundation_tiles` gives them."""
    from collections import Counter

    def source(name: str) -> str:
        mpp, rest = name.split("_", 1)
        kind = "colorectal samples" if rest.startswith("crc_") else "CMU-1" if rest.startswith("cmu1") else "MoNuSeg"
        return f"{kind} at {mpp} µm/px"

    return dict(sorted(Counter(source(p.name) for p in folder.glob("*.png")).items()))


ROWS = {  # name: (what, extra PretrainConfig fields)
    "continued": ("foundation + dinov2 on PCam for b (LLRD 0.9)", {}),
    "scratch": ("dinov2 from random on PCam for B + b", {}),
    "ibot_off": ("continued, iBOT off", {"method_args": {"ibot_weight": 0.0}}),
    "koleo_off": ("continued, KoLeo off", {"method_args": {"koleo_weight": 0.0}}),
    "llrd_1.0": ("continued, layer-wise lr decay 1.0", {"layer_decay": 1.0}),
}


def train(name: str, runs: Path, data: Path, args, steps: int | None, budget_s: float | None, **kw) -> dict:  # noqa: ANN001
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    margs = {**HEADS, **kw.pop("method_args", {})}
    cfg = PretrainConfig(data=str(data), out=str(runs / name), method="dinov2", backbone=args.backbone,
                         tile_size=args.tile_size, batch_size=args.batch_size, n_local=args.n_local, steps=steps,
                         budget_s=budget_s, method_args=margs, data_kind="tiles", seed=args.seed, monitor_every=0,
                         log_every=max(1, (steps or 100) // 10), workers=args.workers, **kw)
    t0 = time.monotonic()
    s = stop_if_interrupted(pretrain(cfg))
    s["wall_s"] = round(time.monotonic() - t0, 1)
    return s


def probe_probs(enc, tr, te, seed: int = 0) -> dict:  # noqa: ANN001
    from gigaslide.evaluation.tiles import knn_probe, linear_probe
    from gigaslide.features.tiles import embed_arrays

    t0 = time.perf_counter()
    xtr, xte = embed_arrays(enc, tr[0], 128), embed_arrays(enc, te[0], 128)
    ips = (len(xtr) + len(xte)) / (time.perf_counter() - t0)
    lin, _ = linear_probe(xtr, tr[1], xte, 2, seed=seed)
    knn = knn_probe(xtr, tr[1], xte, 2, k=20)
    return {"linear": lin, "knn": knn, "embed_images_per_s": round(ips, 1)}


def main() -> None:  # noqa: PLR0915
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--foundation-steps", type=int, default=1500, help="budget B in optimiser steps")
    ap.add_argument("--continue-steps", type=int, default=300, help="budget b in optimiser steps")
    ap.add_argument("--foundation-budget-s", type=float, help="budget B in wall-clock seconds (instead of steps)")
    ap.add_argument("--continue-budget-s", type=float, help="budget b in wall-clock seconds (instead of steps)")
    ap.add_argument("--backbone", default="vit_tiny_dinov2")
    ap.add_argument("--tile-size", type=int, default=56, help="global crop / encoder input (a multiple of the patch, 14)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--probe-train", type=int, default=2000, help="PCam train tiles the probes are fitted on")
    ap.add_argument("--valid", type=int, default=None, help="PCam valid tiles to test on (default: all 3,000)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--foundation-mpps", default="0.97,0.5",
                    help="resolutions (µm/px) the foundation tiles are cut at: PCam's and, for a larger, multi-magnification "
                    "source, finer ones")
    ap.add_argument("--runs-dir", default="/tmp/gigaslide-bench-dinov2")
    ap.add_argument("--render", action="store_true",
                    help="only re-write dinov2.md from the rows saved in results/dinov2.json (no training)")
    args = ap.parse_args()
    if args.render:
        render()
        return
    load_at_start = load_note()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GIGASLIDE_THREADS", str(args.threads))
    logging.basicConfig(level=logging.WARNING)
    from gigaslide.encoders import build_encoder
    from gigaslide.encoders.model import Encoder
    from gigaslide.evaluation.metrics import paired_difference, summarize

    t_all = time.monotonic()
    runs = Path(args.runs_dir)
    pcam = pcam_dir()
    mpps = tuple(float(v) for v in args.foundation_mpps.split(","))
    found_data = foundation_tiles(runs / f"foundation_tiles_{'_'.join(f'{m:g}' for m in mpps)}", mpps)
    n_found = len(list(found_data.glob("*.png")))
    by_source = source_counts(found_data)
    use_s = args.foundation_budget_s is not None and args.continue_budget_s is not None
    B, b = (None, None) if use_s else (args.foundation_steps, args.continue_steps)
    Bs, bs = (args.foundation_budget_s, args.continue_budget_s) if use_s else (None, None)
    total = (lambda x, y: None if x is None else x + y)
    summaries = {"foundation": train("foundation", runs, found_data, args, B, Bs)}
    foundation = str(runs / "foundation" / "encoder")
    for name, (_, kw) in ROWS.items():
        if name == "scratch":
            summaries[name] = train(name, runs, pcam / "train", args, total(B, b), total(Bs, bs), **kw)
        else:
            summaries[name] = train(name, runs, pcam / "train", args, b, bs, init=foundation, **kw)
    t_train = time.monotonic() - t_all

    tr = load_split(pcam / "train", args.probe_train, args.seed)
    te = load_split(pcam / "valid", args.valid, args.seed)
    trunk, spec = random_trunk(args.backbone, args.tile_size)
    encoders = {"random init (frozen)": Encoder(spec, trunk, "random-seed0").eval(), "foundation (frozen)": foundation}
    encoders.update({name: str(runs / name / "encoder") for name in ROWS})
    probs = {}
    for label, enc in encoders.items():
        probs[label] = probe_probs(build_encoder(enc) if isinstance(enc, str) else enc, tr, te, args.seed)
    y = te[1]
    results = {}
    for label, p in probs.items():
        results[label] = {pr: summarize(y, p[pr], n_bootstrap=args.bootstrap, metrics=("balanced_accuracy", "auc"))
                          for pr in ("knn", "linear")}
        results[label]["embed_images_per_s"] = p["embed_images_per_s"]
    pairs = [("continued", "foundation (frozen)"), ("continued", "scratch"), ("ibot_off", "continued"),
             ("koleo_off", "continued"), ("llrd_1.0", "continued")]
    diffs = {f"{a} - {c}": {pr: paired_difference(y, probs[a][pr], probs[c][pr], "balanced_accuracy",
                                                  n_bootstrap=args.bootstrap) for pr in ("knn", "linear")}
             for a, c in pairs}
    elapsed = time.monotonic() - t_all
    report = {"args": vars(args), "foundation_tiles": n_found, "foundation_sources": by_source, "n_test": int(len(y)), "n_probe_train": int(len(tr[1])), "summaries": summaries, "results": results, "diffs": diffs,
              "train_s": round(t_train, 1), "total_s": round(elapsed, 1), "load_note": load_at_start,
              "command": list(sys.argv),
              "stamp": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic.write_json(ROOT / "benchmarks" / "results" / "dinov2.json", report)
    write_result("dinov2", markdown(report, ROWS), report["command"], report["stamp"])
    print((ROOT / "benchmarks" / "results" / "dinov2.md").read_text())


def render() -> None:
    """dinov2.md from the saved rows, with the command and time of the run that measured them."""
    import json

    report = json.loads((ROOT / "benchmarks" / "results" / "dinov2.json").read_text())
    a = report["args"]
    command = report.get("command") or ["benchmarks/bench_dinov2.py", *[
        f"--{k.replace('_', '-')}={v}" for k, v in a.items() if v is not None and k != "render"]]
    stamp = report.get("stamp") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(
        (ROOT / "benchmarks" / "results" / "dinov2.json").stat().st_mtime))
    print(write_result("dinov2", markdown(report, ROWS), command, stamp).read_text())


def _ci(d: dict) -> str:
    return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def _diff(d: dict) -> str:
    from gigaslide.evaluation.metrics import fmt_diff

    return fmt_diff(d, p=False)


def _verdict(d: dict) -> str:
    """:func:`gigaslide.evaluation.compare.verdict` in this report's words."""
    from gigaslide.evaluation.compare import verdict

    return {"better": "better (CI above 0)", "worse": "worse (CI below 0)",
            "not distinguishable": "no difference resolved (CI spans 0)"}[verdict(d)]


def markdown(r: dict, rows: dict) -> str:
    a, s = r["args"], r["summaries"]
    budget = (f"B = {a['foundation_budget_s']} s, b = {a['continue_budget_s']} s wall-clock"
              if a["foundation_budget_s"] is not None and a["continue_budget_s"] is not None
              else f"B = {a['foundation_steps']} steps, b = {a['continue_steps']} steps")
    lines = ["# DINOv2 continued pre-training (Roth et al. 2024), in miniature", "",
             (f"**Smoke-scale run ({a['foundation_steps']} foundation steps): the numbers check the machinery, they do "
              f"not test the paper.** " if (a.get("foundation_steps") or 10**9) < 100 else "")
             + f"2-core CPU, {r.get('load_note', 'machine load not recorded')}; {a['threads']} torch thread(s). "
             f"{budget}, batch {a['batch_size']}, {a['backbone']} (ViT-Ti/14, DINOv2 "
             f"layout) at {a['tile_size']} px with 2 global + {a['n_local']} local crops; heads {HEADS}.", "",
             f"Foundation data: {r['foundation_tiles']} real non-PCam tissue tiles of 96 px (MoNuSeg test images, "
             f"the CMU-1 slide and colorectal tile samples where a whole tile fits, resampled to "
             f"{' and '.join(str(a.get('foundation_mpps', PCAM_MPP)).split(','))} µm/px"
             + (f": {', '.join(f'{k} {v}' for k, v in r['foundation_sources'].items())}" if r.get("foundation_sources") else "")
             + "). Continuation / scratch data: PCam train (10,000 "
             f"unlabelled tiles). Probes fitted on {r['n_probe_train']} PCam train tiles, tested on {r['n_test']} PCam valid "
             f"tiles; 95 % bootstrap CIs ({a['bootstrap']} resamples).", "",
             "| run | what | steps | train s | train img/s |", "|---|---|---|---|---|"]
    lines.append(f"| foundation | dinov2 on the foundation tiles for B | {s['foundation']['steps']} | "
                 f"{s['foundation']['wall_s']} | {s['foundation']['images_per_s']} |")
    for name, (what, _) in rows.items():
        lines.append(f"| {name} | {what} | {s[name]['steps']} | {s[name]['wall_s']} | {s[name]['images_per_s']} |")
    lines += ["", "| encoder (frozen) | 20-NN balanced acc. | linear balanced acc. | linear AUC | embed img/s |",
              "|---|---|---|---|---|"]
    for label, res in r["results"].items():
        lines.append(f"| {label} | {_ci(res['knn']['balanced_accuracy'])} | {_ci(res['linear']['balanced_accuracy'])} | "
                     f"{_ci(res['linear']['auc'])} | {res['embed_images_per_s']} |")
    lines += ["", "Paired bootstrap of balanced-accuracy differences on the same test tiles:", "",
              "| comparison | 20-NN | linear |", "|---|---|---|"]
    for k, d in r["diffs"].items():
        lines.append(f"| {k} | {_diff(d['knn'])} | {_diff(d['linear'])} |")
    c_f, c_s = r["diffs"]["continued - foundation (frozen)"], r["diffs"]["continued - scratch"]
    claim = all(d[p]["ci_low"] > 0 for d in (c_f, c_s) for p in ("knn", "linear"))
    lines += ["", "Verdict (computed from the rows above):", "",
              f"- continued vs frozen foundation: 20-NN {_verdict(c_f['knn'])}, linear {_verdict(c_f['linear'])}.",
              f"- continued vs scratch for the same total budget: 20-NN {_verdict(c_s['knn'])}, linear {_verdict(c_s['linear'])}.",
              f"- Roth et al.'s claim (continuation beats both): {'reproduces' if claim else 'does not reproduce'} at this scale.",
              *[f"- {k.split(' - ')[0]} vs continued: 20-NN {_verdict(d['knn'])}, linear {_verdict(d['linear'])}."
                for k, d in r["diffs"].items() if k.split(" - ")[1] == "continued"],
              "", f"Training took {r['train_s']} s and the whole benchmark {r['total_s']} s of wall-clock."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Slide-level SSL benchmark: Giga-SSL and SLPD embeddings vs ABMIL and mean pooling on the mosaic slides.

Pipeline (everything through the library, resumable in --work):
1. mosaic slides from PCam *train* tiles (gigaslide.mil.mosaic), labels = slide contains tumour;
2. ``augment-cache`` with a random-init ResNet-18 truncated after layer 3 (256-d, the paper's layer;
   random weights: the only offline option) at the tiles' native 96 px / 0.97 µm/px; its plain
   features are the tile features every method uses;
3. Giga-SSL pre-training (SparseConvMIL, SimCLR T=0.05) and SLPD pre-training (region ViT + DINO +
   prototypes), both on all slides without labels, then ``embed-slides``;
4. evaluation: the same stratified 5-fold split for everyone; linear probe (StandardScaler +
   balanced logistic regression) on Giga-SSL, SLPD and mean-pooled tile features; ABMIL trained
   on the tile features (gigaslide.mil.train, fixed epochs, last epoch); full training folds and
   few-shot draws of n = 25 / 50 training slides; AUC with 95 % bootstrap CIs.

Run: .venv/bin/python benchmarks/bench_slide_ssl.py   (about 10-15 min on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

from gigaslide.encoders import ENCODERS, Encoder, create_trunk  # noqa: E402
from gigaslide.evaluation.metrics import fmt_ci, summarize  # noqa: E402
from gigaslide.evaluation.slides import linear_probe_slides  # noqa: E402
from gigaslide.evaluation.splits import few_shot_draws, make_folds  # noqa: E402
from gigaslide.features import store  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402


def tile_encoder(seed: int = 0) -> Encoder:
    spec = dataclasses.replace(ENCODERS.get("resnet18"), name="resnet18_layer3", embed_dim=256, input_size=96,
                               timm_kwargs={"out_stage": 3}, hub=None, weight_source="random")
    torch.manual_seed(seed)
    return Encoder(spec, create_trunk(spec), f"random-seed{seed}").eval()


def read_labels(mosaic: Path) -> dict[str, int]:
    import csv

    with open(mosaic / "labels.csv") as f:
        return {r["slide_id"]: int(r["label"]) for r in csv.DictReader(f)}


def pooled(pred_list: list[tuple[np.ndarray, np.ndarray]], n_boot: int) -> tuple[str, float, float]:
    """Concatenate (y, p1) of every repeat; AUC with bootstrap CI (within repeats) + sd over repeats."""
    from gigaslide.evaluation.metrics import auc

    y = np.concatenate([a for a, _ in pred_list])
    p = np.concatenate([b for _, b in pred_list])
    strata = np.concatenate([np.full(len(a), i) for i, (a, _) in enumerate(pred_list)])
    probs = np.stack([1 - p, p], 1)
    s = summarize(y, probs, n_bootstrap=n_boot, strata=strata, metrics=("auc",))["auc"]
    per = [auc(a, np.stack([1 - b, b], 1)) for a, b in pred_list]
    return fmt_ci(s), float(np.mean(per)), float(np.std(per))


def _auc(cell: tuple) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) from a formatted ``0.700 [0.600, 0.800]`` cell."""
    v, rest = cell[0].split(" [")
    lo, hi = rest.rstrip("]").split(", ")
    return float(v), float(lo), float(hi)


def claims(rows: dict[str, dict[str, tuple]]) -> list[str]:
    """Plain statements: does each paper claim hold here (point estimates, and whether the CIs overlap)."""
    out = []
    g, s, m, a = (rows[k] for k in ("Giga-SSL (linear)", "SLPD (linear)", "mean pooling (linear)", "ABMIL (tile features)"))

    def cmp(x: dict, y: dict, setting: str, xn: str, yn: str) -> str:
        (xv, xl, xh), (yv, yl, yh) = _auc(x[setting]), _auc(y[setting])
        sep = "CIs do not overlap" if xl > yh or yl > xh else "CIs overlap"
        return f"{xn} {xv:.3f} vs {yn} {yv:.3f} ({setting}; diff {xv - yv:+.3f}, {sep})"

    ok = lambda x, y, st: _auc(x[st])[0] >= _auc(y[st])[0]  # noqa: E731
    out.append(f"- Giga-SSL linear eval matches or beats MIL on full tile features: "
               f"**{'reproduces' if ok(g, a, 'full') else 'does not reproduce'}** — {cmp(g, a, 'full', 'Giga-SSL', 'ABMIL')}.")
    for st in ("n=50", "n=25"):
        d = _auc(g[st])[0] - _auc(a[st])[0]
        out.append(f"- Giga-SSL wins clearly in the few-shot regime (paper: +6.3 AUC at ~50 slides): "
                   f"**{'reproduces' if d >= 0.03 else 'does not reproduce'}** at {st} — {cmp(g, a, st, 'Giga-SSL', 'ABMIL')}.")
    out.append(f"- Giga-SSL vs a plain mean of tile features (not a claim of the paper, the obvious baseline): "
               f"{cmp(g, m, 'full', 'Giga-SSL', 'mean pooling')}; {cmp(g, m, 'n=25', 'Giga-SSL', 'mean pooling')}.")
    out.append(f"- SLPD slide embeddings are competitive for slide classification: {cmp(s, a, 'full', 'SLPD', 'ABMIL')}; "
               f"{cmp(s, m, 'full', 'SLPD', 'mean pooling')}; {cmp(s, m, 'n=25', 'SLPD', 'mean pooling')}.")
    for trained, ctrl, nm in (("Giga-SSL (linear)", "Giga-SSL encoder, untrained (control)", "Giga-SSL"),
                              ("SLPD (linear)", "SLPD region ViT, untrained (control)", "SLPD")):
        if ctrl in rows:
            out.append(f"- {nm} pre-training improves on the same encoder at initialisation: "
                       f"{cmp(rows[trained], rows[ctrl], 'full', nm, 'untrained')}; "
                       f"{cmp(rows[trained], rows[ctrl], 'n=25', nm, 'untrained')}.")
    out.append("- Tiny slide representations (1 KB per slide for Giga-SSL 512-d fp16): **reproduces** (see bytes table).")
    out.append("- Caveats: random-init tile encoder (the paper uses ImageNet / SSL weights), 120 small mosaic slides "
               "(not TCGA), 8x16 cached views instead of 25x25 and far fewer pre-training steps, 2 shared CPU cores; "
               "a non-reproduction here is weak evidence against the paper, not a refutation.")
    return out


def untrained_controls(work: Path, files: dict, ids: list[str], tiles_per_view: int) -> dict[str, np.ndarray]:
    """Embeddings from the same encoders at their initialisation (no pre-training): does SSL add anything?"""
    import zlib

    from gigaslide.ssl.slide import run as runs
    from gigaslide.ssl.slide.encoders import build_slide_encoder
    from gigaslide.ssl.slide.gigassl import embed_views
    from gigaslide.ssl.slide.slpd import RegionViT, embed_regions

    out = {}
    cfg = runs.read_config(work / "run_gigassl")
    e = cfg["encoder"]
    torch.manual_seed(cfg["train"]["seed"])  # the initialisation pre-training started from
    enc = build_slide_encoder(e["name"], e["in_dim"], out_dim=e["out_dim"], hidden=e["hidden"]).eval()
    vecs = []
    for sid in ids:
        ff = files[sid]
        pos = np.round(ff.coords / ff.tile_size_level0).astype(np.int64)
        vecs.append(embed_views(enc, ff.features, pos, ensemble=20, tiles_per_view=tiles_per_view,
                                rng=np.random.default_rng([0, zlib.crc32(sid.encode())])))
    out["Giga-SSL encoder, untrained (control)"] = np.stack(vecs)
    cfg = runs.read_config(work / "run_slpd")
    e = cfg["encoder"]
    torch.manual_seed(cfg["train"]["seed"])
    vit = RegionViT(e["in_dim"], e["dim"], e["depth"], e["heads"], e["grid"]).eval()
    out["SLPD region ViT, untrained (control)"] = np.stack([embed_regions(vit, files[sid], cfg) for sid in ids])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gigaslide_bench_slide_ssl")
    ap.add_argument("--slides", type=int, default=120)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--tiles-per-view", type=int, default=16)
    ap.add_argument("--gigassl-epochs", type=int, default=400)
    ap.add_argument("--slpd-epochs", type=int, default=10)
    ap.add_argument("--region-size", type=int, default=745, help="px at 0.5 µm/px (372 µm = 4x4 mosaic tiles of 96 px at 0.97)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--abmil-epochs", type=int, default=30)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 cores shared by 5 jobs: more threads only spin
    shared = shared_data_dir()
    if shared is None:
        print("no shared data (PCam tiles): cannot run")
        return
    work = Path(args.work)

    import json

    work.mkdir(parents=True, exist_ok=True)
    tfile = work / "times.json"
    saved = json.loads(tfile.read_text()) if tfile.is_file() else {}

    class Times(dict):
        """Step timings; a step skipped on a resumed run keeps the time measured when it ran."""

        def record(self, k: str, v: float, did_work: bool = True) -> None:
            if not did_work and k in saved:
                v = saved[k]
            print(f"{k}: {v:.1f} s", flush=True)
            self[k] = saved[k] = v
            tfile.write_text(json.dumps(saved, indent=1))

    times = Times()
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic

    t = time.perf_counter()
    build_mosaic(shared / "tiles" / "pcam" / "train", work / "mosaic",
                 MosaicConfig(slides=args.slides, grid=args.grid, seed=0), verbose=False)
    times.record("mosaic slides", time.perf_counter() - t, did_work=time.perf_counter() - t > 5)
    labels = read_labels(work / "mosaic")
    slides = sorted(str(p) for p in (work / "mosaic" / "slides").glob("*.tiff"))

    from gigaslide.ssl.slide.cache import build_augment_cache

    t = time.perf_counter()
    cres = build_augment_cache(slides, work / "cache", tile_encoder(), views=args.views,
                               tiles_per_view=args.tiles_per_view, mpp=0.97, tile_size=96, min_tissue=0.5,
                               batch_size=128, precision="bf16", log=lambda *a: None)
    times.record("augment-cache (plain + views)", time.perf_counter() - t, did_work=bool(cres.done))
    files = store.load_dir(work / "cache")
    ids = sorted(files)
    y = np.array([labels[i] for i in ids])
    n_tiles = np.array([len(files[i]) for i in ids])

    from gigaslide.ssl.slide.embed import embed_slides
    from gigaslide.ssl.slide.gigassl import pretrain_gigassl
    from gigaslide.ssl.slide.slpd import pretrain_slpd

    t = time.perf_counter()
    g = pretrain_gigassl(work / "cache", work / "run_gigassl", epochs=args.gigassl_epochs, batch_size=32,
                         log=lambda *a: None)
    times.record("Giga-SSL pre-training", g["history"][-1]["seconds"])
    t = time.perf_counter()
    s = pretrain_slpd(work / "cache", work / "run_slpd", region_size=args.region_size, prototypes=2, warmup=3,
                      epochs=args.slpd_epochs, batch_size=64, log=lambda *a: None)
    times.record("SLPD pre-training", s["history"][-1]["seconds"])
    t = time.perf_counter()
    eg = embed_slides(work / "run_gigassl", work / "cache", work / "emb_gigassl.h5", ensemble=20, fp16=True)
    times.record("Giga-SSL embed (ensemble 20)", time.perf_counter() - t)
    es = embed_slides(work / "run_slpd", work / "cache", work / "emb_slpd.h5", fp16=True)
    emb = {"Giga-SSL (linear)": eg, "SLPD (linear)": es}
    X = {k: np.asarray(v.embeddings, np.float32)[[v.slide_ids.index(i) for i in ids]] for k, v in emb.items()}
    X["mean pooling (linear)"] = np.stack([files[i].features.mean(0) for i in ids])
    X.update(untrained_controls(work, files, ids, args.tiles_per_view))

    folds = make_folds(y, None, args.folds, seed=0)
    settings = [("full", None), ("n=50", 50), ("n=25", 25)]
    rows: dict[str, dict[str, tuple]] = {}
    for name, Xm in X.items():
        rows[name] = {}
        for sname, n in settings:
            preds = []
            for r in range(1 if n is None else args.repeats):
                fl = folds if n is None else [(few_shot_draws(tr, y, n, 1, seed=100 * r + k)[0], te)
                                              for k, (tr, te) in enumerate(folds)]
                pr = linear_probe_slides(Xm, y, fl, slide_ids=ids, seed=0)
                order = np.argsort([ids.index(i) for i in pr.slide_ids])
                preds.append((pr.labels[order], pr.probs[order, 1]))
            rows[name][sname] = pooled(preds, args.bootstrap)

    from gigaslide.mil.train import TrainConfig, predict, train_fold

    bags = [torch.from_numpy(files[i].features.astype(np.float32)) for i in ids]
    t = time.perf_counter()
    rows["ABMIL (tile features)"] = {}
    for sname, n in settings:
        preds = []
        for r in range(1 if n is None else args.repeats):
            p1 = np.full(len(y), np.nan)
            for k, (tr, te) in enumerate(folds):
                trn = tr if n is None else few_shot_draws(tr, y, n, 1, seed=100 * r + k)[0]
                cfg = TrainConfig(model="abmil", epochs=args.abmil_epochs, seed=r, device="cpu")
                model, _ = train_fold([bags[i] for i in trn], y[trn], [], y[:0], 256, 2, cfg)
                probs, _ = predict(model, [bags[i] for i in te])
                p1[te] = probs[:, 1]
            preds.append((y, p1))
        rows["ABMIL (tile features)"][sname] = pooled(preds, args.bootstrap)
    times.record("ABMIL training (all folds/draws)", time.perf_counter() - t)

    cache_bytes = float(np.mean([f.stat().st_size for f in (work / "cache" / "features").glob("*.h5")]))
    tile_bytes = float(np.mean([files[i].features.astype(np.float16).nbytes for i in ids]))
    md = ["# Slide-level SSL: Giga-SSL and SLPD vs ABMIL / mean pooling (mosaic benchmark)\n",
          f"{len(ids)} mosaic slides ({int(y.sum())} tumour, {int((1 - y).sum())} normal) built from PCam **train** tiles "
          f"(grid {args.grid}x{args.grid}, 96 px tiles at 0.97 µm/px, tumour fraction 2-20 % of tissue tiles in positives); "
          f"{n_tiles.mean():.0f} tissue tiles per slide on average (min {n_tiles.min()}, max {n_tiles.max()}).",
          "Tile encoder: ResNet-18 truncated after layer 3 (256-d, as in Giga-SSL) with **random weights** (no "
          "pretrained weights are reachable offline), at the tiles' native 96 px, bf16 autocast (min cosine to fp32 >= 0.999 checked separately). Augmented-view cache: "
          f"{args.views} views x {args.tiles_per_view} tiles per slide (paper: 25 x 25), one shared augmentation per view.",
          f"Giga-SSL: SparseConvMIL (1 submanifold 3x3 conv), 512-d, SimCLR T=0.05, Adam 1e-3, batch 32 slides, "
          f"{args.gigassl_epochs} epochs, embedding = mean over 20 random views of {args.tiles_per_view} plain tiles. "
          f"SLPD: region ViT (2 layers, 192-d) over regions of {args.region_size} px at 0.5 µm/px "
          f"({args.region_size * 0.5:.0f} µm, about 4 mosaic tiles per side (border tiles make some 5); the paper's 4096 px regions would be larger than these "
          f"slides), DINO + intra/inter prototype losses, k=2, warm-up 3, {args.slpd_epochs} epochs; embedding = mean "
          "of region embeddings. Both pre-trained on all slides without labels (transductive, as usual for SSL).",
          f"Evaluation: the same {args.folds} stratified folds for all methods; linear = StandardScaler + "
          f"LogisticRegression(class_weight='balanced'); ABMIL = gigaslide.mil ABMIL, {args.abmil_epochs} epochs, last "
          f"epoch, no validation split. Few-shot: n training slides drawn from each training fold, {args.repeats} "
          f"repeats. AUC of pooled out-of-fold predictions [95 % bootstrap CI, {args.bootstrap} resamples, within "
          "repeats]; then mean ± sd of the per-repeat AUC.\n",
          "| method | full | n = 50 | n = 25 |", "|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | " + " | ".join(f"{r[s][0]} ({r[s][1]:.3f} ± {r[s][2]:.3f})" for s, _ in settings) + " |")
    md += ["", "| artifact | bytes per slide |", "|---|---|",
           f"| Giga-SSL embedding (512-d fp16) | {eg.attrs['bytes_per_slide']} |",
           f"| SLPD embedding (192-d fp16) | {es.attrs['bytes_per_slide']} |",
           f"| tile features (N x 256 fp16, mean) | {tile_bytes:.0f} |",
           f"| augmented-view cache file incl. plain fp32 features (mean) | {cache_bytes:.0f} |",
           "", "| step | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    md += ["", "## Paper claims on this benchmark", ""] + claims(rows)
    md.append(f"\nGiga-SSL final loss {g['history'][-1]['loss']:.3f} (first {g['history'][0]['loss']:.3f}); "
              f"SLPD final DINO loss {s['history'][-1]['dino']:.3f}.")
    md.append("\nCPU: 2 cores shared with other jobs; timings are wall-clock and noisy. " + machine())
    text = "\n".join(line for line in md if line is not None)
    print(text)
    print(write_result("slide_ssl", text))


if __name__ == "__main__":
    main()

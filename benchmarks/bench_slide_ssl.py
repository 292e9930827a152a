"""Slide-level SSL benchmark: Giga-SSL and SLPD embeddings vs MIL on mosaic slides, where their claims live.

One command (everything through the library, cached and resumable in --work):
1. tile features from the project's own SSL tile encoder: ``gigaslide pretrain`` (SimCLR, ResNet-18) on
   PCam train tiles, used truncated after layer 3 (``resnet18_layer3``, 256-d, the paper's tile features);
   its tile linear AUC on PCam valid is measured; a random-weight encoder is kept as a control row;
2. mosaic slides from PCam train tiles for (a) the CAMELYON-like tumour task and (b) the context task
   (same tumour fraction in both classes, contiguous vs scattered tumour tiles);
3. per task: ``augment-cache`` -> Giga-SSL pre-training -> embeddings; SLPD in three modes (DINO only,
   +intra, +intra+inter) -> embeddings; methods: linear (C=10) on Giga-SSL, on each SLPD mode and on the
   mean of tile features; ABMIL, CLAM-SB and TransMIL (with its PPEG; TransMIL-noPPEG on request) through
   ``gigaslide.mil.cv.run_cv``;
4. n = --ns training slides per fold (few-shot draws, --draws repeats; "all" = every training slide, one
   draw), stratified patient-grouped folds (the same ones for every method); AUC per draw, mean over draws;
   paired bootstrap (over test slides, the same resample for both methods) of AUC differences;
   bytes per slide and training time;
5. ``--slpd-variants seed=1,seed=2,epochs=8,prototypes=4,region=1490``: the full SLPD (+intra+inter) pre-trained
   again with one setting changed, each paired against it and against mean pooling (how far one run's result moves
   with its seed, whether the epoch budget, the number of prototypes per slide or the region size matters);
6. ``--region-mil ABMIL``: MIL over the region embeddings of SLPD DINO-only and +intra+inter (the SLPD paper's
   aggregator protocol beside the linear one);
7. ``--tissue both``: each task tiled twice on the same slides, by tissue detection and exactly at the mosaic's tissue
   cells, every method paired across the two (what a method took from what tissue detection keeps);
   ``--thinned-control`` adds a third tiling, the exact cells thinned at random to detection's per-slide count,
   paired against both (whether it is how many cells detection keeps, or which).

Run: .venv/bin/python benchmarks/bench_slide_ssl.py            (the full setting; hours on 2 CPU cores)
     .venv/bin/python benchmarks/bench_slide_ssl.py --small    (the reduced setting used for the results file)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, machine, write_result  # noqa: E402

from gigaslide.evaluation import splits as S  # noqa: E402
from gigaslide.evaluation.metrics import auc  # noqa: E402
from gigaslide.evaluation.slides import linear_probe_slides, read_predictions  # noqa: E402
from gigaslide.features import store  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402

#: label -> (MIL model, its settings, run folder name). TransMIL has its PPEG (position encoding over the tiles in
#: file order, row-major on the grid); TransMIL-grid lays them out on the slide's tiling grid; TransMIL-noPPEG is the
#: tile-order-invariant variant (gigaslide's only TransMIL before PPEG existed, so the results files measured before it
#: show it under this label).
MIL = {"ABMIL": ("abmil", {}, "abmil"), "CLAM-SB": ("clam_sb", {}, "clam_sb"),
       "TransMIL-noPPEG": ("transmil", {"ppeg": False}, "transmil_noppeg"), "TransMIL": ("transmil", {}, "transmil"),
       "TransMIL-grid": ("transmil", {"layout": "grid"}, "transmil_grid")}
#: what runs unless --mil-models says otherwise
MIL_DEFAULT = ["ABMIL", "CLAM-SB", "TransMIL"]
SLPD_MODES = {"SLPD DINO only": "dino", "SLPD +intra": "dino+intra", "SLPD +intra+inter": "dino+intra+inter"}
FULL_SLPD = "SLPD +intra+inter"
#: the SLPD modes whose region embeddings --region-mil aggregates (the claim's two sides)
REGION_MIL_MODES = ("SLPD DINO only", FULL_SLPD)


def region_row(slpd: str, mil: str) -> str:
    """Row name of ``mil`` trained over the region embeddings of SLPD mode ``slpd``."""
    return f"{slpd} regions → {mil}"


def mosaic_digest(mosaic: Path) -> str:
    """SHA-256 over a mosaic's record (its settings and per-slide draws, e.g. tissue mixes; not its creation time),
    labels and per-slide ground truth: two runs pair only on the same slides."""
    import hashlib

    record = {k: v for k, v in json.loads((mosaic / "mosaic.json").read_text()).items() if k != "created"}
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for f in [mosaic / "labels.csv", *sorted((mosaic / "ground_truth").glob("*.csv"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def mix_r2(X: dict, mosaic: Path, ids: list[str]) -> dict:
    """How much of each slide embedding is the slide's own tissue mix (per-slide composition): 5-fold cross-validated
    R² of a ridge regression (standardised inputs, alpha chosen inside each fold) predicting the slide's drawn mix
    over the tissue kinds from its embedding. {} when the mosaic has no per-slide composition."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    draws = json.loads((mosaic / "mosaic.json").read_text()).get("slide_composition_draws")
    if not draws:
        return {}
    Y = np.array([draws[s] for s in ids])
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    cv = KFold(5, shuffle=True, random_state=0)
    return {k: float(r2_score(Y, cross_val_predict(model, x.astype(np.float64), Y, cv=cv))) for k, x in X.items()}


def region_counts(w: Path, args) -> dict:  # noqa: ANN001
    """Mean regions per slide of each exported SLPD region folder (--region-mil)."""
    out = {}
    for slpd in REGION_MIL_MODES if args.region_mil else ():
        d = w / f"regions_{SLPD_MODES[slpd]}"
        out[slpd] = float(np.mean([len(f) for f in store.load_dir(d, arrays=False).values()]))  # (counts only)
    return out


def slpd_variants(spec: str) -> list[tuple[str, str, dict]]:
    """``--slpd-variants "seed=1,seed=2,epochs=8"`` -> (row name, run-folder suffix, pretrain_slpd overrides) of the
    full SLPD (+intra+inter) pre-trained again with one setting changed: its seed spread, its epoch budget, its number
    of prototypes per slide (k), its region side (``region=PX`` at 0.5 µm/px)."""
    out = []
    names = {"seed": "seed {}", "epochs": "{} epochs", "prototypes": "k = {}", "region": "regions {} px"}
    least = {"prototypes": 2, "region": 2}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, val = item.partition("=")
        if key not in names or not val.isdigit() or int(val) < least.get(key, 0):
            raise SystemExit(f"--slpd-variants: {item!r} (use seed=N, epochs=N, prototypes=K >= 2 or region=PX (region "
                             "side in px at 0.5 µm/px), comma-separated)")
        v = int(val)
        out.append((f"{FULL_SLPD} ({names[key].format(val)})", f"_{key}{v}", {"region_size" if key == "region" else key: v}))
    return out
TIMES: dict[str, float] = {}
SAVED: dict[str, float] = {}  # times measured when a step really ran (work/times.json), reused when it resumes as done
TIMES_FILE: list[Path] = []


def timed(key: str, fn, *a, done: Path | None = None, **kw):  # noqa: ANN001, ANN201
    """Run ``fn`` and record its wall time; a step whose output ``done`` already existed keeps its first time."""
    was_done = done is not None and done.exists() and key in SAVED
    t = time.perf_counter()
    out = fn(*a, **kw)
    TIMES[key] = SAVED[key] if was_done else time.perf_counter() - t
    SAVED[key] = TIMES[key]
    if TIMES_FILE:
        TIMES_FILE[0].write_text(json.dumps(SAVED, indent=1))
    print(f"{key}: {TIMES[key]:.1f} s", flush=True)
    return out


def tile_encoder(work: Path, pcam: Path, args) -> tuple[object, str]:  # noqa: ANN001
    """The project's SSL tile encoder (trained here once, cached), truncated after layer 3, at 48 px."""
    from gigaslide.cli.main import run as cli
    from gigaslide.encoders import build_encoder

    run = work / "tile_ssl"
    if not (run / "encoder" / "weights.safetensors").is_file() or not (run / "run.json").is_file():
        cli(["pretrain", "--data", str(pcam / "train"), "--out", str(run), "--method", "simclr", "--backbone", "resnet18",
             "--mpp", "0.97", "--tile-size", "48", "--budget", args.tile_ssl_budget, "--batch-size", "32",
             "--threads", "1", "--precision", "bf16", "--workers", "1"])
    enc = build_encoder("resnet18_layer3", str(run / "encoder" / "weights.safetensors"))
    enc.spec = replace(enc.spec, input_size=48)
    return enc, f"SimCLR ResNet-18 trained {args.tile_ssl_budget} on PCam train (`{run}`), layer-3 features"


def random_encoder():  # noqa: ANN201
    from gigaslide.encoders import build_encoder

    enc = build_encoder("resnet18_layer3", "random")
    enc.spec = replace(enc.spec, input_size=48)
    return enc


@torch.no_grad()
def tile_auc(enc, pcam: Path, n: int) -> float:  # noqa: ANN001
    """Linear probe (StandardScaler + logistic regression) on n tiles per class of PCam train -> AUC on PCam valid."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def load(split: str):  # noqa: ANN202
        xs, ys = [], []
        for c in (0, 1):
            files = sorted((pcam / split / str(c)).glob("*.jpg"))[:n]
            imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
            for i in range(0, len(imgs), 128):
                xs.append(enc(torch.from_numpy(imgs[i:i + 128])).float().numpy())
            ys += [c] * len(files)
        return np.concatenate(xs), np.array(ys)

    (xt, yt), (xv, yv) = load("train"), load("valid")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(xt, yt)
    return auc(yv, clf.predict_proba(xv))


def splits(labels_csv: Path, ids: list[str], args):  # noqa: ANN001, ANN201
    """The label table in run_cv's order and, per n, per draw, per fold: (train, test) indices — run_cv's own."""
    t = S.match_features(S.read_labels(labels_csv), ids, on_missing="skip").table  # slides without tissue: left out
    folds = S.make_folds(t.labels, t.patient_ids, args.folds, 0, where=labels_csv)
    plan = {}
    for n in args.ns:
        if n == "all":
            plan[n] = [[(tr, te) for tr, te in folds]]
        else:
            per_fold = [S.few_shot_draws(tr, t.labels, int(n), args.draws, seed=k) for k, (tr, _) in enumerate(folds)]
            plan[n] = [[(per_fold[k][r], te) for k, (_, te) in enumerate(folds)] for r in range(args.draws)]
    return t, plan


def linear_rows(X: np.ndarray, t, plan) -> dict:  # noqa: ANN001
    """{n: [R, N] out-of-fold P(class 1)} for the linear probe (C=10, the paper's)."""
    out = {}
    for n, draws in plan.items():
        p = np.full((len(draws), len(t.labels)), np.nan)
        for r, fl in enumerate(draws):
            pr = linear_probe_slides(X, t.labels, fl, slide_ids=t.slide_ids, C=10.0, seed=0)
            p[r, [t.slide_ids.index(s) for s in pr.slide_ids]] = pr.probs[:, 1]
        out[n] = p
    return out


def mil_rows(model: str, features: Path, labels_csv: Path, out: Path, t, args, kwargs: dict | None = None,  # noqa: ANN001
             tag: str | None = None) -> dict:
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.train import TrainConfig

    res = {}
    # slides without tissue tiles (none in most mosaics) are left out as in splits(); strict matching otherwise
    on_missing = "skip" if set(S.read_labels(labels_csv).slide_ids) - set(t.slide_ids) else "error"
    for n in args.ns:
        draws = 1 if n == "all" else args.draws
        d = out / f"{tag or model}_n{n}"
        cfg = TrainConfig(model=model, epochs=args.mil_epochs, patience=max(3, args.mil_epochs // 3), seed=0, device="cpu",
                          model_kwargs=dict(kwargs or {}))
        run_cv(features, labels_csv, d, cfg=cfg, folds=args.folds, train_slides=None if n == "all" else int(n),
               repeats=draws, n_bootstrap=100, on_missing=on_missing, verbose=False)
        pred = read_predictions(d / "predictions.csv")
        p = np.full((draws, len(t.labels)), np.nan)
        for sid, pr, r in zip(pred.slide_ids, pred.probs[:, 1], pred.repeats):
            p[int(r), t.slide_ids.index(sid)] = pr
        res[n] = p
    return res


def mean_auc(y: np.ndarray, p: np.ndarray, idx: np.ndarray | None = None) -> float:
    idx = np.arange(len(y)) if idx is None else idx
    return float(np.mean([auc(y[idx], np.stack([1 - q[idx], q[idx]], 1)) for q in p]))


def paired(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float, float]:
    """Mean-over-draws AUC difference a - b, its 95 % paired bootstrap CI over test slides, and P(diff <= 0)."""
    rng = np.random.default_rng(seed)
    d0 = mean_auc(y, pa) - mean_auc(y, pb)
    ds = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx])) < 2:
            continue
        ds.append(mean_auc(y, pa, idx) - mean_auc(y, pb, idx))
    ds = np.array(ds)
    return d0, float(np.percentile(ds, 2.5)), float(np.percentile(ds, 97.5)), float((ds <= 0).mean())


def kept_by_tissue_detection(mosaic: Path, files: dict, t) -> dict:  # noqa: ANN001
    """Fraction of each slide's mosaic tissue cells that tissue detection kept as tiles, by class, and its AUC as a
    slide score: a bag-level cue that a bag mean can see without seeing the tiles' arrangement. Where cells were
    dropped, also which: the mean RGB brightness (0-255) of the kept and of the dropped tissue cells."""
    from gigaslide.mil.mosaic import read_ground_truth
    from gigaslide.slides import iter_tiles

    gts = {s: read_ground_truth(mosaic / "ground_truth" / f"{s}.csv") for s in t.slide_ids}
    frac = np.array([len(files[s]) / max(1, len(gts[s])) for s in t.slide_ids])
    y = np.asarray(t.labels)
    out = {"pos": float(frac[y == 1].mean()), "neg": float(frac[y == 0].mean()),
           "auc": auc(y, np.stack([1 - frac, frac], 1))}
    if frac.min() < 1:
        bright: dict[bool, list[float]] = {True: [], False: []}
        mpp = float(json.loads((mosaic / "mosaic.json").read_text())["mpp"])
        for s in t.slide_ids:
            kept = {tuple(int(v) for v in c[:2]) for c in np.asarray(files[s].coords)}
            cells = [(int(x), int(yy)) for x, yy, _, _ in gts[s]]
            size = int(gts[s][0][2])
            for c, tile in zip(cells, iter_tiles(mosaic / "slides" / f"{s}.tiff", cells, size, mpp)):
                bright[c in kept].append(float(tile.mean()))
        out.update(bright_kept=float(np.mean(bright[True])), bright_dropped=float(np.mean(bright[False])))
    return out


def brightness_word(kept: dict, margin: float = 5.0) -> str:
    """How the dropped tissue cells compare with the kept ones in mean RGB brightness (0-255; within ``margin``:
    about the same)."""
    d = kept["bright_dropped"] - kept["bright_kept"]
    return "paler than" if d > margin else "darker than" if d < -margin else "about as bright as"


#: report name of each tiling arm of --tissue both
ARMS = {"detected": "detected tissue", "annotations": "exact tissue", "thinned": "thinned exact tissue"}


def tissue_runs(task: str, args) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """(label, folder, tissue) of each tiling ``task`` runs with: ``--tissue both`` runs it on the same mosaic (its own
    copy per arm, built with the same seed, checked identical), tiled by detection and exactly at the tissue cells, and
    with ``--thinned-control`` a third time on exact cells thinned at random to detection's per-slide count."""
    if args.tissue != "both":
        return [(task, task, args.tissue)]
    arms = ["detected", "annotations"] + (["thinned"] if args.thinned_control else [])
    folder = {"detected": task, "annotations": f"{task}_annotated", "thinned": f"{task}_thinned"}
    return [(f"{task} ({ARMS[a]})", folder[a], a) for a in arms]


def write_thinned(mosaic: Path, detected_cache: Path, out: Path) -> Path:
    """``out/<slide>.geojson``: each slide's exact tissue cells, thinned uniformly at random (seeded per slide) to as
    many cells as tissue detection kept on it (``detected_cache``): detection's tile count without its choice of cells."""
    from gigaslide import atomic
    from gigaslide.mil.mosaic import cells_geojson, read_ground_truth

    kept = {s: len(f) for s, f in store.load_dir(detected_cache, arrays=False).items()}
    for i, gp in enumerate(sorted((mosaic / "ground_truth").glob("*.csv"))):
        dst = out / f"{gp.stem}.geojson"
        if dst.is_file():
            continue
        gt = read_ground_truth(gp)
        keep = np.sort(np.random.default_rng([0, i]).choice(len(gt), min(len(gt), max(1, kept.get(gp.stem, 0))),
                                                            replace=False))
        atomic.write_json(dst, cells_geojson(gt[keep]))
    return out


def run_task(task: str, work: Path, pcam: Path, enc, args, label: str | None = None, folder: str | None = None,  # noqa: ANN001
             tissue: str = "detected") -> dict:
    """``tissue``: detected; annotations (tiles = the mosaic's tissue cells, its GeoJSON); thinned (those cells thinned
    at random to the detected arm's per-slide count, see :func:`write_thinned`)."""
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic
    from gigaslide.ssl.slide.cache import build_augment_cache
    from gigaslide.ssl.slide.embed import embed_slides
    from gigaslide.ssl.slide.gigassl import pretrain_gigassl
    from gigaslide.ssl.slide.slpd import pretrain_slpd

    w = work / (folder or task)
    tf = (0.1, 0.3) if task == "context" else (0.05, 0.2)
    base, task = task, label or task  # (task: the name its steps and report section go by)
    annotated = tissue != "detected"
    timed(f"{task}: mosaic slides", build_mosaic, pcam / "train", w / "mosaic",
          MosaicConfig(slides=args.slides, grid=args.grid, tumor_fraction=tf, seed=0, task=base,
                       slide_stain=args.slide_stain, slide_composition=args.slide_composition,
                       tissue_kinds=args.tissue_kinds), verbose=False,
          done=w / "mosaic" / (f"tissue/mosaic_{args.slides - 1:04d}.geojson" if annotated else "labels.csv"))
    slides = sorted(str(p) for p in (w / "mosaic" / "slides").glob("*.tiff"))
    quiet = lambda *a: None  # noqa: E731
    tissue_dir = {"detected": None, "annotations": w / "mosaic" / "tissue"}.get(tissue)
    if tissue == "thinned":
        tissue_dir = write_thinned(w / "mosaic", work / base / "cache", w / "thinned")
    cres = timed(f"{task}: augment-cache", build_augment_cache, slides, w / "cache", enc, views=args.views,
                 tiles_per_view=args.tiles_per_view, mpp=0.97, tile_size=96, min_tissue=0.5, batch_size=128,
                 precision="auto", log=quiet, tissue_from=tissue_dir,
                 done=w / "cache" / "cache.json")
    files = store.load_dir(w / "cache")
    labels_csv = w / "mosaic" / "labels.csv"
    t, plan = splits(labels_csv, sorted(files), args)
    g = timed(f"{task}: Giga-SSL pre-training", pretrain_gigassl, w / "cache", w / "gigassl", epochs=args.gigassl_epochs,
              tiles_per_step=args.tiles_per_step, batch_size=args.gigassl_batch, log=quiet,
              done=w / "gigassl" / "model.safetensors")
    emb = {"Giga-SSL": timed(f"{task}: Giga-SSL embed", embed_slides, w / "gigassl", w / "cache", w / "emb_gigassl.h5",
                             ensemble=20, fp16=True)}
    collapse = {}
    runs_ = [(name, mode, "", {}) for name, mode in SLPD_MODES.items()]
    runs_ += [(name, SLPD_MODES[FULL_SLPD], sfx, kw) for name, sfx, kw in args.variants]
    for name, mode, sfx, kw in runs_:
        kw = {"epochs": args.slpd_epochs, "prototypes": 2, "region_size": args.region_size, **kw}
        r = timed(f"{task}: {name} pre-training", pretrain_slpd, w / "cache", w / f"slpd_{mode}{sfx}", losses=mode,
                  warmup=max(1, kw["epochs"] // 3), batch_size=64,
                  log=quiet, **kw, done=w / f"slpd_{mode}{sfx}" / "model.safetensors")
        collapse[name] = r["collapse"]
        regions = w / f"regions_{mode}{sfx}"  # region embeddings as a feature folder, for MIL over regions
        want = (args.region_mil and name in REGION_MIL_MODES  # (again when an export was cut short)
                and len(list((regions / "features").glob("*.h5"))) < len(files))
        emb[name] = embed_slides(w / f"slpd_{mode}{sfx}", w / "cache", w / f"emb_{mode}{sfx}.h5", fp16=True,
                                 regions_out=regions if want else None)
    X = {k: np.asarray(v.embeddings, np.float32)[[v.slide_ids.index(s) for s in t.slide_ids]] for k, v in emb.items()}
    X["mean pooling"] = np.stack([files[s].features.mean(0) for s in t.slide_ids])
    preds = {f"{k} (linear)": linear_rows(x, t, plan) for k, x in X.items()}
    for name, (model, kw, tag) in ([(k, v) for k, v in MIL.items() if k in args.mil_models] if not args.no_mil else []):
        preds[name] = timed(f"{task}: {name} (all n, draws, folds)", mil_rows, model, w / "cache", labels_csv,
                            w / "mil", t, args, kw, tag, done=w / "mil" / f"{tag}_n{args.ns[-1]}" / "predictions.csv")
    for slpd in REGION_MIL_MODES if args.region_mil else ():  # the SLPD paper's other protocol: an aggregator over regions
        mode = SLPD_MODES[slpd]
        for name in args.region_mil:
            model, kw, tag = MIL[name]
            preds[region_row(slpd, name)] = timed(
                f"{task}: {region_row(slpd, name)} (all n, draws, folds)", mil_rows, model, w / f"regions_{mode}",
                labels_csv, w / "mil", t, args, kw, f"{tag}_regions_{mode}",
                done=w / "mil" / f"{tag}_regions_{mode}_n{args.ns[-1]}" / "predictions.csv")
    info = {"task": base, "tissue": tissue, "slide_ids": list(t.slide_ids),
            "mosaic_sha256": mosaic_digest(w / "mosaic"), "regions": region_counts(w, args),
            "mix_r2": mix_r2(X, w / "mosaic", list(t.slide_ids)),
            "n_slides": len(t.labels), "n_pos": int(t.labels.sum()), "cache_slides": len(cres.done) + len(cres.skipped),
            "kept": kept_by_tissue_detection(w / "mosaic", files, t),
            "no_tissue": sorted(set(S.read_labels(labels_csv).slide_ids) - set(files)),
            "tiles": float(np.mean([len(f) for f in files.values()])), "collapse": collapse,
            "bytes": {"Giga-SSL embedding (fp16)": int(emb["Giga-SSL"].attrs["bytes_per_slide"]),
                      "SLPD embedding (fp16)": int(emb["SLPD +intra+inter"].attrs["bytes_per_slide"]),
                      "tile features (fp16)": float(np.mean([files[s].features.astype(np.float16).nbytes for s in files])),
                      "augmented-view cache file": float(np.mean([f.stat().st_size for f in (w / "cache" / "features").glob("*.h5")]))},
            "gigassl_final": g["history"][-1], "gigassl_epochs": len(g["history"]),
            "gigassl_exported_epoch": g.get("exported_epoch"), "gigassl_learned": g.get("learned"),
            "gigassl_untrained": g.get("untrained_monitor"), "gigassl_raw": g.get("raw_monitor"),
            "gigassl_exported": (g["history"][g["exported_epoch"] - 1] if g.get("exported_epoch") else None)}
    return {"y": t.labels, "preds": preds, "info": info}


def random_control(work: Path, pcam: Path, args) -> dict:
    """Tumour task, random-weight tile encoder: mean pooling + linear and ABMIL only (a control row)."""
    from gigaslide.ssl.slide.cache import build_augment_cache

    w = work / "tumour"
    slides = sorted(str(p) for p in (w / "mosaic" / "slides").glob("*.tiff"))
    timed("control: random-feature cache", build_augment_cache, slides, work / "random_cache", random_encoder(), views=2,
          tiles_per_view=4, mpp=0.97, tile_size=96, min_tissue=0.5, batch_size=128, precision="auto", log=lambda *a: None,
          done=work / "random_cache" / "cache.json")
    files = store.load_dir(work / "random_cache")
    t, plan = splits(w / "mosaic" / "labels.csv", sorted(files), args)
    X = np.stack([files[s].features.mean(0) for s in t.slide_ids])
    out = {"random features: mean pooling (linear)": linear_rows(X, t, plan)}
    if not args.no_mil:
        out["random features: ABMIL"] = mil_rows("abmil", work / "random_cache", w / "mosaic" / "labels.csv",
                                                 work / "random_mil", t, args)
    return out


#: the settings that size the run (those a reduced run states next to their defaults)
SCALE = ("slides", "grid", "views", "tiles_per_view", "tiles_per_step", "gigassl_epochs", "gigassl_batch", "slpd_epochs",
         "folds", "draws", "ns", "mil_epochs", "bootstrap", "tile_ssl_budget", "tile_n")


def report(results: dict, tile: dict, args, enc_desc: str) -> str:
    tasks = args.tasks.split(",")
    md = ["# Slide-level SSL: Giga-SSL and SLPD vs MIL on mosaic slides" + (f" with {identity(args)}" if identity(args) else "")
          + f": {' and '.join(tasks)} task{'s' if len(tasks) > 1 else ''}, {args.slides} slides\n"]
    if args.reduced:
        what = ", ".join(f"{k.replace('_', '-')} {v} (default {d})" for k, (v, d) in args.reduced.items())
        md.append(f"**Reduced run on a 2-core CPU** ({args.load_note}; {'`--small`: ' if args.small else ''}{what}); "
                  "the script's defaults are the full setting. Read the numbers as a check of the machinery and of the "
                  "direction of effects, not as a reproduction at the papers' scale.\n")
    md.append(f"Tile encoder: {enc_desc}; tile linear AUC on PCam valid ({args.tile_n} train / {args.tile_n} valid tiles "
              f"per class): SSL **{tile['ssl']:.3f}** vs random weights {tile['random']:.3f}. Slides: {args.slides} per task, "
              f"grid {args.grid}, 96 px PCam train tiles at 0.97 µm/px, tiled "
              + {"annotations": "exactly at the mosaic's tissue cells (its tissue GeoJSON, `--tissue annotations`)",
                 "both": "both ways, each task twice on the same slides (`--tissue both`): where tissue detection finds "
                         "tissue (min tissue 0.5), and exactly at the mosaic's tissue cells (its tissue GeoJSON)"
                         + ("; and a third time on those exact cells thinned at random to as many per slide as "
                            "detection kept (`--thinned-control`)" if args.thinned_control else "")
                         + "; every method is paired across them below"}.get(args.tissue, "where tissue detection "
                                                                              "finds tissue (min tissue 0.5)")
              + f"{f', {identity(args)}' if identity(args) else ''}. Cache {args.views} views x {args.tiles_per_view} "
              f"tiles; Giga-SSL {args.gigassl_epochs} epochs, {args.tiles_per_step} tiles per step, SparseConvMIL "
              f"(2 sparse residual blocks, BatchNorm with zero-initialised last scale, stride-2 pooling); SLPD {args.slpd_epochs} epochs, regions "
              f"{args.region_size} px at 0.5 µm/px, k=2. Linear = StandardScaler + balanced logistic regression, C=10. "
              + ("MIL: not run (`--no-mil`). " if args.no_mil else
                 f"MIL = gigaslide.mil.cv.run_cv ({args.mil_epochs} epochs max, early stopping on a validation split)"
                 + ("" if args.mil_models == MIL_DEFAULT else f": {', '.join(args.mil_models)} (the default runs "
                                                               f"{', '.join(MIL_DEFAULT)})") + ". ")
              + (f"MIL over regions (`--region-mil`, the SLPD paper's aggregator protocol): {', '.join(args.region_mil)} "
                 f"trained on the region embeddings of {' and of '.join(REGION_MIL_MODES)}, one instance per region. "
                 if args.region_mil else "")
              + 
              f"{args.folds} stratified patient-grouped folds; few-shot: {args.draws} draws per fold; AUC = mean over draws "
              f"of the out-of-fold AUC.\n")
    for task, res in results.items():
        y, preds, info = res["y"], res["preds"], res["info"]
        md.append(f"## Task: {task} ({info['n_slides']} slides, {info['n_pos']} positive, {info['tiles']:.0f} tiles per slide)\n")
        if info.get("no_tissue"):
            md.append(f"{len(info['no_tissue'])} slide(s) with no tile at the tissue threshold (min-tissue 0.5) are left out of "
                      f"every row: {', '.join(info['no_tissue'])}.\n")
        md.append("| method | " + " | ".join(f"n = {n}" for n in args.ns) + " |")
        md.append("|---|" + "---|" * len(args.ns))
        for name, p in preds.items():
            md.append(f"| {name} | " + " | ".join(f"{mean_auc(y, p[n]):.3f}" for n in args.ns) + " |")
        md.append("\nPaired bootstrap of AUC differences (same test slides, "
                  f"{args.bootstrap} resamples): diff [95 % CI], P(diff <= 0)\n")
        md.append("| comparison | " + " | ".join(f"n = {n}" for n in args.ns) + " |")
        md.append("|---|" + "---|" * len(args.ns))
        verdicts = []
        ref = "ABMIL" if "ABMIL" in preds else "mean pooling (linear)"
        pairs = [("Giga-SSL (linear)", ref), ("Giga-SSL (linear)", "mean pooling (linear)"),
                 ("SLPD +intra+inter (linear)", "SLPD DINO only (linear)"), ("SLPD +intra (linear)", "SLPD DINO only (linear)"),
                 ("SLPD +intra+inter (linear)", ref)]
        pairs += [(f"{v} (linear)", f"{FULL_SLPD} (linear)") for v, _, _ in args.variants]
        for m in args.region_mil:  # the aggregator protocol: the claim under it, and against its own linear probe / tiles
            full, dino = region_row(FULL_SLPD, m), region_row("SLPD DINO only", m)
            pairs += [(full, dino), (full, f"{FULL_SLPD} (linear)")] + ([(full, m)] if m in preds else [])
        for pe in ("TransMIL", "TransMIL-grid"):  # position encoding: what it adds, and slide SSL against it
            if pe in preds:
                pairs += ([(pe, "TransMIL-noPPEG")] if "TransMIL-noPPEG" in preds else []) + [
                    ("SLPD +intra+inter (linear)", pe)]
        for a, b in dict.fromkeys(pairs):  # (without MIL the reference is mean pooling: that pair once)
            cells = []
            for n in args.ns:
                d, lo, hi, pneg = paired(y, preds[a][n], preds[b][n], args.bootstrap)
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}], {pneg:.2f}")
                if n == args.ns[0] or n == "50":
                    verdicts.append((a, b, n, d, lo, hi))
            md.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        md.append("")
        for a, b, n, d, lo, hi in verdicts:
            word = "better (CI above 0)" if lo > 0 else "worse (CI below 0)" if hi < 0 else "no clear difference (CI spans 0)"
            md.append(f"- {task}, n = {n}: {a} vs {b}: {d:+.3f} — {word}.")
        col = {k: v for k, v in info["collapse"].items() if v}
        md.append(f"- SLPD collapse monitor: {'collapsed: ' + ', '.join(f'{k} ({v})' for k, v in col.items()) if col else 'no run collapsed'}.")
        md.append(f"- {gigassl_monitor_line(info)}")
        k = info["kept"]
        source = {"annotations": "Tiling from the mosaic's own tissue annotations (`gigaslide tile --tissue-from "
                                 "MOSAIC/tissue`, no tissue detection)",
                  "thinned": "Random thinning of the exact tissue cells (`--thinned-control`: each slide keeps as many "
                             "cells as detection kept on it, chosen uniformly at random)"}.get(info["tissue"],
                                                                                            "Tissue detection (min tissue 0.5)")
        md.append(f"- {source} kept {k['pos']:.1%} of the tissue cells of positive slides and "
                  f"{k['neg']:.1%} of negative ones; the kept fraction alone, as a slide score, has AUC {k['auc']:.3f} (0.5: no "
                  "cue; below 0.5 it points the other way): a cue a bag mean can use without seeing the tiles' "
                  "arrangement." + (f" The tissue cells it dropped are {brightness_word(k)} those it kept: mean RGB "
                                    f"brightness {k['bright_dropped']:.0f} against {k['bright_kept']:.0f} (0-255)."
                                    if "bright_dropped" in k else "") + "\n")
        if info.get("mix_r2"):
            md.append("- How much of each slide embedding is the slide's own tissue mix (5-fold CV R² of a ridge "
                      "regression from the embedding to its drawn mix over the tissue kinds; 1 = the mix is fully "
                      "readable, 0 = not at all): " + "; ".join(f"{k} {v:.3f}" for k, v in info["mix_r2"].items())
                      + ". The mix is drawn independently of the label: what of it an embedding carries is nuisance "
                        "for this task.")
        if info.get("regions"):
            md.append("- Regions per slide (MIL over regions): " + "; ".join(f"{k} {v:.1f}" for k, v in info["regions"].items())
                      + ".\n")
        md.append("| artifact | bytes per slide |\n|---|---|")
        md += [f"| {k} | {v:.0f} |" for k, v in info["bytes"].items()]
        md.append("")
    md += tissue_pairs(results, args)
    md.append("## Claims\n")
    md += claims(results, args)
    if args.slide_stain:
        md.append(f"- Slide identity: every mosaic slide here has its own H&E stain (`gigaslide mosaic --slide-stain "
                  f"{args.slide_stain:g}`), as slides from different labs and batches do; the stain is unrelated to the "
                  "label, so a slide encoder can tell slides apart by it without learning anything about the task.")
    if args.slide_composition:
        md.append(f"- Slide identity: every mosaic slide here has its own mix of normal tissue (`gigaslide mosaic "
                  f"--slide-composition {args.slide_composition:g} --tissue-kinds {args.tissue_kinds}`: {args.tissue_kinds} "
                  "k-means kinds of PCam normal tiles, each slide's weights over them drawn from a Dirichlet), as lymph "
                  "nodes differ in fat, follicles and sinus; in the tumour and context tasks the mix is drawn "
                  "independently of the label.")
    if "composition" in results:
        md.append("- Composition task (`gigaslide mosaic --task composition`): no slide holds tumour; the label is the "
                  "slide's tissue mix, as a subtype is: each class's Dirichlet favours its own random half of the kinds "
                  "3:1, so single slides of the two classes overlap and only the averages differ.")
    if not (args.slide_stain or args.slide_composition):
        md.append("- Slide identity: every mosaic slide draws its tiles from one shared PCam pool, so two random tile subsets "
                  "of one slide share nothing slide-specific (no patient, stain or scanner identity) beyond its tumour "
                  "content and tissue shape; instance discrimination (Giga-SSL) and slide-level prototypes (SLPD) have "
                  "little slide-specific signal to learn from (the view-retrieval monitor above measures it). The papers' "
                  "slides (TCGA) carry strong per-slide identity: `--slide-stain` gives mosaic slides their own stain.")
    md.append("\n| step | seconds |\n|---|---|")
    md += [f"| {k} | {v:.1f} |" for k, v in TIMES.items()]
    md.append(f"\nMachine: {machine()}; timings are wall-clock ({args.load_note}).")
    return "\n".join(md)


def tissue_pairs(results: dict, args) -> list[str]:  # noqa: ANN001
    """``--tissue both``: every method tiled by detection vs exactly at the tissue cells (and, with
    ``--thinned-control``, each against exact cells thinned at random to detection's count), paired on the same test
    slides (same mosaic, tile encoder, folds and draws), so what a method took from tissue detection is measured, not
    guessed from two reports."""
    if args.tissue != "both":
        return []
    arms = [("detected", "annotations")] + ([("detected", "thinned"), ("thinned", "annotations")]
                                           if args.thinned_control else [])
    md = []
    for task in args.tasks.split(","):
        for x, z in arms:
            md += _pair_arms(task, ARMS[x], ARMS[z], results[f"{task} ({ARMS[x]})"], results[f"{task} ({ARMS[z]})"],
                             args)
    return md


def _pair_arms(task: str, na: str, nb: str, a: dict, b: dict, args) -> list[str]:  # noqa: ANN001
    """One paired section: every method of tiling arm ``na`` minus the same method of arm ``nb``."""
    if a["info"]["mosaic_sha256"] != b["info"]["mosaic_sha256"]:
        raise SystemExit(f"--tissue both: the {task} task's mosaics differ (not the same slides): rebuild them in a "
                         "fresh --work")
    ida, idb = a["info"]["slide_ids"], b["info"]["slide_ids"]
    ids = [s for s in idb if s in set(ida)]
    ia, ib = [ida.index(s) for s in ids], [idb.index(s) for s in ids]
    y = np.asarray(b["y"])[ib]
    assert np.array_equal(np.asarray(a["y"])[ia], y), "same slides, same labels"
    same = set(ida) == set(idb)  # same slide set -> the same label table, folds and few-shot draws for both
    head = na[0].upper() + na[1:]
    md = [f"## {head} vs {nb}, {task} task: every method paired on the same test slides\n",
          f"One mosaic (SHA-256 {a['info']['mosaic_sha256'][:12]} of its record, labels and ground truth, built once per "
          f"arm with one seed and checked identical), one tile encoder, two tilings: {na} and {nb}. "
          + ("Both keep every slide, so folds and few-shot draws are identical: each difference is paired per test "
             "slide and draw. " if same else f"{head} and {nb} differ in slides: {len(ida) + len(idb) - 2 * len(ids)} "
                                             f"slide(s) left without tissue: pairs are on the {len(ids)} slides both have, "
                                             "whose folds differ slightly. ")
          + f"diff = {na} − {nb} [95 % paired bootstrap CI, {args.bootstrap} resamples over test slides]; above 0: the "
          f"method scored higher on the {na} tiles.\n"]
    last = args.ns[-1]
    md.append(f"| method | AUC, {na} (n = {last}) | AUC, {nb} (n = {last}) | "
              + " | ".join(f"diff, n = {n}" for n in args.ns) + " |")
    md.append("|---|---|---|" + "---|" * len(args.ns))
    up, down, flat = [], [], []
    for name in (k for k in a["preds"] if k in b["preds"]):
        pa, pb = a["preds"][name], b["preds"][name]
        cells = []
        for n in args.ns:
            d, lo, hi, _ = paired(y, pa[n][:, ia], pb[n][:, ib], args.bootstrap)
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        (up if lo > 0 else down if hi < 0 else flat).append(f"{name} {d:+.3f}")
        md.append(f"| {name} | {mean_auc(y, pa[last][:, ia]):.3f} | {mean_auc(y, pb[last][:, ib]):.3f} | "
                  + " | ".join(cells) + " |")
    md.append("")
    md.append(f"- {task}, n = {last}: higher on {na} (CI above 0): {', '.join(up) or 'none'}; higher on {nb} (CI below "
              f"0): {', '.join(down) or 'none'}; not distinguishable: {', '.join(flat) or 'none'}.")
    ra, rb = a["info"].get("mix_r2") or {}, b["info"].get("mix_r2") or {}
    if ra and rb:
        md.append(f"- The slide's own tissue mix, read out of each embedding (CV R², {na} → {nb}): "
                  + "; ".join(f"{k} {ra[k]:.3f} → {rb[k]:.3f}" for k in ra if k in rb) + ".")
    md.append("")
    return md


def identity(args) -> str:  # noqa: ANN001
    """The per-slide identity the mosaic slides were given ("" for none)."""
    parts = ([f"per-slide stain {args.slide_stain:g}"] if args.slide_stain else []) + (
        [f"per-slide tissue composition (Dirichlet {args.slide_composition:g} over {args.tissue_kinds} kinds)"]
        if args.slide_composition else [])
    return " and ".join(parts)


def collapse_caveat(collapse: dict) -> str:
    """Beside the SLPD claim: which of its two runs ended collapsed (their embeddings are still evaluated, but such a
    comparison is of a run whose DINO head lost its signal, not of the method working as meant)."""
    hit = [f"{k} ({collapse[k]})" for k in (FULL_SLPD, "SLPD DINO only") if collapse.get(k)]
    return (f"; but {' and '.join(hit)} ended collapsed by the monitor above (teacher near uniform or one output), so this "
            "compares a collapsed pre-training, not the method as meant" if hit else "")


def few_shot_near(ns: list[str], target: int) -> str:
    """The few-shot training-set size in ``ns`` closest to ``target`` (the first entry if none is a number)."""
    nums = [n for n in ns if n != "all"]
    return min(nums, key=lambda n: abs(int(n) - target)) if nums else ns[0]


def verdict(lo: float, hi: float, margin: float = 0.0) -> str:
    """Three-way verdict from a paired CI of (method - reference): above ``-margin`` / below 0 / neither."""
    if lo > -margin:
        return "reproduces"
    if hi < 0:
        return "does not reproduce (contradicted: CI below 0)"
    return "not shown at this scale (CI spans 0)"


def gigassl_monitor_line(info: dict) -> str:
    """The Giga-SSL run's label-free monitor: final and exported epoch against the untrained encoder."""
    gf, ex, u = info["gigassl_final"], info.get("gigassl_exported"), info.get("gigassl_untrained")
    line = (f"Giga-SSL final epoch ({info.get('gigassl_epochs', '?')}): loss {gf['loss']:.3f}, label-free view retrieval "
            f"top-1 {gf['retrieval_top1']:.3f}")
    if ex is not None:
        line += f"; exported epoch {info['gigassl_exported_epoch']} (best by the monitor): top-1 {ex['retrieval_top1']:.3f}"
    if u is not None:
        line += f"; untrained encoder: top-1 {u['retrieval_top1']:.3f}"
    if info.get("gigassl_raw") is not None:  # the identity the cached views carry before any model
        line += f"; the views' mean raw features: top-1 {info['gigassl_raw']['retrieval_top1']:.3f}"
    return line + f" (chance {1.0 / info['n_slides']:.3f})."


def claims(results: dict, args) -> list[str]:
    """Plain verdicts computed from the rows above (paired bootstrap CIs)."""
    out = []
    for task, res in results.items():
        y, p = res["y"], res["preds"]
        ref = "ABMIL" if "ABMIL" in p else "mean pooling (linear)"
        small = next((n for n in args.ns if n != "all"), args.ns[0])
        near50 = few_shot_near(args.ns, 50)  # the paper's few-shot claim is at ~50 training slides
        info = res["info"]
        gf, chance, u = info.get("gigassl_exported") or info["gigassl_final"], 1.0 / info["n_slides"], info.get("gigassl_untrained")
        if info.get("gigassl_learned") is False:
            out.append(f"- {task}: Giga-SSL's exported epoch ({info['gigassl_exported_epoch']}, the best by its label-free "
                       f"monitor) does not beat the untrained slide encoder on that monitor (view retrieval top-1 "
                       f"{gf['retrieval_top1']:.3f} vs {u['retrieval_top1']:.3f} untrained, chance {chance:.3f}): its "
                       "pre-training did **not learn** in this budget, so its rows test an untrained-like encoder, not the method.")
        elif info.get("gigassl_learned") is None and gf["retrieval_top1"] <= 2 * chance:
            out.append(f"- {task}: Giga-SSL's label-free monitor (view retrieval top-1 {gf['retrieval_top1']:.3f}, chance "
                       f"{chance:.3f}) says its pre-training did **not learn** in this budget: its rows test an "
                       "untrained-like encoder, not the method.")
        for n, what, margin in ((near50, f"few-shot gain over {ref} (paper: +6.3 AUC at ~50 slides)", 0.0),
                                ("all", f"maintains {ref}'s AUC with all training slides (non-inferiority margin 0.05)", 0.05)):
            if n not in args.ns:
                continue
            d, lo, hi, _ = paired(y, p["Giga-SSL (linear)"][n], p[ref][n], args.bootstrap)
            ra = mean_auc(y, p[ref][n])
            word = verdict(lo, hi, margin) if ra >= 0.6 else f"not testable: {ref} itself is near chance (AUC {ra:.3f})"
            out.append(f"- Giga-SSL {what}, {task} task, n = {n}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] — **{word}**.")
        for n in dict.fromkeys([small, args.ns[-1]]):  # few-shot, and the paper's linear evaluation on all slides
            d, lo, hi, _ = paired(y, p["SLPD +intra+inter (linear)"][n], p["SLPD DINO only (linear)"][n], args.bootstrap)
            out.append(f"- SLPD prototype distillation beats DINO-only region pre-training, {task} task, n = {n}: {d:+.3f} "
                       f"[{lo:+.3f}, {hi:+.3f}] — **{verdict(lo, hi)}**{collapse_caveat(info['collapse'])}.")
        for m in args.region_mil:  # the SLPD paper's aggregator protocol
            for n in dict.fromkeys([small, args.ns[-1]]):
                d, lo, hi, _ = paired(y, p[region_row(FULL_SLPD, m)][n], p[region_row("SLPD DINO only", m)][n],
                                      args.bootstrap)
                out.append(f"- SLPD prototype distillation beats DINO-only region pre-training under MIL over regions "
                           f"({m}), {task} task, n = {n}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] — **{verdict(lo, hi)}**"
                           f"{collapse_caveat(info['collapse'])}.")
        if info["task"] == "context":
            best = max(p, key=lambda k: mean_auc(y, p[k]["all" if "all" in args.ns else small]))
            a = mean_auc(y, p[best]["all" if "all" in args.ns else small])
            out.append(f"- Context task (only spatial arrangement differs): best method {best} at AUC {a:.3f}; "
                       f"mean pooling {mean_auc(y, p['mean pooling (linear)'][small]):.3f} at n = {small} and "
                       f"{mean_auc(y, p['mean pooling (linear)'][args.ns[-1]]):.3f} at n = {args.ns[-1]} (a bag mean "
                       "cannot see the arrangement itself, only what differs in the set of tiles kept, as above).")
        if args.variants:
            last = args.ns[-1]
            label = {FULL_SLPD: "as run above", **{v: v[len(FULL_SLPD) + 2:-1] for v, _, _ in args.variants}}
            aucs = {k: mean_auc(y, p[f"{k} (linear)"][last]) for k in label}
            seeds = [aucs[FULL_SLPD]] + [aucs[v] for v, _, kw in args.variants if "seed" in kw]
            out.append(f"- {FULL_SLPD} pre-trained again, {task} task, n = {last}: AUC {aucs[FULL_SLPD]:.3f} as run above "
                       f"(seed 0, {args.slpd_epochs} epochs); " + "; ".join(f"{label[v]}: {aucs[v]:.3f}"
                                                                          for v, _, _ in args.variants)
                       + (f". Spread over {len(seeds)} pre-training seeds: {max(seeds) - min(seeds):.3f} AUC (one SLPD run's "
                          "result moves this much with its seed alone)." if len(seeds) > 1 else "."))
            vs = {k: paired(y, p[f"{k} (linear)"][last], p["mean pooling (linear)"][last], args.bootstrap) for k in label}
            out.append(f"- Each {FULL_SLPD} run against mean pooling, {task} task, n = {last} (paired): " + "; ".join(
                f"{label[k]} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                for k, (d, lo, hi, _) in vs.items()) + f" — CI above 0 for {sum(v[1] > 0 for v in vs.values())} of "
                f"{len(vs)} runs.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None, help="(default /tmp/gigaslide_bench_slide_ssl, + _stainS / _compA with "
                    "--slide-stain S / --slide-composition A)")
    ap.add_argument("--topic", default="slide_ssl", help="results/<topic>.md this run writes")
    ap.add_argument("--small", action="store_true", help="the reduced setting (minutes on a busy CPU)")
    ap.add_argument("--tasks", default="tumour,context")
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--slide-stain", type=float, default=0.0,
                    help="each mosaic slide its own H&E stain (gigaslide mosaic --slide-stain), as real cohorts have")
    ap.add_argument("--slide-composition", type=float, default=0.0,
                    help="each mosaic slide its own mix of normal tissue kinds (gigaslide mosaic --slide-composition)")
    ap.add_argument("--tissue-kinds", type=int, default=8)
    ap.add_argument("--tissue", choices=("detected", "annotations", "both"), default="detected",
                    help="tiles where tissue detection finds tissue, or exactly the mosaic's tissue cells (its tissue "
                         "GeoJSON, gigaslide tile --tissue-from): no bag-level cue from what detection keeps; both: each "
                         "task run both ways on the same slides, every method paired detected vs exact")
    ap.add_argument("--thinned-control", action="store_true",
                    help="with --tissue both: a third arm, the exact tissue cells thinned at random to as many per slide "
                         "as detection kept (detection's tile count without its choice of cells), paired against both")
    ap.add_argument("--views", type=int, default=25)
    ap.add_argument("--tiles-per-view", type=int, default=32)
    ap.add_argument("--tiles-per-step", type=int, default=16)
    ap.add_argument("--gigassl-epochs", type=int, default=300)
    ap.add_argument("--gigassl-batch", type=int, default=None)
    ap.add_argument("--slpd-epochs", type=int, default=30)
    ap.add_argument("--slpd-variants", default="",
                    help="the full SLPD again with one setting changed, paired against it: e.g. seed=1,seed=2,epochs=8,"
                         "prototypes=4")
    ap.add_argument("--region-size", type=int, default=745, help="px at 0.5 µm/px (372 µm = 4x4 mosaic tiles)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--ns", default="25,50,100,all")
    ap.add_argument("--mil-epochs", type=int, default=40)
    ap.add_argument("--mil-models", default=",".join(MIL_DEFAULT),
                    help=f"which MIL baselines run, of {', '.join(MIL)} (TransMIL is the slowest)")
    ap.add_argument("--region-mil", default="",
                    help=f"MIL models (of {', '.join(MIL)}) also trained over the region embeddings of SLPD DINO-only "
                         "and +intra+inter (the SLPD paper's aggregator protocol beside its linear one), e.g. ABMIL")
    ap.add_argument("--no-mil", action="store_true")
    ap.add_argument("--no-random-control", action="store_true")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tile-ssl-budget", default="6m")
    ap.add_argument("--tile-n", type=int, default=500)
    args = ap.parse_args()
    if args.work is None:
        args.work = ("/tmp/gigaslide_bench_slide_ssl" + (f"_stain{args.slide_stain:g}" if args.slide_stain else "")
                     + (f"_comp{args.slide_composition:g}" if args.slide_composition else "")
                     + {"annotations": "_annotated", "both": "_both"}.get(args.tissue, ""))
    if args.small:
        args.slides, args.grid, args.views, args.tiles_per_view = 24, 10, 3, 12
        args.gigassl_epochs, args.slpd_epochs, args.folds, args.draws = 80, 4, 3, 3
        args.ns, args.mil_epochs, args.bootstrap, args.tile_n, args.gigassl_batch = "8,all", 10, 300, 200, 12
        args.tiles_per_step, args.work = 8, args.work + "_small"
    defaults = vars(ap.parse_args([]))
    args.reduced = {k: (v, defaults[k]) for k, v in vars(args).items()  # the settings below the full (default) one
                    if k in SCALE and v != defaults[k]}
    args.ns = [s.strip() for s in args.ns.split(",")]
    unknown = sorted(set(m.strip() for m in args.mil_models.split(",")) - set(MIL))
    if unknown:
        ap.error(f"--mil-models: unknown {', '.join(unknown)} (choose from {', '.join(MIL)})")
    args.mil_models = [m.strip() for m in args.mil_models.split(",")]
    args.region_mil = [m.strip() for m in args.region_mil.split(",") if m.strip()]
    if set(args.region_mil) - set(MIL):
        ap.error(f"--region-mil: unknown {', '.join(sorted(set(args.region_mil) - set(MIL)))} (choose from {', '.join(MIL)})")
    if args.thinned_control and args.tissue != "both":
        ap.error("--thinned-control is a third arm of --tissue both (add --tissue both)")
    args.variants = slpd_variants(args.slpd_variants)  # parsed here: a bad spec stops before hours of training
    torch.set_num_threads(1)
    shared = shared_data_dir()
    if shared is None:
        print("no shared data (PCam tiles): cannot run")
        return
    pcam, work = shared / "tiles" / "pcam", Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # the machine's load when the timed steps first ran: a resumed run (report regenerated) keeps it with their times
    lf = work / "load.json"
    args.load_note = json.loads(lf.read_text())["load_note"] if lf.is_file() else load_note()
    lf.write_text(json.dumps({"load_note": args.load_note}))
    TIMES_FILE.append(work / "times.json")
    if TIMES_FILE[0].is_file():
        SAVED.update(json.loads(TIMES_FILE[0].read_text()))
    enc, desc = timed("tile encoder (load; its SSL training budget is stated above)", tile_encoder, work, pcam, args,
                      done=work / "tile_ssl" / "encoder" / "weights.safetensors")
    tile = {"ssl": timed("tile linear AUC", tile_auc, enc, pcam, args.tile_n),
            "random": tile_auc(random_encoder(), pcam, args.tile_n)}
    results = {label: run_task(task, work, pcam, enc, args, label, folder, tissue)
               for task in args.tasks.split(",") for label, folder, tissue in tissue_runs(task, args)}
    tumour = next((k for k, r in results.items() if r["info"]["task"] == "tumour"), None)
    if not args.no_random_control and tumour is not None:
        results[tumour]["preds"].update(random_control(work, pcam, args))
    (work / "results.json").write_text(json.dumps({"times": TIMES, "tile": tile}, indent=1))
    print(write_result(args.topic, report(results, tile, args, desc)))


if __name__ == "__main__":
    main()

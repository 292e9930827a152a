"""Is the mosaic *context* task solvable from the tile features the slide methods get? A supervised reference.

In ``results/slide_ssl*.md`` every method (Giga-SSL, SLPD, mean pooling, ABMIL, CLAM, TransMIL) is near chance on
the context task (same tumour fraction in both classes; label = one contiguous tumour region vs scattered tumour
tiles). This asks whether that is the methods' failure or the features': the same mosaic (``bench_slide_ssl``'s
reduced context setting), the same SSL tile encoder, and a reference that is *given what no slide method gets* --
tile-level tumour labels of the training slides:

* ``oracle``: the true tumour tiles (ground truth of the mosaic) -- the task itself, no features;
* ``tile classifier + contiguity``: a logistic regression on tile features fitted on the training slides' tiles
  (true tumour labels), its out-of-fold tumour probabilities on the test slides;
* ``tile classifier, mean probability``: the same probabilities averaged (the tumour fraction: matched between the
  classes by design, so this should stay at chance);
* the same with the features of the untrained encoder;
* supervised MIL on the SSL features with slide labels only (what the slide methods compete with): ABMIL and TransMIL
  without PPEG, with the paper's PPEG (tiles in file order = row-major on the slide's grid, wrapped on a square) and
  with PPEG on the slide's tiling grid (``layout="grid"``), through ``run_cv`` on the same folds, ``--mil-seeds``
  seeds each (AUC = mean over seeds; paired bootstrap over slides).

Contiguity of a slide = the tumour-weighted mean, over tiles, of the mean tumour probability of a tile's 4
grid neighbours, minus the slide's mean probability (how much more tumour surrounds tumour than the slide has):
high for one region, near 0 for scattered tiles. AUCs are out of fold (5 stratified folds, the fold's own
training slides only), with 95 % bootstrap CIs over slides and paired bootstrap differences on the same slides.

    .venv/bin/python benchmarks/bench_slide_context.py [--work /tmp/gs-ctx]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_slide_ssl as B  # noqa: E402
from _common import load_note, write_result  # noqa: E402

from gigaslide.evaluation import splits as S  # noqa: E402
from gigaslide.evaluation.metrics import auc, bootstrap_ci  # noqa: E402
from gigaslide.features import store  # noqa: E402
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth, tumor_labels_for_coords  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402


def contiguity(coords: np.ndarray, p: np.ndarray, cell: int) -> float:
    """Tumour-weighted mean of the 4-neighbour mean probability, minus the slide's mean probability."""
    pos = {(int(x) // cell, int(y) // cell): i for i, (x, y) in enumerate(coords)}
    nb = np.zeros(len(p))
    for (gx, gy), i in pos.items():
        js = [pos[k] for k in ((gx + 1, gy), (gx - 1, gy), (gx, gy + 1), (gx, gy - 1)) if k in pos]
        nb[i] = p[js].mean() if js else 0.0
    w = p.sum()
    return float((p * nb).sum() / w - p.mean()) if w > 0 else 0.0


def features_of(slides: list[str], out: Path, enc) -> dict[str, store.FeatureFile]:  # noqa: ANN001
    from gigaslide.features.extract import encode_slides
    from gigaslide.tiling import TilingParams

    res = encode_slides(slides, out, enc, TilingParams(0.97, 96, 0, 0.5), batch_size=128, precision="fp32",
                        overlays=False)
    return {sid: store.load(out / "features" / f"{sid}.h5") for sid in res.done + res.skipped}


def scores(files: dict, truth: dict, t, folds, cell: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Out-of-fold slide scores: contiguity and mean of the tile classifier's tumour probability."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cont, mean, tile_auc = np.zeros(len(t.labels)), np.zeros(len(t.labels)), []
    for tr, te in folds:
        X = np.concatenate([files[t.slide_ids[i]].features for i in tr])
        y = np.concatenate([truth[t.slide_ids[i]] for i in tr])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")).fit(X, y)
        ys, ps = [], []
        for i in te:
            f = files[t.slide_ids[i]]
            p = clf.predict_proba(f.features)[:, 1]
            cont[i], mean[i] = contiguity(f.coords, p, cell), p.mean()
            ys.append(truth[t.slide_ids[i]])
            ps.append(p)
        tile_auc.append(auc(np.concatenate(ys), np.concatenate(ps)))
    return {"contiguity": cont, "mean": mean, "tile_auc": np.array(tile_auc)}


def paired_diff(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    d = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i])) == 2:
            d.append(auc(y[i], a[i]) - auc(y[i], b[i]))
    return auc(y, a) - auc(y, b), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


#: label -> (MIL model, its settings, run folder under WORK/context/mil)
MIL = {"ABMIL": ("abmil", {}, "ABMIL"), "TransMIL-noPPEG": ("transmil", {"ppeg": False}, "TransMIL-noPPEG"),
       "TransMIL (PPEG)": ("transmil", {}, "TransMIL_PPEG"),
       "TransMIL-grid (PPEG on the tiling grid)": ("transmil", {"layout": "grid"}, "TransMIL-grid")}


def mil_oof(feature_dir: Path, labels_csv: Path, out: Path, t, folds, model: str, kw: dict, args) -> np.ndarray:  # noqa: ANN001
    """[seeds, slides] out-of-fold P(contiguous) of one MIL model, on ``folds`` (checked against run_cv's)."""
    from gigaslide.evaluation.slides import read_predictions
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.train import TrainConfig

    p = np.full((args.mil_seeds, len(t.labels)), np.nan)
    for seed in range(args.mil_seeds):
        d = out / f"seed{seed}"
        cfg = TrainConfig(model=model, epochs=args.mil_epochs, patience=max(3, args.mil_epochs // 3), seed=seed,
                          device="cpu", model_kwargs=dict(kw))
        # the folds come from the seed too: fold seed 0 (this script's folds) for every training seed
        run_cv(feature_dir, labels_csv, d, cfg=cfg, folds=args.folds, n_bootstrap=0, on_missing="skip", verbose=False,
               fold_seed=0)
        pred = read_predictions(d / "predictions.csv")
        for sid, pr in zip(pred.slide_ids, pred.probs[:, 1]):
            p[seed, t.slide_ids.index(sid)] = pr
        test_of = {sid: int(f) for sid, f in zip(pred.slide_ids, pred.folds)}
        assert all(test_of[t.slide_ids[i]] == k for k, (_, te) in enumerate(folds) for i in te), "fold mismatch"
    assert not np.isnan(p).any()
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/gs-ctx")
    ap.add_argument("--slides", type=int, default=120)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--tile-ssl-budget", default="6m")
    ap.add_argument("--mil-epochs", type=int, default=40)
    ap.add_argument("--mil-seeds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(args.work)
    pcam = shared_data_dir() / "tiles" / "pcam"
    mosaic = work / "context" / "mosaic"
    build_mosaic(pcam / "train", mosaic, MosaicConfig(slides=args.slides, grid=args.grid, tumor_fraction=(0.1, 0.3), seed=0,
                                                      task="context"), verbose=False)
    slides = sorted(str(p) for p in (mosaic / "slides").glob("*.tiff"))
    ssl_enc, ssl_desc = B.tile_encoder(work, pcam, args)
    encs = {"SSL tile encoder": ssl_enc, "untrained encoder": B.random_encoder()}
    files = {k: features_of(slides, work / "context" / f"features_{i}", e) for i, (k, e) in enumerate(encs.items())}
    ids = sorted(files["SSL tile encoder"])
    t = S.match_features(S.read_labels(mosaic / "labels.csv"), ids, on_missing="skip").table
    folds = S.make_folds(t.labels, t.patient_ids, args.folds, 0, where=mosaic / "labels.csv")
    gts = {s: read_ground_truth(mosaic / "ground_truth" / f"{s}.csv") for s in t.slide_ids}
    cell = int(next(iter(gts.values()))[0, 2])  # mosaic cell = one PCam tile, level-0 px
    any_files = files["SSL tile encoder"]
    assert all(np.array_equal(any_files[s].coords, files["untrained encoder"][s].coords) for s in t.slide_ids)
    truth = {s: tumor_labels_for_coords(gts[s], any_files[s].coords, cell) for s in t.slide_ids}
    y = t.labels
    rows = {"oracle: true tumour tiles, contiguity": np.array([contiguity(any_files[s].coords, truth[s].astype(float), cell)
                                                              for s in t.slide_ids])}
    tile_aucs = {}
    for k in encs:
        sc = scores(files[k], truth, t, folds, cell)
        rows[f"{k}: tile classifier + contiguity"] = sc["contiguity"]
        rows[f"{k}: tile classifier, mean probability"] = sc["mean"]
        tile_aucs[k] = sc["tile_auc"]
    res = {k: (auc(y, v), *bootstrap_ci(auc, y, v, n_bootstrap=args.bootstrap)) for k, v in rows.items()}
    mil, mil_s = {}, {}
    for name, (model, kw, folder) in MIL.items():
        t1 = time.perf_counter()
        mil[name] = mil_oof(work / "context" / "features_0" / "features", mosaic / "labels.csv",
                            work / "context" / "mil" / folder, t, folds, model, kw, args)
        mil_s[name] = time.perf_counter() - t1
    mil_auc = {k: B.mean_auc(y, v) for k, v in mil.items()}
    frac = np.array([truth[s].mean() for s in t.slide_ids])
    lines = ["# Slide SSL: is the context task solvable from the tile features? A supervised reference", "",
             f"Mosaic: `bench_slide_ssl`'s reduced context setting ({len(y)} slides with tissue, {int(y.sum())} contiguous, "
             f"grid {args.grid}, tumour fraction 0.1-0.3 in both classes; mean true tumour fraction "
             f"{frac[y == 1].mean():.3f} contiguous vs {frac[y == 0].mean():.3f} scattered). Tile features at 0.97 µm/px, "
             f"96 px, min tissue 0.5, from {ssl_desc} and from the same network untrained. The tile classifier is fitted on "
             f"each fold's training slides with their true tumour tiles -- labels no slide method here gets. "
             f"{args.folds} stratified folds, out-of-fold scores; 95 % bootstrap CIs over slides ({args.bootstrap} resamples). "
             f"Load: {load_note()}.", "",
             "| slide score | AUC (contiguous vs scattered) [95 % CI] | tile AUC of the classifier (per fold mean) |",
             "|---|---|---|"]
    for k, (a, lo, hi) in res.items():
        enc_name = next((e for e in encs if k.startswith(e)), None)
        ta = f"{tile_aucs[enc_name].mean():.3f}" if enc_name else "-"
        lines.append(f"| {k} | {a:.3f} [{lo:.3f}, {hi:.3f}] | {ta} |")
    ssl_c, rnd_c = "SSL tile encoder: tile classifier + contiguity", "untrained encoder: tile classifier + contiguity"
    d, dlo, dhi = paired_diff(y, rows[ssl_c], rows["SSL tile encoder: tile classifier, mean probability"], args.bootstrap)
    d2, d2lo, d2hi = paired_diff(y, rows[ssl_c], rows[rnd_c], args.bootstrap)
    a, lo, hi = res[ssl_c]
    solvable = lo > 0.5
    lines += ["", "Paired bootstrap of AUC differences (same slides):", "",
              f"- contiguity − mean probability (SSL features): {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]",
              f"- SSL − untrained features (contiguity): {d2:+.3f} [{d2lo:+.3f}, {d2hi:+.3f}]", "",
              "Verdicts (computed from the rows above):", "",
              f"- the task itself (true tumour tiles): AUC {res['oracle: true tumour tiles, contiguity'][0]:.3f}.",
              f"- from the SSL tile features, with tile labels: AUC {a:.3f} [{lo:.3f}, {hi:.3f}] -- "
              + ("the features carry the arrangement (CI above 0.5): the context task is solvable from them, so a slide "
                 "method near chance on it fails to use the arrangement, not for want of information."
                 if solvable else
                 "not distinguishable from chance (CI reaches 0.5): with these features even a tile classifier given tile "
                 "labels cannot see the arrangement, so no slide method could be expected to solve the context task at "
                 "this scale; it says nothing for or against the methods."),
              f"- the tumour fraction alone (mean probability, SSL features): AUC "
              f"{res['SSL tile encoder: tile classifier, mean probability'][0]:.3f} (matched by design)."]
    n_tiles = np.array([len(any_files[s].coords) for s in t.slide_ids])
    full = int((n_tiles == args.grid ** 2).sum())
    lines += ["", "## Supervised MIL on the same slides, slide labels only (SSL features)", "",
              f"`run_cv` on the folds above ({args.mil_epochs} epochs max, early stopping on a validation split of the "
              f"training fold), {args.mil_seeds} training seeds per model; AUC = mean over seeds of the out-of-fold AUC; "
              f"paired bootstrap over slides ({args.bootstrap} resamples), each resample averaging over the seeds. "
              f"TransMIL's PPEG lays a slide's tiles out row by row on a square of ceil(sqrt(N)) columns in file order "
              f"(row-major on the tiling grid): {full} of {len(n_tiles)} slides have all {args.grid}x{args.grid} grid "
              f"cells as tissue tiles, where that square is the slide's grid; on the others "
              f"(median {int(np.median(n_tiles))} tiles) rows wrap. TransMIL-grid puts each tile on its own cell of the "
              f"tiling grid (`layout=\"grid\"`).", "",
              "| model | AUC (mean over seeds) | per seed | seconds (all seeds, folds) |", "|---|---|---|---|"]
    for k, v in mil.items():
        per = ", ".join(f"{auc(y, q):.3f}" for q in v)
        lines.append(f"| {k} | {mil_auc[k]:.3f} | {per} | {mil_s[k]:.0f} |")
    ab, npe, pe, gr = MIL
    pairs = [(pe, npe), (gr, pe), (gr, npe), (gr, ab)]
    diffs = {(x, z): B.paired(y, mil[x], mil[z], args.bootstrap) for x, z in pairs}
    d_ref = B.paired(y, rows[ssl_c][None], mil[gr], args.bootstrap)
    lines += ["", "Paired bootstrap of AUC differences (same slides):", ""]
    lines += [f"- {x} − {z}: {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for (x, z), v in diffs.items()]
    lines.append(f"- tile classifier + contiguity (tile labels) − {gr}: {d_ref[0]:+.3f} [{d_ref[1]:+.3f}, {d_ref[2]:+.3f}]")

    def verdict(v: tuple) -> str:
        return "higher (CI above 0)" if v[1] > 0 else ("lower (CI below 0)" if v[2] < 0 else "not distinguishable (CI spans 0)")

    lines += ["", "Verdicts (computed from the rows above):", ""]
    lines += [f"- {x} ({mil_auc[x]:.3f}) vs {z} ({mil_auc[z]:.3f}): {verdict(v)}." for (x, z), v in diffs.items()]
    lines.append(f"- the tile-label reference ({a:.3f}) vs slide labels only ({gr}): the reference is {verdict(d_ref)}.")
    lines += ["", "The slide SSL methods' AUCs on this mosaic configuration are the context rows of `slide_ssl.md` (same "
              "`MosaicConfig`, another run, so not paired here). Attention pooling (ABMIL, CLAM), mean pooling and "
              "TransMIL-noPPEG are tile-order invariant by construction; TransMIL's PPEG (either layout), Giga-SSL's "
              "SparseConvMIL and SLPD's region crops see the layout.",
              "", f"Wall time {time.perf_counter() - t0:.0f} s (tile encoder and features cached in `{work}`)."]
    write_result("slide_context", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

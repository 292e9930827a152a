"""Tile-level evaluation of frozen features: linear probe, k-NN and few-shot probes.

Inputs are ``(features [N, D], labels [N])`` arrays or loaded feature files (any object with
``features``, ``labels``, ``path``, ``encoder`` and ``dim``, e.g. :class:`gigaslide.features.store.FeatureFile`;
this base-layer module reads no files itself — load them with ``gigaslide.features.store.load``).

* ``linear``: ``StandardScaler`` + ``LogisticRegression`` (lbfgs); C picked on a stratified 20 %
  validation split of the training set, then refit on the whole training set.
* ``knn``: k = 20 nearest neighbours by cosine similarity (brute force), class probabilities
  = neighbour vote fractions.
* ``fewshot``: logistic regression (C = 1) trained on 1 % and 10 % of the training labels and on
  n = 1, 5, 10 labels per class, each drawn ``repeats`` times (scaler fitted on all training
  features, which uses no labels); reported as the mean over draws, the std over draws, each draw's value
  (``per_draw``) and a bootstrap CI in which each replicate resamples the test tiles (within classes) and the
  draws (with replacement) and averages the metric over the draws drawn. A setting's draws are seeded by
  the seed, the setting's name and the draw (not by its place in the list of settings: ``10/class`` draws the
  same labels whether or not ``1%`` is evaluated too).

Every score is computed on the test set with a percentile bootstrap 95 % CI over test tiles, resampled within
each class (the test set's class counts are kept, so AUC is defined on every replicate;
:mod:`gigaslide.evaluation.metrics`). Train and test feature files of the same tiles or embedded from the same
folder are refused (test tiles would be training tiles). :func:`evaluate_tile_features` returns a dict and, with
``out``, writes ``report.json``, ``report.md`` and ``report.png`` atomically.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.provenance import provenance
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.metrics import METRICS, bootstrap_replicates, ci_fields, fmt_ci, summarize

PROTOCOLS = ("linear", "knn", "fewshot")
#: how few-shot draws are seeded (recorded in reports: results of other draw schemes never count as the same draws)
FEWSHOT_DRAWS = "seed, setting name, draw"
PREDICTIONS = "predictions.npz"  # a report folder's test predictions, per protocol
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

TileInput = Any  # a loaded FeatureFile-like object | tuple[np.ndarray, np.ndarray]


def _as_arrays(x: TileInput, role: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    if isinstance(x, (str, os.PathLike)):
        raise TypeError("pass loaded features (gigaslide.features.store.load(path)) or (features, labels) arrays")
    if hasattr(x, "features") and hasattr(x, "labels"):
        if x.labels is None:
            raise GigaslideError(f"{role} feature file has no 'labels' dataset", path=x.path,
                                 fix="encode a labelled tile folder (class sub-folders) so tile labels are stored")
        attrs = getattr(x, "attrs", None) or {}
        meta = {"path": str(x.path) if x.path else None, "encoder": x.encoder, "dim": x.dim,
                "fingerprint": attrs.get("tiles_fingerprint"), "classes": _class_names(attrs.get("classes")),
                "source_folder": attrs.get("source_folder"),
                "encoder_weights_sha256": attrs.get("encoder_weights_sha256")}
        return np.asarray(x.features, np.float32), np.asarray(x.labels).astype(np.int64), meta
    feats, labels = x
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if feats.ndim != 2 or len(feats) != len(labels):
        raise GigaslideError(f"{role}: features must be [N, D] with N labels, got {feats.shape} and {labels.shape}")
    return feats, labels, {"path": None, "encoder": None, "dim": int(feats.shape[1]), "fingerprint": None,
                           "classes": None, "source_folder": None, "encoder_weights_sha256": None}


def _class_names(v: Any) -> list[str] | None:
    """A feature file's ``classes`` attr (JSON list of the tile folder's class sub-folders, index = label), or None."""
    import json

    try:
        names = json.loads(v) if isinstance(v, str) else v
    except ValueError:
        return None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


def _align_classes(tr: dict[str, Any], te: dict[str, Any], yte: np.ndarray) -> np.ndarray:
    """Test labels as indices of the training classes: each folder numbers its own sorted sub-folders, so a test
    folder without some class (a, c) numbered c as the training folder's b (a, b, c). A test class the training tiles
    do not have is refused."""
    a, b = tr.get("classes"), te.get("classes")
    if not a or not b or a == b:
        return yte
    unknown = [c for c in b if c not in a]
    if unknown:
        raise GigaslideError(f"test class(es) {', '.join(unknown)} have no training tiles (training classes: "
                             f"{', '.join(a)})", path=te["path"],
                             fix="give train and test folders the same class sub-folder names")
    return np.array([a.index(c) for c in b], np.int64)[yte]


def _check_pair(tr: dict[str, Any], te: dict[str, Any]) -> None:
    if tr["dim"] != te["dim"]:
        raise GigaslideError(f"train features are {tr['dim']}-d but test features are {te['dim']}-d",
                             path=te["path"], fix="encode train and test with the same encoder")
    if tr["encoder"] and te["encoder"] and tr["encoder"] != te["encoder"]:
        raise GigaslideError(f"train encoder '{tr['encoder']}' differs from test encoder '{te['encoder']}'",
                             path=te["path"], fix="encode train and test with the same encoder")
    w_tr, w_te = tr.get("encoder_weights_sha256"), te.get("encoder_weights_sha256")
    if w_tr and w_te and str(w_tr) != str(w_te):  # same architecture, other weights: a probe of one on the other
        raise GigaslideError(f"train and test features come from other weights of encoder '{te['encoder'] or '?'}' "
                             f"({str(w_tr)[:16]} vs {str(w_te)[:16]})", path=te["path"],
                             fix="encode train and test with the same encoder weights")


def _check_apart(tr: dict[str, Any], te: dict[str, Any]) -> None:
    """Refuse, in one line, test tiles that are the training tiles (or drawn from the same folder)."""
    fix = "embed the training and the test tiles from separate tile folders (e.g. pcam/train and pcam/valid)"
    if tr["fingerprint"] and tr["fingerprint"] == te["fingerprint"]:
        raise GigaslideError("the test tiles are the training tiles (same tiles fingerprint)", path=te["path"], fix=fix)
    if tr["source_folder"] and tr["source_folder"] == te["source_folder"]:
        raise GigaslideError(f"train and test tiles were embedded from the same folder {te['source_folder']}",
                             path=te["path"], fix=fix)


def _logreg(C: float, seed: int):  # noqa: ANN202
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, random_state=seed)


def _full_probs(clf, X: np.ndarray, n_classes: int) -> np.ndarray:  # noqa: ANN001
    p = np.zeros((len(X), n_classes))
    p[:, clf.classes_] = clf.predict_proba(X)
    return p


def linear_probe(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, n_classes: int, seed: int = 0,
                 c_grid: Sequence[float] = C_GRID) -> tuple[np.ndarray, dict[str, Any]]:
    """Test-set probabilities of a logistic-regression probe with C chosen on a validation split."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(Xtr)
    Xs, Xt = sc.transform(Xtr), sc.transform(Xte)
    idx_tr, idx_va = train_test_split(np.arange(len(ytr)), test_size=0.2, stratify=ytr, random_state=seed)
    val_scores = {}
    for C in c_grid:
        clf = _logreg(C, seed).fit(Xs[idx_tr], ytr[idx_tr])
        val_scores[C] = METRICS["balanced_accuracy"](ytr[idx_va], _full_probs(clf, Xs[idx_va], n_classes))
    best = max(c_grid, key=lambda c: (val_scores[c], -c))  # ties -> stronger regularisation
    clf = _logreg(best, seed).fit(Xs, ytr)
    return _full_probs(clf, Xt, n_classes), {"C": best, "val_balanced_accuracy": {str(k): v for k, v in val_scores.items()}}


def knn_probe(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, n_classes: int, k: int = 20) -> np.ndarray:
    """Cosine k-NN vote fractions as class probabilities."""
    from sklearn.neighbors import KNeighborsClassifier

    def l2n(a: np.ndarray) -> np.ndarray:
        return a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)

    knn = KNeighborsClassifier(n_neighbors=min(k, len(ytr)), metric="cosine", algorithm="brute").fit(l2n(Xtr), ytr)
    return _full_probs(knn, l2n(Xte), n_classes)


def _few_shot_indices(y: np.ndarray, setting: str, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(y)
    if setting.endswith("%"):
        frac = float(setting[:-1]) / 100
        n = max(len(classes), round(frac * len(y)))
        first = [rng.choice(np.flatnonzero(y == c)) for c in classes]
        rest = rng.permutation(np.setdiff1d(np.arange(len(y)), first))[: n - len(first)]
        return np.concatenate([first, rest])
    per = int(setting.split("/")[0])
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=min(per, int((y == c).sum())), replace=False)
                           for c in classes])


def few_shot(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, n_classes: int, *,
             settings: Sequence[str] = ("1%", "10%", "1/class", "5/class", "10/class"), repeats: int = 5,
             seed: int = 0, n_bootstrap: int = 1000, draws: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Few-shot logistic-regression probes, ``repeats`` draws per setting; ``draws`` (a dict) receives each
    setting's test probabilities [repeats, N, C], for paired comparisons."""
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(Xtr)
    Xs, Xt = sc.transform(Xtr), sc.transform(Xte)
    out: dict[str, Any] = {}
    for setting in settings:
        probs = []
        n_used = 0
        for r in range(repeats):
            rng = np.random.default_rng([seed, zlib.crc32(setting.encode()), r])
            idx = _few_shot_indices(ytr, setting, rng)
            n_used = len(idx)
            clf = _logreg(1.0, seed).fit(Xs[idx], ytr[idx])
            probs.append(_full_probs(clf, Xt, n_classes))
        res: dict[str, Any] = {"n_labels": n_used, "repeats": repeats}
        # each replicate resamples the draws too (which labels were drawn moves the score as much as the test tiles
        # do; a CI over test tiles alone would be as narrow with 1 label per class as with all of them)
        jd = np.random.default_rng([seed, 1]).integers(0, repeats, (max(n_bootstrap, 0), repeats))
        for m, fn in METRICS.items():
            per_draw = [fn(yte, p) for p in probs]
            replicate = iter(range(len(jd)))

            def stat(b: np.ndarray, fn=fn, probs=probs, replicate=replicate) -> float:
                js, counts = np.unique(jd[next(replicate)], return_counts=True)
                v = np.array([fn(yte[b], probs[j][b]) for j in js])
                ok = ~np.isnan(v)  # a replicate averages its draws (each as often as drawn), NaN draws skipped
                return float(np.average(v[ok], weights=counts[ok])) if ok.any() else float("nan")

            reps = bootstrap_replicates(stat, len(yte), n_bootstrap=n_bootstrap, seed=seed, strata=yte)
            res[m] = {"value": float(np.mean(per_draw)), "std": float(np.std(per_draw)), **ci_fields(reps),
                      "per_draw": [float(v) for v in per_draw]}
        out[setting] = res
        if draws is not None:
            draws[setting] = np.stack(probs).astype(np.float32)
    return out


def _check_validation_split(ytr: np.ndarray, path: str | None) -> None:
    """Refuse, in one line, training tiles that :func:`linear_probe`'s stratified validation split cannot split."""
    classes, counts = np.unique(ytr, return_counts=True)
    rare = classes[counts < 2]
    if len(rare):
        raise GigaslideError(f"class(es) {', '.join(map(str, rare))} have 1 training tile; the linear probe picks C on "
                             "a stratified 20 % validation split, which needs 2 of each class", path=path,
                             fix="add training tiles of that class, or use --protocol knn,fewshot")
    n_val = int(np.ceil(0.2 * len(ytr)))
    if min(n_val, len(ytr) - n_val) < len(classes):
        raise GigaslideError(f"{len(ytr)} training tiles of {len(classes)} classes: the linear probe's 20 % validation "
                             "split needs a tile of each class on both sides", path=path,
                             fix="add training tiles, or use --protocol knn,fewshot")


def evaluate_tile_features(train: TileInput, test: TileInput, protocols: Sequence[str] | str = PROTOCOLS, *,
                           n_bootstrap: int = 1000, seed: int = 0, k: int = 20, fewshot_repeats: int = 5,
                           fewshot_settings: Sequence[str] = ("1%", "10%", "1/class", "5/class", "10/class"),
                           out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Probe frozen tile features; returns ``{"protocols": {name: {metric: {value, ci_low, ci_high}}}, ...}`` plus
    ``test_probs`` (protocol -> test probabilities: [N, C], few-shot [draws, N, C]) and ``test_labels``, which
    ``out`` also gets (``predictions.npz``) so that a later result can be compared with this one, paired."""
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(",") if p.strip()]
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise GigaslideError(f"unknown protocol(s) {', '.join(unknown) or '(none)'}", fix=f"use any of {','.join(PROTOCOLS)}")
    Xtr, ytr, mtr = _as_arrays(train, "train")
    Xte, yte, mte = _as_arrays(test, "test")
    _check_pair(mtr, mte)
    yte = _align_classes(mtr, mte, yte)
    if len(np.unique(ytr)) < 2:
        raise GigaslideError("training tiles have a single class", path=mtr["path"], fix="use a tile folder with at least two classes")
    if len(np.unique(yte)) < 2:  # (every AUC was reported as nan)
        what = f"every test tile ({len(yte)}) has label {int(yte[0])}" if len(yte) else "there are no test tiles"
        raise GigaslideError(f"{what}: AUC is undefined on one class", path=mte["path"],
                             fix="use a test tile folder with tiles of at least two classes")
    _check_apart(mtr, mte)
    for X, meta in ((Xtr, mtr), (Xte, mte)):  # the file that has them (the training file was named for both)
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        if bad:
            raise GigaslideError(f"{bad} tile(s) have NaN/inf features", path=meta["path"],
                                 fix="re-encode (check the encoder's dtype/AMP)")
    if "linear" in protocols:  # C is chosen on a stratified 20 % validation split: 2+ tiles of a class, both sides
        _check_validation_split(ytr, mtr["path"])
    n_classes = int(max(ytr.max(), yte.max(), len(mtr["classes"] or []) - 1)) + 1
    report: dict[str, Any] = {"train": {**mtr, "n": len(ytr), "class_counts": np.bincount(ytr, minlength=n_classes).tolist()},
                              "test": {**mte, "n": len(yte), "class_counts": np.bincount(yte, minlength=n_classes).tolist()},
                              "n_classes": n_classes, "n_bootstrap": n_bootstrap, "seed": seed,
                              "fewshot_draws": FEWSHOT_DRAWS, "protocols": {}}
    probs: dict[str, np.ndarray] = {}
    for proto in protocols:
        t0 = time.perf_counter()
        if proto == "linear":
            p, info = linear_probe(Xtr, ytr, Xte, n_classes, seed)
            report["protocols"]["linear"] = {**summarize(yte, p, n_bootstrap=n_bootstrap, seed=seed, strata=yte),
                                             **info}
            probs["linear"] = p
        elif proto == "knn":
            p = knn_probe(Xtr, ytr, Xte, n_classes, k)
            report["protocols"]["knn"] = {**summarize(yte, p, n_bootstrap=n_bootstrap, seed=seed, strata=yte), "k": k}
            probs["knn"] = p
        else:
            draws: dict[str, np.ndarray] = {}
            fs = few_shot(Xtr, ytr, Xte, yte, n_classes, settings=fewshot_settings, repeats=fewshot_repeats,
                          seed=seed, n_bootstrap=n_bootstrap, draws=draws)
            for setting, res in fs.items():
                report["protocols"][f"fewshot_{setting}"] = res
                probs[f"fewshot_{setting}"] = draws[setting]
        report.setdefault("seconds", {})[proto] = round(time.perf_counter() - t0, 2)
    if out is not None:
        write_report(report, out, probs=probs, labels=yte)
    return {**report, "test_probs": probs, "test_labels": yte}


def report_markdown(report: dict[str, Any]) -> str:
    enc = report["train"].get("encoder") or "features"
    lines = [f"# Tile-level evaluation ({enc}, D={report['train']['dim']})", "",
             f"train n={report['train']['n']} {report['train']['class_counts']}, test n={report['test']['n']} "
             f"{report['test']['class_counts']}; 95 % bootstrap CIs over test tiles, resampled within each class "
             f"(B={report['n_bootstrap']}; few-shot rows resample their draws too)", "",
             "| protocol | AUC | balanced acc | macro-F1 |", "|---|---|---|---|"]
    for name, r in report["protocols"].items():
        extra = f" (std over draws {r['auc']['std']:.3f})" if "std" in r["auc"] else ""
        lines.append(f"| {name} | {fmt_ci(r['auc'])}{extra} | {fmt_ci(r['balanced_accuracy'])} | {fmt_ci(r['macro_f1'])} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report["protocols"])
    metrics = ["auc", "balanced_accuracy", "macro_f1"]
    fig = Figure(figsize=(max(5, 1.3 * len(names)), 3.5))  # not pyplot's: the caller's backend stays as it was
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    w = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        v = np.array([report["protocols"][n][m]["value"] for n in names])
        lo = np.array([report["protocols"][n][m]["ci_low"] for n in names])
        hi = np.array([report["protocols"][n][m]["ci_high"] for n in names])
        err = np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0)
        ax.bar(np.arange(len(names)) + (j - 1) * w, v, w, yerr=err, capsize=2, label=m)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"tile-level probes: {report['train'].get('encoder') or 'features'}")
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def write_report(report: dict[str, Any], out: str | os.PathLike, *, probs: dict[str, np.ndarray] | None = None,
                 labels: np.ndarray | None = None) -> Path:
    """``report.{json,md,png}`` in ``out`` and, with ``probs``, the test predictions (``predictions.npz``, with the
    test tiles' fingerprint: a report and predictions of two different runs are never read as one)."""
    d = atomic.ensure_writable_dir(out)
    if probs is not None:
        names = list(probs)
        arrays = {f"p{i}": np.asarray(probs[n], np.float64) for i, n in enumerate(names)}  # as scored: no ties
        with atomic.atomic_path(d / PREDICTIONS, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, protocols=np.array(names), labels=np.asarray(labels, np.int64),
                         fingerprint=np.array(str(report["test"].get("fingerprint"))), **arrays)
    report = {k: v for k, v in report.items() if k not in ("test_probs", "test_labels")}
    atomic.write_json(d / "report.json", {**provenance(kind="tile_evaluation"), **report})
    atomic.write_text(d / "report.md", report_markdown(report))
    plot_report(report, d / "report.png")
    return d


def saved_predictions(out: str | os.PathLike) -> dict[str, Any]:
    """A finished ``evaluate tiles`` folder's report with its ``test_probs`` and ``test_labels`` (as
    :func:`evaluate_tile_features` returns it), or a one-line error saying how to make one."""
    import json

    d = Path(out)
    try:
        report = json.loads((d / "report.json").read_text())
        with np.load(d / PREDICTIONS, allow_pickle=False) as z:
            names = [str(n) for n in z["protocols"]]
            probs = {n: z[f"p{i}"] for i, n in enumerate(names)}
            labels = z["labels"]
            same_run = str(z["fingerprint"]) == str(report["test"].get("fingerprint"))
        if "n" not in report["test"]:
            raise KeyError("test")
    except (OSError, ValueError, KeyError, TypeError):
        raise GigaslideError("no tile evaluation with test predictions here", path=d,
                             fix="pass the --out folder of a finished `gigaslide evaluate tiles` (re-run it to add "
                                 "its predictions)") from None
    if not same_run or len(labels) != report["test"]["n"]:
        raise GigaslideError("report.json and predictions.npz come from different runs (one was interrupted)",
                             path=d, fix="re-run that `gigaslide evaluate tiles`")
    return {**report, "test_probs": probs, "test_labels": labels}


def compare_with(report: dict[str, Any], baseline: str | os.PathLike | dict[str, Any], *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """``report`` (from :func:`evaluate_tile_features`) minus the tile evaluation in folder ``baseline`` (or as
    :func:`saved_predictions` returns it), paired on the same test tiles, per protocol both have."""
    from gigaslide.evaluation.compare import compare_reports

    path = baseline if not isinstance(baseline, dict) else baseline["test"].get("path")
    base = saved_predictions(baseline) if not isinstance(baseline, dict) else baseline
    return compare_reports(report, base, path=path, n_bootstrap=n_bootstrap, seed=seed, fix_tiles=FIX_SAME_TILES,
                           fix_train=FIX_SAME_TRAIN)


#: how to get two tile evaluations onto the same, recorded test tiles
FIX_SAME_TILES = ("embed the same test tile folder for both encoders with `gigaslide embed-tiles` (it records the "
                  "tiles), then evaluate both")
#: how to get two tile evaluations' probes onto the same training tiles
FIX_SAME_TRAIN = ("embed the same training tile folder (same --limit and --seed) for both encoders with "
                  "`gigaslide embed-tiles`, then evaluate both")

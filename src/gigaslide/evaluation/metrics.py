"""Classification metrics and percentile-bootstrap confidence intervals.

All functions take integer labels ``y`` [N] and class probabilities ``probs`` [N, C] (C >= 2;
a [N] vector is read as the positive-class probability of a binary task). AUC is the ROC AUC
for two classes and the macro one-vs-rest AUC for more. A metric that is undefined on a sample
(e.g. AUC with one class present) is NaN, and bootstrap replicates that are NaN are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def as_probs(probs: np.ndarray) -> np.ndarray:
    """[N] positive-class probabilities -> [N, 2]; [N, C] passes through."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    return p


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with tie correction (same value as sklearn's roc_auc_score, much faster)."""
    from scipy.stats import rankdata

    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (binary) or macro one-vs-rest AUC (multi-class); NaN if a class is absent."""
    y = np.asarray(y).astype(int)
    p = as_probs(probs)
    n_classes = p.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return _binary_auc(y == 1, p[:, 1])
    if len(present) < n_classes:
        # OvR over the classes present (sklearn refuses missing columns otherwise)
        scores = [_binary_auc(y == c, p[:, c]) for c in present]
        return float(np.mean(scores))
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall of the arg-max prediction."""
    y = np.asarray(y).astype(int)
    pred = as_probs(probs).argmax(axis=1)
    if len(y) == 0:
        return float("nan")
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro-averaged F1 of the arg-max prediction over the classes present in ``y``."""
    y = np.asarray(y).astype(int)
    pred = as_probs(probs).argmax(axis=1)
    if len(y) == 0:
        return float("nan")
    f1s = []
    for c in np.unique(y):
        tp = float(np.sum((pred == c) & (y == c)))
        denom = float(np.sum(pred == c) + np.sum(y == c))
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


METRICS: dict[str, MetricFn] = {"auc": auc, "balanced_accuracy": balanced_accuracy, "macro_f1": macro_f1}


def bootstrap_indices(n: int, n_bootstrap: int, seed: int = 0, strata: np.ndarray | None = None) -> np.ndarray:
    """[B, n] resampling indices; with ``strata`` each stratum (e.g. fold) is resampled within itself."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_bootstrap, n))
    strata = np.asarray(strata)
    out = np.empty((n_bootstrap, n), dtype=np.int64)
    pos = 0
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        k = len(members)
        out[:, pos: pos + k] = members[rng.integers(0, k, size=(n_bootstrap, k))]
        pos += k
    return out


def bootstrap_ci(fn: MetricFn, y: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0,
                 strata: np.ndarray | None = None, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of ``fn(y, probs)`` over samples (NaN replicates skipped)."""
    y = np.asarray(y)
    p = as_probs(probs)
    if n_bootstrap <= 0 or len(y) == 0:
        return float("nan"), float("nan")
    vals = []
    for idx in bootstrap_indices(len(y), n_bootstrap, seed, strata):
        v = fn(y[idx], p[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def summarize(y: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0,
              strata: np.ndarray | None = None, metrics: Sequence[str] = ("auc", "balanced_accuracy", "macro_f1")
              ) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` with one shared set of bootstrap resamples."""
    y = np.asarray(y).astype(int)
    p = as_probs(probs)
    out: dict[str, dict[str, float]] = {m: {"value": METRICS[m](y, p)} for m in metrics}
    if n_bootstrap > 0 and len(y):
        reps: dict[str, list[float]] = {m: [] for m in metrics}
        for idx in bootstrap_indices(len(y), n_bootstrap, seed, strata):
            for m in metrics:
                v = METRICS[m](y[idx], p[idx])
                if not np.isnan(v):
                    reps[m].append(v)
        for m in metrics:
            lo, hi = (np.percentile(reps[m], [2.5, 97.5]) if reps[m] else (np.nan, np.nan))
            out[m].update(ci_low=float(lo), ci_high=float(hi))
    else:
        for m in metrics:
            out[m].update(ci_low=float("nan"), ci_high=float("nan"))
    return out


def fmt_ci(d: dict[str, float], digits: int = 3) -> str:
    """``0.912 [0.871, 0.950]``."""
    v, lo, hi = d.get("value", np.nan), d.get("ci_low", np.nan), d.get("ci_high", np.nan)
    if np.isnan(lo):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

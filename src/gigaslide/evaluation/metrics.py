"""Classification metrics and percentile-bootstrap confidence intervals.

All functions take integer labels ``y`` [N] and class probabilities ``probs`` [N, C] (C >= 2;
a [N] vector is read as the positive-class probability of a binary task). AUC is the ROC AUC
for two classes and the macro one-vs-rest AUC for more. A metric that is undefined on a sample
(e.g. AUC with one class present) is NaN, and bootstrap replicates that are NaN are skipped -- and counted
(``undefined_replicates`` in :func:`summarize` and :func:`paired_difference`), since a CI of the replicates left is
conditional on the classes drawn. Pass ``strata=y`` (a class-stratified bootstrap, as the tile evaluations do) so
that every replicate keeps each class's count and none is undefined.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
    """ROC AUC (binary) or macro one-vs-rest AUC over the classes present in ``y`` (multi-class); NaN with fewer than
    two classes present."""
    y = np.asarray(y).astype(int)
    p = as_probs(probs)
    n_classes = p.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if n_classes == 2:
        return _binary_auc(y == 1, p[:, 1])
    # macro one-vs-rest: the mean of each present class's binary AUC on its own column -- sklearn's
    # roc_auc_score(multi_class="ovr", average="macro") when every class is present, without its renormalising of
    # the rows (which turns tied scores, e.g. k-NN vote fractions, into near-ties ordered by rounding noise)
    return float(np.mean([_binary_auc(y == c, p[:, c]) for c in present]))


def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall of the arg-max prediction."""
    y = np.asarray(y).astype(int)
    pred = as_probs(probs).argmax(axis=1)
    if len(y) == 0:
        return float("nan")
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro-averaged F1 of the arg-max prediction over the classes present in ``y`` or predicted (sklearn's
    ``f1_score(average="macro")``: a class predicted but absent from ``y`` counts with F1 0)."""
    y = np.asarray(y).astype(int)
    pred = as_probs(probs).argmax(axis=1)
    if len(y) == 0:
        return float("nan")
    f1s = []
    for c in np.union1d(y, pred):
        tp = float(np.sum((pred == c) & (y == c)))
        denom = float(np.sum(pred == c) + np.sum(y == c))
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


METRICS: dict[str, MetricFn] = {"auc": auc, "balanced_accuracy": balanced_accuracy, "macro_f1": macro_f1}


def bootstrap_indices(n: int, n_bootstrap: int, seed: int = 0, strata: np.ndarray | None = None,
                      groups: Sequence[Any] | np.ndarray | None = None) -> np.ndarray | list[np.ndarray]:
    """[B, n] resampling indices; with ``strata`` each stratum (e.g. fold, class) is resampled within itself.

    With ``groups`` (e.g. each slide's patient) it is a cluster bootstrap: the groups are resampled (within the
    strata) and a drawn group brings all its items, so items of one group never count as independent (slides of
    one patient: a CI over slides would be too narrow). Returns a list of B index arrays then (their lengths vary
    with the sizes of the groups drawn). A group's stratum is its items' one; a group whose items lie in several
    strata is a stratum of its own with the other groups of that same mix. Groups of one item each give exactly
    the indices without ``groups``.
    """
    rng = np.random.default_rng(seed)
    if groups is None and strata is None:
        return rng.integers(0, n, size=(n_bootstrap, n))
    if groups is None:
        strata = np.asarray(strata)
        out = np.empty((n_bootstrap, n), dtype=np.int64)
        pos = 0
        for s in np.unique(strata):
            members = np.flatnonzero(strata == s)
            k = len(members)
            out[:, pos: pos + k] = members[rng.integers(0, k, size=(n_bootstrap, k))]
            pos += k
        return out
    g = np.asarray(groups, dtype=object).astype(str)
    if len(g) != n:
        raise ValueError(f"{len(g)} groups for {n} items")
    codes = np.unique(np.asarray(strata), return_inverse=True)[1].reshape(-1) if strata is not None \
        else np.zeros(n, np.int64)
    _, first, inv, sizes = np.unique(g, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    by_group = np.argsort(inv, kind="stable")  # items grouped by (sorted) group, each group's in item order
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.argsort(first, kind="stable")  # groups numbered in order of first appearance
    mixes = [tuple(np.unique(codes[by_group[starts[j]:starts[j] + sizes[j]]]).tolist()) for j in order]
    n_pure = int(codes.max()) + 1 if n else 0
    mixed = sorted({x for x in mixes if len(x) > 1})
    gstrata = np.array([x[0] if len(x) == 1 else n_pure + mixed.index(x) for x in mixes], np.int64)
    draws = []
    for s in np.unique(gstrata):
        in_s = np.flatnonzero(gstrata == s)
        draws.append(order[in_s[rng.integers(0, len(in_s), size=(n_bootstrap, len(in_s)))]])
    out = []
    for row in (np.concatenate(draws, axis=1) if draws else np.zeros((n_bootstrap, 0), np.int64)):
        lens = sizes[row]
        ends = np.cumsum(lens)
        pos = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lens, lens) + np.repeat(starts[row], lens)
        out.append(by_group[pos])  # each drawn group's items, the groups in the order drawn
    return out


def bootstrap_replicates(stat: Callable[[np.ndarray], float | Sequence[float]], n: int, *, n_bootstrap: int = 1000,
                         seed: int = 0, strata: np.ndarray | None = None,
                         groups: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """``stat(idx)`` on ``n_bootstrap`` resamples of ``range(n)`` -> [B] (or [B, K] for a vector ``stat``);
    ``strata`` / ``groups`` (patients: a cluster bootstrap) as :func:`bootstrap_indices` takes them.

    The one bootstrap loop of gigaslide: every CI (tile probes, slide predictions, localisation, nuclei
    metrics, paired differences) is a percentile of these replicates (:func:`percentile_ci`).
    """
    if n_bootstrap <= 0 or n == 0:
        return np.zeros((0,), np.float64)
    return np.asarray([stat(idx) for idx in bootstrap_indices(n, n_bootstrap, seed, strata, groups)], np.float64)


def percentile_ci(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Percentile (1 - alpha) interval of replicates (NaN replicates skipped; NaN when none is left)."""
    r = np.asarray(replicates, np.float64)
    if r.ndim == 2:
        cols = [percentile_ci(r[:, k], alpha) for k in range(r.shape[1])]
        return np.array([c[0] for c in cols]), np.array([c[1] for c in cols])
    r = r[~np.isnan(r)]
    if not len(r):
        return float("nan"), float("nan")
    lo, hi = np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def ci_fields(replicates: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """``ci_low`` / ``ci_high`` of one metric's replicates (:func:`percentile_ci`), plus ``undefined_replicates``
    (how many were NaN, left out of the CI) when there are any: the fields every reported CI carries."""
    r = np.asarray(replicates, np.float64)
    lo, hi = percentile_ci(r, alpha)
    n_nan = int(np.isnan(r).sum())
    return {"ci_low": float(lo), "ci_high": float(hi), **({"undefined_replicates": n_nan} if n_nan else {})}


def bootstrap_ci(fn: MetricFn, y: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0,
                 strata: np.ndarray | None = None, alpha: float = 0.05,
                 groups: Sequence[Any] | np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of ``fn(y, probs)`` over samples (NaN replicates skipped); with
    ``groups`` over groups of samples (:func:`bootstrap_indices`)."""
    y, p = np.asarray(y), as_probs(probs)
    reps = bootstrap_replicates(lambda i: fn(y[i], p[i]), len(y), n_bootstrap=n_bootstrap, seed=seed, strata=strata,
                                groups=groups)
    return percentile_ci(reps, alpha)


def summarize(y: np.ndarray, probs: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0,
              strata: np.ndarray | None = None, metrics: Sequence[str] = ("auc", "balanced_accuracy", "macro_f1"),
              groups: Sequence[Any] | np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` with one shared set of bootstrap resamples; a metric undefined
    (NaN) on some replicates also gets ``undefined_replicates`` (how many the CI left out)."""
    y = np.asarray(y).astype(int)
    p = as_probs(probs)
    out: dict[str, dict[str, float]] = {m: {"value": METRICS[m](y, p)} for m in metrics}
    reps = bootstrap_replicates(lambda i: [METRICS[m](y[i], p[i]) for m in metrics], len(y),
                                n_bootstrap=n_bootstrap, seed=seed, strata=strata, groups=groups)
    for k, m in enumerate(metrics):
        out[m].update(ci_fields(reps[:, k] if len(reps) else reps))
    return out


def _draws(probs: np.ndarray) -> np.ndarray:
    """[N] / [N, C] -> [1, N, C]; [R, N, C] (R draws or repeats on the same items) passes through."""
    p = np.asarray(probs, dtype=np.float64)
    return p if p.ndim == 3 else as_probs(p)[None]


def _mean_over_draws(fn: MetricFn, y: np.ndarray, p: Sequence[np.ndarray], idx: np.ndarray | None = None) -> float:
    """``fn`` on each draw of ``p`` ([N, C] each; items ``idx``), averaged over the draws (NaN draws skipped)."""
    vals = [fn(y if idx is None else y[idx], d if idx is None else d[idx]) for d in p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every draw NaN (one class resampled): a NaN replicate
        return float(np.nanmean(vals))


def paired_difference(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str = "auc", *,
                      n_bootstrap: int = 1000, seed: int = 0, strata: np.ndarray | None = None,
                      draws: str | None = None, groups: Sequence[Any] | np.ndarray | None = None) -> dict[str, float]:
    """Paired bootstrap of ``metric(a) - metric(b)`` on the *same* test items (both resampled with one index).

    ``probs_a`` / ``probs_b`` are [N, C] (or [N]), or [R, N, C]: R draws (few-shot label subsets, repeated runs)
    on the same items, whose metric is the mean over the draws; a and b may have different numbers of draws.
    ``draws`` says what a replicate does with them: None keeps every draw (the CI then covers the test items only);
    ``"paired"`` resamples the draws too, with one index for both (the same draws on both sides, e.g. the same
    few-shot label subsets of the same training tiles; needs equal R); ``"independent"`` resamples each side's
    draws on its own. ``groups`` (each item's patient): whole groups are resampled (:func:`bootstrap_indices`),
    recorded as ``resampled: "groups"`` (else ``"items"``). Replicates where the metric is undefined are left out
    and counted (``undefined_replicates``; ``strata=y`` avoids them). Returns ``diff``, its 95 % ``ci_low``/``ci_high``
    and a two-sided bootstrap ``p_value`` (twice the smaller share of replicates on either side of 0, floored at 1/B).
    """
    y = np.asarray(y).astype(int)
    pa, pb = _draws(probs_a), _draws(probs_b)
    if pa.shape[1] != len(y) or pb.shape[1] != len(y):
        raise ValueError(f"paired comparison needs predictions for the same {len(y)} items")
    if draws not in (None, "paired", "independent"):
        raise ValueError(f"draws must be None, 'paired' or 'independent', not {draws!r}")
    if draws == "paired" and len(pa) != len(pb):
        raise ValueError(f"paired draws need as many draws on both sides ({len(pa)} vs {len(pb)})")
    fn = METRICS[metric]
    diff = _mean_over_draws(fn, y, pa) - _mean_over_draws(fn, y, pb)
    rng = np.random.default_rng([seed, 1])  # the draws' resampling, apart from the items' (bootstrap_indices)
    ja = rng.integers(0, len(pa), (max(n_bootstrap, 0), len(pa))) if draws else None
    jb = ja if draws == "paired" else (rng.integers(0, len(pb), (max(n_bootstrap, 0), len(pb))) if draws else None)
    replicate = iter(range(max(n_bootstrap, 0)))

    def stat(i: np.ndarray) -> float:
        r = next(replicate)
        da = pa if ja is None else [pa[k] for k in ja[r]]
        db = pb if jb is None else [pb[k] for k in jb[r]]
        return _mean_over_draws(fn, y, da, i) - _mean_over_draws(fn, y, db, i)

    reps = bootstrap_replicates(stat, len(y), n_bootstrap=n_bootstrap, seed=seed, strata=strata, groups=groups)
    ci = ci_fields(reps)
    reps = reps[~np.isnan(reps)]
    if len(reps):
        p = min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0)))
        p = max(p, 1.0 / len(reps))
    else:
        p = float("nan")
    return {"metric": metric, "diff": float(diff), "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
            "p_value": float(p), "n": int(len(y)), "n_bootstrap": int(n_bootstrap), "draws": draws or "fixed",
            "resampled": "items" if groups is None else "groups",
            **({"undefined_replicates": ci["undefined_replicates"]} if "undefined_replicates" in ci else {})}


def fmt_diff(d: dict[str, float], p: bool = True) -> str:
    """A :func:`paired_difference` as ``+0.036 [+0.018, +0.053], p=0.001`` (without ``, p=...`` when ``p`` is False)."""
    text = f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return f"{text}, p={d['p_value']:.3g}" if p else text


def fmt_ci(d: dict[str, float], digits: int = 3) -> str:
    """``0.912 [0.871, 0.950]``."""
    v, lo, hi = d.get("value", np.nan), d.get("ci_low", np.nan), d.get("ci_high", np.nan)
    if np.isnan(lo):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

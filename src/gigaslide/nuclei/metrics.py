"""Instance-segmentation metrics for nuclei: Dice, AJI, detection F1, DQ / SQ / PQ, mPQ, with bootstrap CIs.

Definitions (``gt`` and ``pred`` are instance label maps, 0 = background, each id one nucleus):

* **Dice** — binary foreground Dice, ``2 |G ∩ P| / (|G| + |P|)`` (HoVer-Net's "Dice 1").
* **AJI** — Aggregated Jaccard Index (Kumar et al. 2017): each ground-truth nucleus is paired with the
  prediction of highest IoU with it; ``AJI = Σ |G_i ∩ P_j| / (Σ |G_i ∪ P_j| + Σ |unpaired P|)``
  (a prediction may be paired with several ground-truth nuclei, as in the original definition).
* **Matching** for the detection quality: a prediction and a ground-truth nucleus match when their IoU
  is > 0.5 (unique by construction, Kirillov et al. 2019). ``DQ = TP / (TP + FP/2 + FN/2)`` is the
  **detection F1 at IoU 0.5** (the same number: F1 = 2PR/(P+R) with that matching), ``SQ`` the mean IoU of
  the matched pairs and ``PQ = DQ × SQ``.
* **Per image vs pooled** — per-image values are averaged over images (HoVer-Net / MoNuSeg style; an image
  where a metric is undefined, e.g. PQ with no nucleus in either map, is left out of that average);
  *pooled* values add TP, FP, FN, IoU sums and intersection/union areas over all images before dividing
  (CoNIC's mPQ+ style). **mPQ** (when types exist) is the pooled PQ of each type averaged over the types
  present (CoNIC mPQ+); nuclei are matched within a type. Types are the classes 1..T only: type 0 is
  background, never a class — a predicted nucleus of type 0 (the NC branch says background all over it) is
  in no class's PQ (neither a true nor a false positive of any class), as in CoNIC; it still counts in the
  untyped DQ / SQ / PQ.

Undefined values (0 / 0) are NaN: Dice and AJI of two empty maps, DQ / PQ with no nucleus in either map,
SQ without a match. Confidence intervals are percentile bootstrap intervals over *images*, drawn with
:func:`gigaslide.evaluation.metrics.bootstrap_ci`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from gigaslide.evaluation.metrics import bootstrap_ci

IOU_MATCH = 0.5
METRIC_NAMES = ("dice", "aji", "f1", "dq", "sq", "pq")


@dataclass
class ImageStats:
    """Sufficient statistics of one image (per-image metrics and pooling both come from these)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0
    inter: int = 0  # foreground intersection (Dice)
    fg_sum: int = 0  # |G| + |P| (Dice)
    aji_c: int = 0
    aji_u: int = 0
    per_type: dict[int, tuple[int, int, int, float]] = field(default_factory=dict)  # type -> tp, fp, fn, iou_sum

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_type"] = {str(k): list(v) for k, v in self.per_type.items()}
        return d


def _relabel(a: np.ndarray) -> np.ndarray:
    """Ids made consecutive 1..n (0 stays background)."""
    a = np.asarray(a)
    ids, inv = np.unique(a, return_inverse=True)
    if ids[0] != 0:
        return (inv + 1).reshape(a.shape).astype(np.int64)
    return inv.reshape(a.shape).astype(np.int64)


def overlaps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection [nG+1, nP+1] counts incl. background row/column, gt areas [nG+1], pred areas [nP+1])."""
    g, p = _relabel(gt), _relabel(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth {g.shape} and prediction {p.shape} differ in shape")
    ng, npred = int(g.max(initial=0)), int(p.max(initial=0))
    inter = np.bincount((g * (npred + 1) + p).ravel(), minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)
    return inter, inter.sum(1), inter.sum(0)


def _match(inter: np.ndarray, ga: np.ndarray, pa: np.ndarray) -> tuple[int, int, int, float]:
    """TP, FP, FN and IoU sum of matching at IoU > 0.5."""
    ng, npred = len(ga) - 1, len(pa) - 1
    if ng == 0 or npred == 0:
        return 0, npred, ng, 0.0
    i = inter[1:, 1:].astype(np.float64)
    union = ga[1:, None] + pa[None, 1:] - i
    iou = np.where(i > 0, i / np.maximum(union, 1), 0.0)
    matched = iou > IOU_MATCH
    tp = int(matched.sum())
    return tp, npred - tp, ng - tp, float(iou[matched].sum())


def _aji(inter: np.ndarray, ga: np.ndarray, pa: np.ndarray) -> tuple[int, int]:
    ng, npred = len(ga) - 1, len(pa) - 1
    if ng == 0:
        return 0, int(pa[1:].sum())
    if npred == 0:
        return 0, int(ga[1:].sum())
    i = inter[1:, 1:].astype(np.int64)
    union = ga[1:, None] + pa[None, 1:] - i
    iou = i / np.maximum(union, 1)
    best = iou.argmax(1)
    has = i[np.arange(ng), best] > 0
    c = int(i[np.arange(ng), best][has].sum())
    u = int(union[np.arange(ng), best][has].sum()) + int(ga[1:][~has].sum())
    used = np.zeros(npred, bool)
    used[best[has]] = True
    u += int(pa[1:][~used].sum())
    return c, u


def image_stats(gt: np.ndarray, pred: np.ndarray, gt_types: dict[int, int] | None = None,
                pred_types: dict[int, int] | None = None) -> ImageStats:
    """Statistics of one image; ``*_types`` map instance id -> type (1..T) for mPQ (type 0, background, is no
    class: a nucleus of type 0 is left out of every class's statistics)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    inter, ga, pa = overlaps(gt, pred)
    tp, fp, fn, iou_sum = _match(inter, ga, pa)
    c, u = _aji(inter, ga, pa)
    g_fg, p_fg = gt > 0, pred > 0
    st = ImageStats(tp, fp, fn, iou_sum, int((g_fg & p_fg).sum()), int(g_fg.sum() + p_fg.sum()), c, u)
    if gt_types is not None and pred_types is not None:
        types = sorted(t for t in set(gt_types.values()) | set(pred_types.values()) if t > 0)
        for t in types:
            gsel = np.where(np.isin(gt, [k for k, v in gt_types.items() if v == t]), gt, 0)
            psel = np.where(np.isin(pred, [k for k, v in pred_types.items() if v == t]), pred, 0)
            st.per_type[int(t)] = _match(*overlaps(gsel, psel))
    return st


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def metrics_from(tp: float, fp: float, fn: float, iou_sum: float, inter: float, fg_sum: float, aji_c: float,
                 aji_u: float) -> dict[str, float]:
    dq = _div(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = _div(iou_sum, tp)
    pq = 0.0 if dq == 0.0 else dq * sq  # no match: PQ is 0 (SQ undefined), not NaN
    return {"dice": _div(2 * inter, fg_sum), "aji": _div(aji_c, aji_u), "f1": dq, "dq": dq, "sq": sq, "pq": pq,
            "precision": _div(tp, tp + fp), "recall": _div(tp, tp + fn)}


def per_image(st: ImageStats) -> dict[str, float]:
    return metrics_from(st.tp, st.fp, st.fn, st.iou_sum, st.inter, st.fg_sum, st.aji_c, st.aji_u)


def pooled(stats: Sequence[ImageStats]) -> dict[str, float]:
    """Metrics of all images pooled (sums of the statistics), plus ``mpq`` (mean over the classes 1..T present)
    and ``pq_type<t>`` when types exist."""
    keys = ("tp", "fp", "fn", "iou_sum", "inter", "fg_sum", "aji_c", "aji_u")
    sums = {k: sum(getattr(s, k) for s in stats) for k in keys}
    out = metrics_from(**sums)
    types = sorted({t for s in stats for t in s.per_type if t > 0})  # type 0 is background, not a class
    if types:
        pqs = []
        for t in types:
            tp, fp, fn, iou = (sum(s.per_type.get(t, (0, 0, 0, 0.0))[i] for s in stats) for i in range(4))
            m = metrics_from(tp, fp, fn, iou, 0, 0, 0, 0)
            out[f"pq_type{t}"] = m["pq"]
            if tp + fp + fn:
                pqs.append(m["pq"])
        out["mpq"] = float(np.mean(pqs)) if pqs else float("nan")
    return out


def image_mean(stats: Sequence[ImageStats], name: str) -> float:
    vals = [per_image(s)[name] for s in stats]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(stats: Sequence[ImageStats], *, n_bootstrap: int = 1000, seed: int = 0,
              names: Sequence[str] = METRIC_NAMES) -> dict[str, dict[str, dict[str, float]]]:
    """``{"image_mean": {metric: {value, ci_low, ci_high}}, "pooled": {...}}``, CIs by bootstrap over images."""
    stats = list(stats)
    n = len(stats)
    idx = np.arange(n)
    dummy = np.zeros(n)
    out: dict[str, dict[str, dict[str, float]]] = {"image_mean": {}, "pooled": {}}
    pooled_all = pooled(stats) if n else {}
    extra = [k for k in pooled_all if k == "mpq"]
    for name in names:
        def fn_mean(y: np.ndarray, _p: np.ndarray, name: str = name) -> float:
            return image_mean([stats[i] for i in y], name)

        def fn_pool(y: np.ndarray, _p: np.ndarray, name: str = name) -> float:
            return pooled([stats[i] for i in y])[name]

        for kind, fn in (("image_mean", fn_mean), ("pooled", fn_pool)):
            value = fn(idx, dummy) if n else float("nan")
            lo, hi = bootstrap_ci(fn, idx, dummy, n_bootstrap=n_bootstrap, seed=seed) if n else (np.nan, np.nan)
            out[kind][name] = {"value": value, "ci_low": lo, "ci_high": hi}
    for name in extra:
        def fn_m(y: np.ndarray, _p: np.ndarray) -> float:
            return pooled([stats[i] for i in y])["mpq"]

        lo, hi = bootstrap_ci(fn_m, idx, dummy, n_bootstrap=n_bootstrap, seed=seed)
        out["pooled"]["mpq"] = {"value": pooled_all["mpq"], "ci_low": lo, "ci_high": hi}
    return out


__all__ = ["IOU_MATCH", "METRIC_NAMES", "ImageStats", "image_mean", "image_stats", "metrics_from", "overlaps",
           "per_image", "pooled", "summarize"]

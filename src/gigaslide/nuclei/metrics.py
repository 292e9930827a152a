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
:func:`gigaslide.evaluation.metrics.bootstrap_replicates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from gigaslide.evaluation.metrics import bootstrap_replicates, percentile_ci

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
    """Ids made consecutive 1..n in the order of the ids (0 stays background): a lookup table, linear in the pixels,
    where the ids are non-negative and not far larger than the image (a sort of every pixel otherwise)."""
    a = np.asarray(a)
    if a.size and np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and int(a.max()) < max(1 << 20, 4 * a.size):
        present = np.zeros(int(a.max()) + 1, bool)
        present[a.ravel()] = True
        present[0] = False
        return np.cumsum(present)[a].astype(np.int64)
    ids, inv = np.unique(a, return_inverse=True)
    if ids[0] != 0:
        return (inv + 1).reshape(a.shape).astype(np.int64)
    return inv.reshape(a.shape).astype(np.int64)


def overlaps(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection [nG+1, nP+1] counts incl. background row/column, gt areas [nG+1], pred areas [nP+1]).

    A dense table (nG x nP entries): the metrics use :func:`sparse_overlaps`, whose size is the number of
    overlapping pairs."""
    g, p = _relabel(gt), _relabel(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth {g.shape} and prediction {p.shape} differ in shape")
    ng, npred = int(g.max(initial=0)), int(p.max(initial=0))
    inter = np.bincount((g * (npred + 1) + p).ravel(), minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)
    return inter, inter.sum(1), inter.sum(0)


@dataclass
class Overlaps:
    """The overlapping (true, predicted) nucleus pairs of two instance maps, ids made consecutive 1..n: ``gi``,
    ``pj`` and their intersection ``inter`` (pixels, > 0), and the areas ``ga`` [nG+1] and ``pa`` [nP+1] (index 0:
    background). Its size is the number of pairs that touch, not nG x nP: an image of 10 000 nuclei is a few
    10 000 pairs, where a dense table was 10^8 entries (several GB)."""

    gi: np.ndarray
    pj: np.ndarray
    inter: np.ndarray
    ga: np.ndarray
    pa: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        return self.inter / np.maximum(self.ga[self.gi] + self.pa[self.pj] - self.inter, 1)


def sparse_overlaps(gt: np.ndarray, pred: np.ndarray) -> Overlaps:
    """:class:`Overlaps` of ``gt`` and ``pred`` (same shape), linear in the pixels whatever the number of nuclei."""
    g, p = _relabel(gt), _relabel(pred)
    if g.shape != p.shape:
        raise ValueError(f"ground truth {g.shape} and prediction {p.shape} differ in shape")
    g, p = g.ravel(), p.ravel()
    ng, npred = int(g.max(initial=0)), int(p.max(initial=0))
    both = (g > 0) & (p > 0)
    keys, counts = np.unique(g[both] * (npred + 1) + p[both], return_counts=True)
    ga = np.bincount(g, minlength=ng + 1).astype(np.int64)
    pa = np.bincount(p, minlength=npred + 1).astype(np.int64)
    return Overlaps(keys // (npred + 1), keys % (npred + 1), counts.astype(np.int64), ga, pa)


def _match(ov: Overlaps) -> tuple[int, int, int, float]:
    """TP, FP, FN and IoU sum of matching at IoU > 0.5 (a pair above 0.5 is unique for both of its nuclei)."""
    ng, npred = len(ov.ga) - 1, len(ov.pa) - 1
    if ng == 0 or npred == 0:
        return 0, npred, ng, 0.0
    iou = ov.iou
    matched = iou > IOU_MATCH
    tp = int(matched.sum())
    return tp, npred - tp, ng - tp, float(iou[matched].sum())


def _aji(ov: Overlaps) -> tuple[int, int]:
    """(C, U) of the AJI: each true nucleus paired with its highest-IoU prediction (the lowest id on ties; none when
    it overlaps no prediction), unpaired true and predicted nuclei adding their areas to U."""
    ng, npred = len(ov.ga) - 1, len(ov.pa) - 1
    if ng == 0:
        return 0, int(ov.pa[1:].sum())
    if npred == 0:
        return 0, int(ov.ga[1:].sum())
    iou = ov.iou
    order = np.lexsort((ov.pj, -iou, ov.gi))  # per true nucleus: highest IoU first, then the lowest prediction id
    first = np.ones(len(order), bool)
    first[1:] = ov.gi[order][1:] != ov.gi[order][:-1]
    best = order[first]
    gi, pj, i = ov.gi[best], ov.pj[best], ov.inter[best]
    c = int(i.sum())
    u = int((ov.ga[gi] + ov.pa[pj] - i).sum())
    paired_g = np.zeros(ng + 1, bool)
    paired_g[gi] = True
    u += int(ov.ga[1:][~paired_g[1:]].sum())
    used = np.zeros(npred + 1, bool)
    used[pj] = True
    u += int(ov.pa[1:][~used[1:]].sum())
    return c, u


def image_stats(gt: np.ndarray, pred: np.ndarray, gt_types: dict[int, int] | None = None,
                pred_types: dict[int, int] | None = None) -> ImageStats:
    """Statistics of one image; ``*_types`` map instance id -> type (1..T) for mPQ (type 0, background, is no
    class: a nucleus of type 0 is left out of every class's statistics)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    ov = sparse_overlaps(gt, pred)
    tp, fp, fn, iou_sum = _match(ov)
    c, u = _aji(ov)
    g_fg, p_fg = gt > 0, pred > 0
    st = ImageStats(tp, fp, fn, iou_sum, int((g_fg & p_fg).sum()), int(g_fg.sum() + p_fg.sum()), c, u)
    if gt_types is not None and pred_types is not None:
        types = sorted(t for t in set(gt_types.values()) | set(pred_types.values()) if t > 0)
        for t in types:
            gsel = np.where(np.isin(gt, [k for k, v in gt_types.items() if v == t]), gt, 0)
            psel = np.where(np.isin(pred, [k for k, v in pred_types.items() if v == t]), pred, 0)
            st.per_type[int(t)] = _match(sparse_overlaps(gsel, psel))
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


def _stat_arrays(stats: Sequence[ImageStats], types: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The statistics as arrays: [n, 8] (the fields :func:`metrics_from` takes, in its order) and [n, T, 4] (tp, fp,
    fn, iou_sum per type of ``types``)."""
    keys = ("tp", "fp", "fn", "iou_sum", "inter", "fg_sum", "aji_c", "aji_u")
    base = np.array([[getattr(s, k) for k in keys] for s in stats], np.float64).reshape(len(stats), len(keys))
    typed = np.array([[s.per_type.get(t, (0, 0, 0, 0.0)) for t in types] for s in stats],
                     np.float64).reshape(len(stats), len(types), 4)
    return base, typed


def summarize(stats: Sequence[ImageStats], *, n_bootstrap: int = 1000, seed: int = 0,
              names: Sequence[str] = METRIC_NAMES) -> dict[str, dict[str, dict[str, float]]]:
    """``{"image_mean": {metric: {value, ci_low, ci_high, images}}, "pooled": {...}}``, CIs by bootstrap over images
    (one set of resamples for every metric); ``images``: how many images the image mean averages (those where the
    metric is defined). Each resample is sums and means over arrays of the statistics, so 10 000 images bootstrapped
    1000 times take seconds (recomputing every image's metrics from its record per resample and metric took about a
    minute per 1000 images)."""
    stats = list(stats)
    n = len(stats)
    out: dict[str, dict[str, dict[str, float]]] = {"image_mean": {}, "pooled": {}}
    if not n:
        for kind in out:
            out[kind] = {name: {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
                         for name in names}
        return out
    pooled_all = pooled(stats)
    types = sorted({t for s in stats for t in s.per_type if t > 0})
    base, typed = _stat_arrays(stats, types)
    per_img = np.array([[per_image(s)[name] for name in names] for s in stats], np.float64).reshape(n, len(names))

    def mean_cols(v: np.ndarray) -> list[float]:
        ok = ~np.isnan(v)
        cnt = ok.sum(0)
        return [float(v[ok[:, k], k].mean()) if cnt[k] else float("nan") for k in range(v.shape[1])]

    def stat(idx: np.ndarray) -> list[float]:
        m = metrics_from(*base[idx].sum(0))
        row = mean_cols(per_img[idx]) + [m[name] for name in names]
        if types:
            tsum = typed[idx].sum(0)
            pqs = [metrics_from(tp, fp, fn, iou, 0, 0, 0, 0)["pq"] for tp, fp, fn, iou in tsum if tp + fp + fn]
            row.append(float(np.mean(pqs)) if pqs else float("nan"))
        return row

    reps = bootstrap_replicates(stat, n, n_bootstrap=n_bootstrap, seed=seed)
    lo, hi = percentile_ci(reps) if len(reps) else (np.full(2 * len(names) + 1, np.nan),) * 2
    means = mean_cols(per_img)
    defined = (~np.isnan(per_img)).sum(0)
    for k, name in enumerate(names):
        out["image_mean"][name] = {"value": means[k], "ci_low": float(lo[k]), "ci_high": float(hi[k]),
                                   "images": int(defined[k])}
        j = len(names) + k
        out["pooled"][name] = {"value": pooled_all[name], "ci_low": float(lo[j]), "ci_high": float(hi[j])}
    if types:
        out["pooled"]["mpq"] = {"value": pooled_all["mpq"], "ci_low": float(lo[-1]), "ci_high": float(hi[-1])}
    return out


__all__ = ["IOU_MATCH", "METRIC_NAMES", "ImageStats", "image_mean", "image_stats", "metrics_from", "overlaps",
           "per_image", "pooled", "sparse_overlaps", "summarize"]

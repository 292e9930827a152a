"""SLPD's prototype machinery (Yu et al., MICCAI 2023): per-slide k-means prototypes, slide-to-slide
matching by a bipartite set distance, and the prototype distillation loss.

* :func:`slide_prototypes`: k-means (scikit-learn) of a slide's L2-normalised region embeddings;
  slides with fewer than ``min_regions`` regions get none (skipped from the prototype losses).
* :func:`set_distance`: distance between two prototype sets = mean cosine distance of the optimal
  one-to-one matching (``scipy.optimize.linear_sum_assignment``); sets of unequal size match
  min(k1, k2) pairs.
* :func:`nearest_slides`: for each slide with prototypes, the other slide at the smallest set distance.
* :func:`assign_nearest`: each region's most similar prototype (cosine) in a set.
* :func:`prototype_distill_loss`: cross-entropy between the teacher head's centred, sharpened
  distribution of the target prototype and the student's distribution of the region (DINO-style).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def slide_prototypes(emb: np.ndarray, k: int, *, min_regions: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(centres [k, D] normalised, labels [R]) of one slide's region embeddings, or None if too few regions."""
    from sklearn.cluster import KMeans

    need = max(k, min_regions if min_regions is not None else 2 * k)
    if len(emb) < need:
        return None
    x = _normalise(np.asarray(emb, np.float64))
    with _threadpools().limit(limits=1):  # tiny problems: thread start-up costs 20x the clustering
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    return _normalise(km.cluster_centers_), km.labels_.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _threadpools():  # noqa: ANN202
    """One threadpoolctl controller (after scikit-learn's import loaded its OpenMP / BLAS): ``threadpool_limits``
    scans the process's libraries each time it is entered (reads /proc/self/maps and more), 21 ms per slide per SLPD
    epoch, 21 s of each epoch at 1,000 slides."""
    import sklearn.cluster  # noqa: F401  (its thread pools loaded before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over the optimal one-to-one matching of the rows of ``a`` and ``b``."""
    from scipy.optimize import linear_sum_assignment

    cost = 1.0 - _normalise(np.asarray(a, np.float64)) @ _normalise(np.asarray(b, np.float64)).T
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].mean())


def nearest_slides(protos: list[np.ndarray | None]) -> np.ndarray:
    """Index of each slide's nearest other slide by :func:`set_distance` (-1 without prototypes / partner; ties: the
    lower index).

    Sets of one size ``k`` <= :data:`MAX_ENUM_K` (every slide's, as :func:`slide_prototypes` makes them) are matched
    for all pairs at once: the similarities of every prototype pair by matrix products, a row block of slides at a
    time, and the optimal matching by enumerating the k! one-to-one matchings (24 at k = 4). A Python loop of one
    ``linear_sum_assignment`` per pair took 49 s per epoch at 1,000 slides (about 80 min at 10,000)."""
    n = len(protos)
    have = [i for i, p in enumerate(protos) if p is not None]
    shapes = {np.shape(protos[i]) for i in have}
    if len(shapes) == 1 and len(next(iter(shapes))) == 2 and 1 <= next(iter(shapes))[0] <= MAX_ENUM_K:
        return _nearest_equal_sets(protos, have, n)
    dist = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(i + 1, n):
            if protos[i] is not None and protos[j] is not None:
                dist[i, j] = dist[j, i] = set_distance(protos[i], protos[j])
    out = np.full(n, -1, np.int64)
    for i in range(n):
        if np.isfinite(dist[i]).any():
            out[i] = int(np.argmin(dist[i]))
    return out


#: Largest set size :func:`nearest_slides` matches by enumerating every one-to-one matching (7! = 5,040 of them).
MAX_ENUM_K = 7


def _nearest_equal_sets(protos: list[np.ndarray | None], have: list[int], n: int,
                        max_elements: int = 1 << 24) -> np.ndarray:
    """:func:`nearest_slides` for the slides ``have`` (of ``n``), whose sets all have the same ``k`` rows."""
    from itertools import permutations

    out = np.full(n, -1, np.int64)
    m = len(have)
    if m < 2:
        return out
    k = int(np.shape(protos[have[0]])[0])
    q = np.stack([_normalise(np.asarray(protos[i], np.float64)) for i in have])  # [m, k, D]
    flat = q.reshape(m * k, -1)
    perms = np.array(list(permutations(range(k))), np.int64)  # [P, k]
    pick = np.zeros((k * k, len(perms)))  # a matching's total cost = its k cells' sum: one matrix product for all
    pick[np.arange(k) * k + perms, np.arange(len(perms))[:, None]] = 1.0
    block = max(1, max_elements // (m * k * max(k, len(perms))))
    for b0 in range(0, m, block):
        b1 = min(m, b0 + block)
        cost = 1.0 - (flat[b0 * k:b1 * k] @ flat.T).reshape(b1 - b0, k, m, k).transpose(0, 2, 1, 3)  # [B, m, k, k]
        best = (cost.reshape(b1 - b0, m, k * k) @ pick).min(-1) / k  # [B, m]: the optimal matching's mean cost
        best[np.arange(b1 - b0), np.arange(b0, b1)] = np.inf  # not the slide itself
        out[np.asarray(have[b0:b1])] = np.asarray(have)[np.argmin(best, axis=1)]
    return out


def assign_nearest(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the most cosine-similar centre for each row of ``z``."""
    return np.argmax(_normalise(np.asarray(z, np.float64)) @ _normalise(np.asarray(centres, np.float64)).T, axis=1)


def prototype_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, student_temp: float = 0.1,
                           teacher_temp: float = 0.04, center: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i  -sum_k softmax((t_i - center) / teacher_temp)_k * log_softmax(s_i / student_temp)_k
    (teacher side detached; ``center`` = the DINO loss's running centre, which keeps the sharpened
    prototype targets from collapsing onto one output dimension)."""
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    t = teacher_logits.detach().float()
    if center is not None:
        t = t - center.detach().float()
    t = F.softmax(t / teacher_temp, dim=-1)
    return -(t * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1).mean()

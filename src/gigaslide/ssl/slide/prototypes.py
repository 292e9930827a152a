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

import numpy as np
import torch
import torch.nn.functional as F


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def slide_prototypes(emb: np.ndarray, k: int, *, min_regions: int | None = None, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(centres [k, D] normalised, labels [R]) of one slide's region embeddings, or None if too few regions."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    need = max(k, min_regions if min_regions is not None else 2 * k)
    if len(emb) < need:
        return None
    x = _normalise(np.asarray(emb, np.float64))
    with threadpool_limits(1):  # tiny problems: thread start-up costs 20x the clustering
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    return _normalise(km.cluster_centers_), km.labels_.astype(np.int64)


def set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine distance (1 - cos) over the optimal one-to-one matching of the rows of ``a`` and ``b``."""
    from scipy.optimize import linear_sum_assignment

    cost = 1.0 - _normalise(np.asarray(a, np.float64)) @ _normalise(np.asarray(b, np.float64)).T
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].mean())


def nearest_slides(protos: list[np.ndarray | None]) -> np.ndarray:
    """Index of each slide's nearest other slide by :func:`set_distance` (-1 without prototypes / partner)."""
    n = len(protos)
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

"""Giga-SSL's per-step views: a small random tile subset of a random cached augmented version, with
the tile grid itself augmented (random 90-degree rotation, flip and scale of the coordinates).

A view is re-drawn at every step (Lazard et al. 2023 sample 5-16 tiles per view from 25 cached
augmented versions), so the model cannot memorise a fixed view. A slide whose cached version has
fewer tiles than a view needs is sampled with replacement (reported once by the trainer).
"""

from __future__ import annotations

import numpy as np
import torch


def augment_grid(pos: np.ndarray, rng: np.random.Generator, scale: tuple[float, float] = (0.8, 1.25)) -> np.ndarray:
    """Integer grid positions [T, 2] (x, y) under a random rotation by k*90 degrees, a random flip and a
    random isotropic scale (rounded back to the integer grid; merged sites stay as duplicates)."""
    p = pos.astype(np.float64)
    for _ in range(int(rng.integers(4))):
        p = np.stack([-p[:, 1], p[:, 0]], axis=1)
    if rng.integers(2):
        p[:, 0] = -p[:, 0]
    s = float(rng.uniform(*scale)) if scale[1] > scale[0] else float(scale[0])
    p = np.round(p * s)
    return (p - p.min(axis=0)).astype(np.int64)


def draw_view(views: np.ndarray, pos: np.ndarray, version: int, tiles: int, rng: np.random.Generator,
              grid_augment: bool, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``tiles`` random tiles of cached version ``version`` -> (features [tiles, D], positions [tiles, 2], the
    view's top-left cell at 0 as :func:`~gigaslide.ssl.slide.gigassl.embed_views` places its views)."""
    n = views.shape[1]
    sel = rng.choice(n, size=tiles, replace=n < tiles)
    p = pos[version, sel]
    return views[version, sel], augment_grid(p, rng, scale) if grid_augment else p - p.min(axis=0)


def draw_pairs(views: list[np.ndarray], pos: list[np.ndarray], slides: np.ndarray, tiles: int, rng: np.random.Generator,
               grid_augment: bool = True, scale: tuple[float, float] = (0.8, 1.25)
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of each slide in ``slides`` from two different cached versions: (f0, p0, f1, p1)."""
    out: list[list[np.ndarray]] = [[], [], [], []]
    for i in slides:
        a, b = rng.choice(views[i].shape[0], size=2, replace=False)
        for k, v in enumerate((a, b)):
            f, p = draw_view(views[i], pos[i], int(v), tiles, rng, grid_augment, scale)
            out[2 * k].append(f)
            out[2 * k + 1].append(p)
    f0, p0, f1, p1 = (np.stack(x) for x in out)
    return (torch.from_numpy(f0.astype(np.float32)), torch.from_numpy(p0), torch.from_numpy(f1.astype(np.float32)),
            torch.from_numpy(p1))


@torch.no_grad()
def view_retrieval(encoder: torch.nn.Module, pairs: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, float]:
    """Label-free monitor: embed two views of every slide; top-1 accuracy of finding the other view of the
    same slide among all slides' second views (cosine), and the mean positive-minus-negative cosine gap."""
    was = encoder.training
    encoder.eval()
    f0, p0, f1, p1 = (t.to(device) for t in pairs)
    z0 = torch.nn.functional.normalize(encoder(f0, p0).float(), dim=1)
    z1 = torch.nn.functional.normalize(encoder(f1, p1).float(), dim=1)
    encoder.train(was)
    sim = z0 @ z1.T
    n = len(sim)
    top1 = _top1(sim)
    pos_ = float(sim.diag().mean())
    neg = float((sim.sum() - sim.diag().sum()) / max(1, n * n - n))
    return {"retrieval_top1": top1, "cosine_gap": pos_ - neg}


def raw_view_retrieval(pairs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """How much slide identity the cached views carry before any model: the same top-1 view retrieval as
    :func:`view_retrieval`, on each view's mean tile feature (centred over slides, so the component every
    slide shares does not dominate the cosine). At chance, two views of one slide look no more alike than
    two slides do: instance discrimination has little to learn from these views."""
    f0, _, f1, _ = pairs
    z0, z1 = (f.float().mean(dim=1) for f in (f0, f1))
    z0, z1 = z0 - z0.mean(dim=0), z1 - z1.mean(dim=0)
    sim = torch.nn.functional.normalize(z0, dim=1) @ torch.nn.functional.normalize(z1, dim=1).T
    return {"retrieval_top1": _top1(sim)}


def _top1(sim: torch.Tensor) -> float:
    """How often row i's most similar column is column i (view 0 of slide i finds its view 1)."""
    return float((sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean())

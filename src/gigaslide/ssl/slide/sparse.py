"""Submanifold sparse convolution over a tile grid, in plain PyTorch (CPU or CUDA).

A slide (or a view of it) is a set of tiles at integer grid positions ``(gx, gy)`` (the tiling's cells,
:func:`gigaslide.ssl.slide.views.tile_cells`; each view's top-left at 0, so stride-2 pooling pairs the
same cells in training and embedding). :class:`SubmanifoldConv2d` computes a k x k
convolution *only at active sites*: each active tile gathers the features of the active tiles
at the k x k offsets around it (absent neighbours count as zero), exactly like a dense
``conv2d`` on the scattered grid read back at the active sites (the tests check this), but in
memory proportional to the number of tiles, not the slide area (Graham & van der Maaten 2017;
SparseConvMIL, Lerousseau et al. 2021, used by Giga-SSL).

Neighbours are found with a hash: every site gets an integer key ``(batch, y, x)`` in a
row-major box, keys are sorted once and each of the k² neighbour keys is located with
``torch.searchsorted``. Several tiles at the same position (a view sampled with replacement)
all see the first of them as their neighbour at offset (0, 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def neighbour_index(pos: torch.Tensor, batch: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """For M active sites (``pos`` [M, 2] (x, y), ``batch`` [M]) the index of the active site at
    each of the k x k offsets (row-major over (dy, dx), like ``conv2d`` weights), or -1: [M, k*k]."""
    m = pos.shape[0]
    kk = kernel_size * kernel_size
    if m == 0:
        return torch.empty(0, kk, dtype=torch.long, device=pos.device)
    p = kernel_size // 2
    x = pos[:, 0] - pos[:, 0].min() + p
    y = pos[:, 1] - pos[:, 1].min() + p
    sx = int(x.max()) + p + 1
    sy = int(y.max()) + p + 1
    keys = (batch.to(torch.long) * sy + y) * sx + x
    sorted_keys, order = torch.sort(keys, stable=True)
    d = torch.arange(-p, kernel_size - p, device=pos.device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    offsets = (dy.reshape(-1) * sx + dx.reshape(-1))  # [k*k]; rows/cols stay inside the padded box
    query = keys[:, None] + offsets[None, :]  # [M, k*k]
    loc = torch.searchsorted(sorted_keys, query.reshape(-1)).clamp_(max=m - 1)
    found = sorted_keys[loc] == query.reshape(-1)
    idx = torch.where(found, order[loc], torch.full_like(loc, -1))
    return idx.view(m, kk)


class SubmanifoldConv2d(nn.Module):
    """k x k convolution evaluated only at active sites; weights are laid out like ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd (the output stays on the input sites)")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, feats: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """``feats`` [M, C_in] at the active sites, ``nbr`` from :func:`neighbour_index` -> [M, C_out].

        One matrix product per kernel offset over the sites that have a neighbour there (a "rulebook", as
        spconv / SparseConvNet do), so absent neighbours cost nothing: a Giga-SSL view of 16 tiles scattered
        over a slide's tissue has few of its k x k neighbours, and gathering all of them multiplied zeros."""
        m = feats.shape[0]
        kk = nbr.shape[1]
        w = self.weight.permute(2, 3, 1, 0).reshape(kk, self.in_channels, self.out_channels).to(feats.dtype)
        out: torch.Tensor | None = None
        for k in range(kk):
            col = nbr[:, k]
            rows = (col >= 0).nonzero().squeeze(1)
            if not len(rows):
                continue
            part = feats[col[rows]] @ w[k]  # under autocast, in the autocast dtype
            if out is None:
                out = part.new_zeros(m, self.out_channels)
            part = part.to(out.dtype)
            out = out + part if len(rows) == m else out.index_add(0, rows, part)  # all rows: the centre, always
        if out is None:  # no sites
            out = feats.new_zeros(m, self.out_channels)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def dense_reference(feats: torch.Tensor, pos: torch.Tensor, conv: SubmanifoldConv2d) -> torch.Tensor:
    """The same convolution done densely: scatter onto a zero grid, ``F.conv2d``, read back at the sites.
    For tests only (one slide, unique positions)."""
    x = pos[:, 0] - pos[:, 0].min()
    y = pos[:, 1] - pos[:, 1].min()
    grid = feats.new_zeros(1, feats.shape[1], int(y.max()) + 1, int(x.max()) + 1)
    grid[0, :, y, x] = feats.T
    out = F.conv2d(grid, conv.weight, conv.bias, padding=conv.kernel_size // 2)
    return out[0, :, y, x].T


def flatten_bags(feats: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None):
    """[B, T, D] bags (+ [B, T] validity mask) -> active rows [M, D], positions [M, 2], bag index [M]."""
    b, t, _ = feats.shape
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=feats.device)
    batch = torch.arange(b, device=feats.device)[:, None].expand(b, t)
    return feats[mask], pos[mask], batch[mask]


def segment_mean(x: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` [M, C] per bag index -> [n, C] (empty bags give zeros)."""
    out = x.new_zeros(n, x.shape[1]).index_add_(0, batch, x)
    cnt = torch.bincount(batch, minlength=n).clamp_(min=1).to(x.dtype)
    return out / cnt[:, None]


def segment_max(x: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    out = x.new_full((n, x.shape[1]), float("-inf"))
    out = out.scatter_reduce(0, batch[:, None].expand_as(x), x, reduce="amax", include_self=True)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def sparse_max_pool(x: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, stride: int = 2
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stride-``stride`` max pooling on the sparse grid: sites ``pos // stride`` of one bag merge (max of
    their rows). Returns the pooled rows, their grid positions and bag indices (like a strided sparse
    max-pool in SparseConvNet / spconv, which SparseConvMIL's ResNet uses between stages)."""
    coarse = torch.div(pos, stride, rounding_mode="floor")
    keys = torch.cat([batch[:, None], coarse], dim=1)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    out = x.new_full((len(uniq), x.shape[1]), float("-inf"))
    out = out.scatter_reduce(0, inverse[:, None].expand_as(x), x, reduce="amax", include_self=True)
    return out, uniq[:, 1:], uniq[:, 0]

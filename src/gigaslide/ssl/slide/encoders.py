"""Slide encoders: a bag of tile features (+ grid positions) -> one slide vector.

Every encoder has the same call: ``forward(feats [B, T, D], pos [B, T, 2] long, mask [B, T] bool
or None) -> [B, out_dim]``; ``pos`` are integer tile-grid positions (see
:func:`gigaslide.ssl.slide.views.tile_cells`), used only by SparseConvMIL.

Registry ``SLIDE_ENCODERS``: ``sparseconvmil`` (Giga-SSL's encoder: tile reduction -> a small
sparse ResNet of submanifold residual blocks over the tile grid, with optional normalisation and
stride-2 sparse max-pooling between blocks -> mean+max pooling -> MLP), ``abmil`` (gated attention
pooling, Ilse et al. 2018) and ``mean`` (per-tile MLP then mean pooling). Build with
``build_slide_encoder(name, in_dim, out_dim=512, hidden=256, **kw)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gigaslide.layers import GatedAttention
from gigaslide.registry import Registry
from gigaslide.ssl.slide.sparse import (SubmanifoldConv2d, flatten_bags, neighbour_index, segment_max, segment_mean,
                                        sparse_max_pool)

SLIDE_ENCODERS: Registry[Callable[..., nn.Module]] = Registry("slide_encoder")
NORMS = ("none", "batch", "layer")


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(inplace=True), nn.Linear(h, o))


def _norm(kind: str, dim: int) -> nn.Module:
    """Normalisation over active sites: BatchNorm1d (as spconv / SparseConvNet), LayerNorm or none."""
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    if kind == "none":
        return nn.Identity()
    return nn.BatchNorm1d(dim) if kind == "batch" else nn.LayerNorm(dim)


class SparseBasicBlock(nn.Module):
    """ResNet basic block on active sites: conv-norm-ReLU-conv-norm, + identity, ReLU."""

    def __init__(self, dim: int, kernel_size: int = 3, norm: str = "batch"):
        super().__init__()
        self.conv1, self.norm1 = SubmanifoldConv2d(dim, dim, kernel_size, bias=norm == "none"), _norm(norm, dim)
        self.conv2, self.norm2 = SubmanifoldConv2d(dim, dim, kernel_size, bias=norm == "none"), _norm(norm, dim)
        if isinstance(self.norm2, (nn.BatchNorm1d, nn.LayerNorm)):  # zero-init the last norm's scale: the block
            nn.init.zeros_(self.norm2.weight)  # starts as the identity (Goyal et al. 2017; timm's zero_init_last)

    def forward(self, h: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(h, nbr)))
        return torch.relu(h + self.norm2(self.conv2(y, nbr)))


@SLIDE_ENCODERS.register("sparseconvmil")
class SparseConvMIL(nn.Module):
    """Tile features -> Linear+ReLU -> ``blocks`` sparse residual blocks (a stride-2 sparse max-pool
    after each but the last when ``downsample``) -> concat(mean, max) pooling -> MLP -> ``out_dim``.
    ``blocks=0`` is a bag model without geometry."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 256, kernel_size: int = 3, blocks: int = 2,
                 norm: str = "batch", downsample: bool = True, dropout: float = 0.0):
        super().__init__()
        self.out_dim, self.kernel_size, self.downsample = out_dim, kernel_size, downsample
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.blocks = nn.ModuleList(SparseBasicBlock(hidden, kernel_size, norm) for _ in range(blocks))
        self.head = _mlp(2 * hidden, hidden, out_dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, p, batch = flatten_bags(feats, pos, mask)
        h = self.reduce(x)
        for i, block in enumerate(self.blocks):
            h = block(h, neighbour_index(p, batch, self.kernel_size))
            if self.downsample and i < len(self.blocks) - 1:
                h, p, batch = sparse_max_pool(h, p, batch)
        n = feats.shape[0]
        pooled = torch.cat([segment_mean(h, batch, n), segment_max(h, batch, n)], dim=1)
        return self.head(pooled)


@SLIDE_ENCODERS.register("abmil")
class AttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, :class:`gigaslide.layers.GatedAttention`) -> MLP -> ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 256, dropout: float = 0.0, **_: object):
        super().__init__()
        self.out_dim = out_dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, hidden // 2)
        self.head = _mlp(hidden, hidden, out_dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.reduce(feats)  # [B, T, H]
        a = self.attention(h).squeeze(-1)  # [B, T]
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        a = torch.softmax(a, dim=1)
        return self.head(torch.einsum("bt,bth->bh", a, h))


@SLIDE_ENCODERS.register("mean")
class MeanPoolMIL(nn.Module):
    """Per-tile Linear+ReLU, mean over tiles, MLP -> ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 256, dropout: float = 0.0, **_: object):
        super().__init__()
        self.out_dim = out_dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head = _mlp(hidden, hidden, out_dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.reduce(feats)
        if mask is None:
            return self.head(h.mean(dim=1))
        m = mask.to(h.dtype)[..., None]
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


SPARSE_KEYS = ("kernel_size", "blocks", "norm", "downsample")


def build_slide_encoder(name: str, in_dim: int, out_dim: int = 512, hidden: int = 256, **kw: object) -> nn.Module:
    """A registered slide encoder (see ``SLIDE_ENCODERS.names()``); sparse-only options are ignored by the others."""
    factory = SLIDE_ENCODERS.get(name)
    if name.lower() != "sparseconvmil":
        kw = {k: v for k, v in kw.items() if k in ("dropout",)}
    else:
        kw = {k: v for k, v in kw.items() if k in (*SPARSE_KEYS, "dropout")}
    return factory(in_dim, out_dim=out_dim, hidden=hidden, **kw)

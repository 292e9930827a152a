"""Slide encoders: a bag of tile features (+ grid positions) -> one slide vector.

Every encoder has the same call: ``forward(feats [B, T, D], pos [B, T, 2] long, mask [B, T] bool
or None) -> [B, out_dim]``; ``pos`` are integer tile-grid positions (see
:func:`gigaslide.ssl.slide.sparse.grid_positions`), used only by SparseConvMIL.

Registry ``SLIDE_ENCODERS``: ``sparseconvmil`` (Giga-SSL's encoder: tile reduction -> submanifold
sparse convs over the tile grid -> mean+max pooling -> MLP), ``abmil`` (gated attention pooling,
Ilse et al. 2018) and ``mean`` (per-tile MLP then mean pooling). Build with
``build_slide_encoder(name, in_dim, out_dim=512, hidden=256, **kw)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gigaslide.registry import Registry
from gigaslide.ssl.slide.sparse import SubmanifoldConv2d, flatten_bags, neighbour_index, segment_max, segment_mean

SLIDE_ENCODERS: Registry[Callable[..., nn.Module]] = Registry("slide_encoder")


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(inplace=True), nn.Linear(h, o))


@SLIDE_ENCODERS.register("sparseconvmil")
class SparseConvMIL(nn.Module):
    """Tile features -> Linear+ReLU -> ``n_conv`` x (submanifold k x k conv + ReLU, residual) ->
    concat(mean, max) pooling -> MLP -> ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 256, kernel_size: int = 3, n_conv: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.out_dim = out_dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.convs = nn.ModuleList(SubmanifoldConv2d(hidden, hidden, kernel_size) for _ in range(n_conv))
        self.kernel_size = kernel_size
        self.head = _mlp(2 * hidden, hidden, out_dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, p, batch = flatten_bags(feats, pos, mask)
        h = self.reduce(x)
        if self.convs:
            nbr = neighbour_index(p, batch, self.kernel_size)
            for conv in self.convs:
                h = h + torch.relu(conv(h, nbr))
        n = feats.shape[0]
        pooled = torch.cat([segment_mean(h, batch, n), segment_max(h, batch, n)], dim=1)
        return self.head(pooled)


@SLIDE_ENCODERS.register("abmil")
class AttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018) -> MLP -> ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 256, dropout: float = 0.0, **_: object):
        super().__init__()
        self.out_dim = out_dim
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.att_v = nn.Linear(hidden, hidden // 2)
        self.att_u = nn.Linear(hidden, hidden // 2)
        self.att_w = nn.Linear(hidden // 2, 1)
        self.head = _mlp(hidden, hidden, out_dim)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.reduce(feats)  # [B, T, H]
        a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)  # [B, T]
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


def build_slide_encoder(name: str, in_dim: int, out_dim: int = 512, hidden: int = 256, **kw: object) -> nn.Module:
    """A registered slide encoder (see ``SLIDE_ENCODERS.names()``)."""
    factory = SLIDE_ENCODERS.get(name)
    if name.lower() != "sparseconvmil":
        kw = {k: v for k, v in kw.items() if k in ("dropout",)}
    return factory(in_dim, out_dim=out_dim, hidden=hidden, **kw)

"""Small neural-network building blocks shared by several stages (base layer: depends on torch only)."""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Ilse et al. (2018) gated attention: ``a = W (tanh(V h) * sigmoid(U h))`` with ``n_heads`` outputs.

    Returns the raw (pre-softmax) scores ``[N, n_heads]`` of ``h`` ``[N, dim]`` (or ``[B, N, n_heads]`` of
    ``[B, N, dim]``); the caller chooses the softmax axis and masking.
    """

    def __init__(self, dim: int, attn_dim: int, n_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, n_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.V(h) * self.U(h))

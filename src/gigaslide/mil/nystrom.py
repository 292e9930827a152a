"""TransMIL's Nystrom self-attention layer (``TransMIL(attention="nystrom")``).

TransMIL (Shao et al., 2021) attends with the Nystromformer approximation (Xiong et al., 2021) through lucidrains'
``nystrom-attention`` package, whose ``NystromAttention`` module this layer wraps as the paper's ``TransLayer`` does:
``x + NystromAttention(LayerNorm(x))`` with ``num_landmarks = dim // 2`` segment-mean landmarks, 6 Moore-Penrose
iterations for the landmark kernel's pseudo-inverse, the depth-wise residual convolution over the values (kernel 33)
and dropout on the output. Time and memory grow linearly with the bag (``heads x N x landmarks``), where exact
attention grows with ``N^2``.

The class token's attention over the tiles (for heatmaps) is its row of the approximated attention matrix,
``softmax(q_cls K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)``, computed from the module's own three factors in
``O(N x landmarks)``; the approximation can give a tile a slightly negative weight, which is set to 0 (the row is
normalised again by the model). The layer runs in fp32 whatever the autocast: the iterative pseudo-inverse is not
stable in 16-bit floats.
"""

from __future__ import annotations

import torch
from nystrom_attention import NystromAttention
from torch import nn

#: Moore-Penrose iterations (the Nystromformer paper's and TransMIL's setting).
PINV_ITERATIONS = 6


class NystromSelfAttention(nn.Module):
    """Pre-norm Nystrom self-attention with the exact layer's interface: ``forward(x [N, D], return_cls_attention)``
    returns ``(x + attention(LayerNorm(x)), class-token attention [N] or None)``; row 0 of ``x`` is the class token.
    ``landmarks`` defaults to TransMIL's ``dim // 2``."""

    def __init__(self, dim: int, heads: int, dropout: float, landmarks: int | None = None,
                 pinv_iterations: int = PINV_ITERATIONS):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // heads, heads=heads,
                                     num_landmarks=int(landmarks or max(1, dim // 2)),
                                     pinv_iterations=pinv_iterations, residual=True, dropout=dropout)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[0]
        cls_attn = None
        with torch.autocast(x.device.type, enabled=False):
            out, (a1, a2_inv, a3) = self.attn(self.norm(x.float())[None], return_attn_matrices=True)
            if return_cls_attention:  # the module pads the sequence at its front to a multiple of the landmarks
                pad = a1.shape[2] - n
                row = (a1[0, :, pad:pad + 1] @ a2_inv[0]) @ a3[0]  # [heads, 1, pad + N]
                cls_attn = row[:, 0, pad:].mean(0).clamp_min(0)
        return x + out[0].to(x.dtype), cls_attn


__all__ = ["PINV_ITERATIONS", "NystromSelfAttention"]

"""Multiple-instance learning models: plain ``nn.Module``s in the :data:`MIL_MODELS` registry.

Every model is built as ``MIL_MODELS.get(name)(in_dim, n_classes, **kw)`` and maps one bag
``[N, D]`` (N tiles of one slide) to a dict:

* ``logits`` [C] -- slide logits;
* ``attention`` [N] or None -- attention over tiles (softmax-normalised, sums to 1);
* ``instance_scores`` [N] -- a per-tile score for heatmaps (attention, or the tile's
  positive-class / top-class logit for the pooling models);
* ``instance_loss`` (scalar tensor, CLAM only, when ``label`` is given in training).

Models:

* ``mean`` / ``max`` -- instance MLP + linear classifier per tile, logits mean- / max-pooled
  over tiles (mi-Net style; mean pooling of logits equals a linear classifier on the mean).
* ``abmil`` -- gated attention MIL (Ilse et al., 2018).
* ``clam_sb`` / ``clam_mb`` -- CLAM single- and multi-branch (Lu et al., 2021) with the
  instance-clustering loss: the ``k_sample`` highest-attention tiles of the true class branch are
  pseudo-labelled positive, the ``k_sample`` lowest negative (and, with ``subtyping``, the highest
  tiles of the other branches negative); cross-entropy instead of CLAM's smooth top-1 SVM.
* ``transmil`` -- a simplified TransMIL (Shao et al., 2021): linear projection, class token, two
  pre-norm multi-head self-attention layers (exact attention via ``scaled_dot_product_attention``
  instead of Nystrom attention), **no PPEG** positional convolution; the class token's last-layer
  attention is returned. Without PPEG it is invariant to tile order like the others.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.layers import GatedAttention
from gigaslide.registry import Registry

MIL_MODELS: Registry = Registry("mil")


def _check_bag(bag: torch.Tensor) -> torch.Tensor:
    if bag.ndim == 3 and bag.shape[0] == 1:
        bag = bag[0]
    if bag.ndim != 2:
        raise GigaslideError(f"a bag must be [N, D] tile features, got shape {tuple(bag.shape)}")
    if bag.shape[0] == 0:
        raise GigaslideError("empty bag (a slide with 0 tiles)", fix="check the slide's tiling; it found no tissue")
    return bag


def _mlp(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


@MIL_MODELS.register("mean")
class MeanMIL(nn.Module):
    pool = "mean"

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, dropout: float = 0.25, **_: Any):
        super().__init__()
        self.n_classes = n_classes
        self.fc = _mlp(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        bag = _check_bag(bag)
        inst = self.classifier(self.fc(bag))  # [N, C]
        logits = inst.mean(0) if self.pool == "mean" else inst.max(0).values
        score = inst[:, 1] - inst[:, 0] if self.n_classes == 2 else inst.max(1).values
        return {"logits": logits, "attention": None, "instance_scores": score, "instance_logits": inst}


@MIL_MODELS.register("max")
class MaxMIL(MeanMIL):
    pool = "max"


@MIL_MODELS.register("abmil")
class ABMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 **_: Any):
        super().__init__()
        self.fc = _mlp(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        h = self.fc(_check_bag(bag))
        a = torch.softmax(self.attention(h)[:, 0], dim=0)  # [N]
        z = a @ h
        return {"logits": self.classifier(z), "attention": a, "instance_scores": a}


class _CLAMBase(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 k_sample: int = 8, subtyping: bool = False, **_: Any):
        super().__init__()
        self.n_classes, self.k_sample, self.subtyping = n_classes, k_sample, subtyping
        self.fc = _mlp(in_dim, hidden, dropout)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])

    def instance_loss(self, h: torch.Tensor, a_raw: torch.Tensor, label: int) -> torch.Tensor:
        """CLAM instance-clustering loss. ``a_raw`` [N, branches] raw attention scores."""
        n = h.shape[0]
        k = min(self.k_sample, n // 2)
        if k < 1:
            return h.new_zeros(())
        losses = []
        for c in range(self.n_classes):
            scores = a_raw[:, c if a_raw.shape[1] > 1 else 0]
            top = torch.topk(scores, k).indices
            if c == label:
                bottom = torch.topk(-scores, k).indices
                x = torch.cat([h[top], h[bottom]])
                t = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:
                x, t = h[top], torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            losses.append(F.cross_entropy(self.instance_classifiers[c](x), t))
        return torch.stack(losses).mean()


@MIL_MODELS.register("clam_sb")
class CLAM_SB(_CLAMBase):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 **kw: Any):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, **kw)
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        h = self.fc(_check_bag(bag))
        raw = self.attention(h)  # [N, 1]
        a = torch.softmax(raw[:, 0], dim=0)
        out = {"logits": self.classifier(a @ h), "attention": a, "instance_scores": a}
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, raw, int(label))
        return out


@MIL_MODELS.register("clam_mb")
class CLAM_MB(_CLAMBase):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.25,
                 **kw: Any):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, **kw)
        self.attention = GatedAttention(hidden, attn_dim, n_classes, dropout)
        self.classifiers = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_classes)])

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        h = self.fc(_check_bag(bag))
        raw = self.attention(h)  # [N, C]
        A = torch.softmax(raw, dim=0)  # per-branch attention over tiles
        M = A.T @ h  # [C, hidden]
        logits = torch.cat([clf(M[c]) for c, clf in enumerate(self.classifiers)])
        branch = int(logits.argmax()) if self.n_classes > 2 else self.n_classes - 1  # binary: tumour branch
        out = {"logits": logits, "attention": A[:, branch], "instance_scores": A[:, branch], "attention_all": A.T}
        if label is not None:
            out["instance_loss"] = self.instance_loss(h, raw, int(label))
        return out


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)  # [H, N, dh]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        cls_attn = None
        if return_cls_attention:  # class token (row 0) attention over tiles, averaged over heads
            cls_attn = torch.softmax((q[:, :1] @ k.transpose(1, 2)) / math.sqrt(d // self.heads), dim=-1)[:, 0].mean(0)
        return x + self.proj(o.transpose(0, 1).reshape(n, d)), cls_attn


@MIL_MODELS.register("transmil")
class TransMIL(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, **_: Any):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.layers = nn.ModuleList([_SelfAttention(hidden, heads, dropout) for _ in range(layers)])
        self.ff = nn.ModuleList([nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                               nn.Linear(2 * hidden, hidden)) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        x = torch.cat([self.cls_token, self.fc(_check_bag(bag))])
        attn = None
        for i, (sa, ff) in enumerate(zip(self.layers, self.ff)):
            x, attn = sa(x, return_cls_attention=i == len(self.layers) - 1)
            x = x + ff(x)
        a = attn[1:] / attn[1:].sum().clamp_min(1e-12)
        return {"logits": self.classifier(self.norm(x[0])), "attention": a, "instance_scores": a}


def build_model(name: str, in_dim: int, n_classes: int, **kw: Any) -> nn.Module:
    """``MIL_MODELS.get(name)(in_dim, n_classes, **kw)`` with a clear error for unknown names."""
    return MIL_MODELS.get(name)(in_dim, n_classes, **kw)

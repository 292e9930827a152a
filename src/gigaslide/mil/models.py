"""Multiple-instance learning models: plain ``nn.Module``s in the :data:`MIL_MODELS` registry.

Every model is built as ``MIL_MODELS.get(name)(in_dim, n_classes, **kw)`` and maps one bag
``[N, D]`` (N tiles of one slide) to a dict:

* ``logits`` [C] -- slide logits;
* ``attention`` [N] or None -- attention over tiles (softmax-normalised, sums to 1);
* ``instance_scores`` [N] -- a per-tile score for heatmaps (attention, or for the pooling models the tile's
  logit margin of the positive class -- with more classes, of the predicted class over the best other one);
* ``instance_loss`` (scalar tensor, CLAM only, when ``label`` is given in training).

Models:

* ``mean`` / ``max`` -- instance MLP + linear classifier per tile, logits mean- / max-pooled
  over tiles (mi-Net style; mean pooling of logits equals a linear classifier on the mean).
* ``abmil`` -- gated attention MIL (Ilse et al., 2018).
* ``clam_sb`` / ``clam_mb`` -- CLAM single- and multi-branch (Lu et al., 2021) with the
  instance-clustering loss: the ``k_sample`` highest-attention tiles of the true class branch are
  pseudo-labelled positive, the ``k_sample`` lowest negative (and, with ``subtyping``, the highest
  tiles of the other branches negative); cross-entropy instead of CLAM's smooth top-1 SVM.
* ``transmil`` -- TransMIL (Shao et al., 2021): linear projection, class token, two pre-norm multi-head
  self-attention layers with the **PPEG** (depth-wise 7/5/3 convolutions over the tokens laid out in 2-D)
  between them; exact attention via ``scaled_dot_product_attention`` by default, or ``attention="nystrom"``:
  the paper's Nystrom approximation (:mod:`gigaslide.mil.nystrom`: linear in the bag, ``landmarks`` default
  ``hidden // 2``). The class token's last-layer attention is returned. Each attention layer is followed by a pre-norm feed-forward block
  (``x + MLP(LayerNorm(x))``, width 2x hidden): gigaslide's default, which the recorded benchmarks used; the
  paper's ``TransLayer`` has none (``x + attention(LayerNorm(x))`` only): ``ffn=False`` builds that.
  ``layout`` says how PPEG lays the tokens out:

  - ``"sequence"`` (default, the paper's): in file order, row by row on a square of ``ceil(sqrt(N))``
    columns, the first tiles repeated to fill it (their copies' attention folded back onto them). For
    gigaslide's tilings the file order is row-major over the slide's grid, so rows wrap wherever the tissue
    is not a full rectangle of that width;
  - ``"grid"``: each tile at its own cell of the slide's tiling grid (``cells`` [N, 2] = column, row, from
    :meth:`gigaslide.features.store.FeatureFile.grid_cells`), cells without a tile zero: neighbours on the slide are neighbours
    for the convolutions.

  ``ppeg=False`` drops PPEG: a tile-order-invariant model like the others.

Every ``forward`` takes ``cells`` (the tiles' grid positions, or None); only TransMIL's grid layout uses it.
"""

from __future__ import annotations

import inspect
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


def _check_cells(cells: Any, n: int, device: torch.device) -> torch.Tensor:
    if cells is None:
        raise GigaslideError("TransMIL with layout 'grid' needs the tiles' grid positions (cells), got none",
                             fix="train on feature files with tile coordinates (`gigaslide encode`), or use layout "
                                 "sequence")
    c = torch.as_tensor(cells, device=device).long()
    if c.shape != (n, 2) or (n and int(c.min()) < 0):
        raise GigaslideError(f"cells must be [{n}, 2] non-negative (column, row), got {tuple(c.shape)}")
    return c


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

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None
                ) -> dict[str, Any]:
        bag = _check_bag(bag)
        inst = self.classifier(self.fc(bag))  # [N, C]
        logits = inst.mean(0) if self.pool == "mean" else inst.max(0).values
        if self.n_classes == 2:
            score = inst[:, 1] - inst[:, 0]
        else:  # the predicted class's margin over the best other class (not the top logit of any class)
            k = int(logits.argmax())
            others = torch.cat([inst[:, :k], inst[:, k + 1:]], 1)
            score = inst[:, k] - others.max(1).values
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

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None
                ) -> dict[str, Any]:
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

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None
                ) -> dict[str, Any]:
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

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None
                ) -> dict[str, Any]:
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


#: Bytes of one layer's attention weights (heads x N x N, fp32) above which training attends in query chunks, each
#: recomputed in the backward pass (``torch.utils.checkpoint``): attention dropout makes torch use its plain path,
#: which holds every weight -- 40 GB for a bag of 50,000 tiles. Smaller bags run as one call, as before.
ATTENTION_CHUNK_BYTES = 256 * 2**20


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
        o = self._attend(q, k, v)
        cls_attn = None
        if return_cls_attention:  # class token (row 0) attention over tiles, averaged over heads
            cls_attn = torch.softmax((q[:, :1] @ k.transpose(1, 2)) / math.sqrt(d // self.heads), dim=-1)[:, 0].mean(0)
        return x + self.proj(o.transpose(0, 1).reshape(n, d)), cls_attn

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        h, n = q.shape[0], q.shape[1]
        if not (self.training and torch.is_grad_enabled()) or h * n * n * 4 <= ATTENTION_CHUNK_BYTES:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        from torch.utils.checkpoint import checkpoint

        rows = max(1, ATTENTION_CHUNK_BYTES // (h * n * 4))  # query rows whose weights fit the bound

        def chunk(qc: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(qc, k, v, dropout_p=p)

        # each chunk's weights are made again for its backward, with the same dropout mask (RNG state preserved)
        return torch.cat([checkpoint(chunk, q[:, i:i + rows], use_reentrant=False) for i in range(0, n, rows)], 1)


class PPEG(nn.Module):
    """TransMIL's pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` with depth-wise
    convolutions over tokens laid out row by row on a ``side x side`` square."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """Tokens [side * side, D] laid out row by row on a square."""
        n, d = tokens.shape
        if n != side * side:
            raise ValueError(f"PPEG needs {side}x{side} tokens, got {n}")
        x = tokens.T.reshape(1, d, side, side)
        x = x + sum(conv(x) for conv in self.convs)
        return x.reshape(d, n).T

    def on_grid(self, tokens: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Tokens [N, D] each at its cell (column, row) of a grid whose other cells are zero."""
        n, d = tokens.shape
        w, h = (int(v) + 1 for v in cells.max(0).values)
        flat = cells[:, 1] * w + cells[:, 0]
        x = tokens.new_zeros(d, h * w)
        x[:, flat] = tokens.T
        x = x.reshape(1, d, h, w)
        x = x + sum(conv(x) for conv in self.convs)
        return x.reshape(d, h * w)[:, flat].T


@MIL_MODELS.register("transmil")
class TransMIL(nn.Module):
    @staticmethod
    def arch_version(ppeg: bool = True, ffn: bool = True, **_: Any) -> int:
        """2: PPEG between the attention layers (version 1 had none; ``ppeg=False`` builds it); 3 / 4: without
        the feed-forward blocks (``ffn=False``, the paper's layers; a setting ``ffn`` was ignored before, so a run
        folder recorded with it holds the network with them); see :func:`~gigaslide.mil.models.arch_version`."""
        return (2 if ppeg else 1) if ffn else (4 if ppeg else 3)

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, ppeg: bool = True, layout: str = "sequence", ffn: bool = True,
                 attention: str = "exact", landmarks: int | None = None, **_: Any):
        super().__init__()
        if layout not in ("sequence", "grid"):
            raise GigaslideError(f"TransMIL layout {layout!r}", fix="use sequence (the paper's) or grid")
        if attention not in ("exact", "nystrom"):
            raise GigaslideError(f"TransMIL attention {attention!r}",
                                 fix="use exact (default) or nystrom (the paper's Nystrom approximation)")
        if landmarks is not None and (attention != "nystrom" or int(landmarks) < 1):
            raise GigaslideError(f"TransMIL landmarks {landmarks!r}",
                                 fix="give landmarks (1 or more) only with attention nystrom; default hidden // 2")
        if heads < 1 or hidden % heads:  # (was a reshape error at the first bag)
            raise GigaslideError(f"TransMIL's hidden width {hidden} is not a multiple of its {heads} attention heads",
                                 fix=f"use --hidden {max(heads, hidden // heads * heads)} (a multiple of {heads}), or "
                                     "set heads in --model-args" if heads >= 1 else "give heads 1 or more")
        self.layout = layout
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, hidden) * 0.02)
        if attention == "nystrom":
            from gigaslide.mil.nystrom import NystromSelfAttention

            self.layers = nn.ModuleList([NystromSelfAttention(hidden, heads, dropout, landmarks)
                                         for _ in range(layers)])
        else:
            self.layers = nn.ModuleList([_SelfAttention(hidden, heads, dropout) for _ in range(layers)])
        self.ff = nn.ModuleList([nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                               nn.Linear(2 * hidden, hidden)) for _ in range(layers)]) if ffn else None
        self.ppeg = PPEG(hidden) if ppeg else None
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None
                ) -> dict[str, Any]:
        h = self.fc(_check_bag(bag))
        n = h.shape[0]
        grid = self.ppeg is not None and self.layout == "grid"
        if grid:
            cells = _check_cells(cells, n, h.device)
        side = math.isqrt(n - 1) + 1 if self.ppeg is not None and not grid else 0
        if side * side > n:  # the paper's padding: the first tiles again
            h = torch.cat([h, h[torch.arange(side * side - n, device=h.device) % n]])
        x = torch.cat([self.cls_token, h])
        attn = None
        for i, sa in enumerate(self.layers):
            x, attn = sa(x, return_cls_attention=i == len(self.layers) - 1)
            if self.ff is not None:
                x = x + self.ff[i](x)
            if i == 0 and self.ppeg is not None:
                x = torch.cat([x[:1], self.ppeg.on_grid(x[1:], cells) if grid else self.ppeg(x[1:], side)])
        a = attn[1:]
        if a.shape[0] > n:  # a repeated token's attention belongs to its tile
            a = a[:n].index_add(0, torch.arange(a.shape[0] - n, device=a.device) % n, a[n:])
        a = a / a.sum().clamp_min(1e-12)
        return {"logits": self.classifier(self.norm(x[0])), "attention": a, "instance_scores": a}


def build_model(name: str, in_dim: int, n_classes: int, **kw: Any) -> nn.Module:
    """``MIL_MODELS.get(name)(in_dim, n_classes, **kw)`` with a clear error for unknown names."""
    return MIL_MODELS.get(name)(in_dim, n_classes, **kw)


def arch_version(name: str, kwargs: dict[str, Any] | None = None) -> int:
    """What model ``name`` with settings ``kwargs`` builds, numbered: raised where the same settings start to build
    a different network (TransMIL with its default PPEG: 2), so a run folder trained by the older network is not
    resumed as the newer. 1 for every model and setting that builds what it always did."""
    fn = getattr(MIL_MODELS.get(name), "arch_version", None)
    return int(fn(**(kwargs or {}))) if fn else 1


def model_settings(name: str) -> list[str]:
    """The keyword settings model ``name`` takes beyond ``in_dim``, ``n_classes``, ``hidden`` and ``dropout``
    (its own and those its base classes take through ``**kw``)."""
    out: list[str] = []
    for klass in MIL_MODELS.get(name).__mro__:
        if "__init__" not in vars(klass) or klass is nn.Module or klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD:
                if p.name not in ("self", "in_dim", "n_classes", "hidden", "dropout") and p.name not in out:
                    out.append(p.name)
    return out

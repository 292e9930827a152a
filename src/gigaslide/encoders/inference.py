"""An encoder made ready for inference only: eval mode, batch norms folded into the convolutions before them.

A CNN's batch norm in eval mode is a fixed per-channel affine map, so it can be folded into the weights and
bias of the convolution that feeds it (``torch.fx.experimental.optimization.fuse``, PyTorch's own pass). That
saves one pass over every activation map (``benchmarks/bench_encode.py`` measures the forward pass with and
without it); the features agree within float rounding. Models without batch norm (ViTs) and models fx cannot
trace are returned unchanged. The caller's encoder is never modified. ``gigaslide encode``, ``augment-cache``
and ``embed-tiles`` run their encoder through :func:`for_inference`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gigaslide.encoders.model import Encoder
from gigaslide.errors import GigaslideError


def _batchnorms(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())  # noqa: SLF001


def fold_batchnorm(trunk: nn.Module) -> nn.Module | None:
    """``trunk`` traced (eval mode) with each conv -> batch norm pair folded into one new conv; None when fx cannot
    trace it or nothing was folded. ``trunk`` is not modified; the layers not folded are shared with it (no copy of
    the whole model: tracing and folding a ResNet-18 take tens of ms, once per job)."""
    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse

    n_before = _batchnorms(trunk)
    if not n_before or trunk.training:
        return None
    try:
        # the traced module holds new containers around the same layers; fuse puts new convs (copies, folded) and
        # drops the batch norms there, so the original layers are left as they are
        fused = fuse(symbolic_trace(trunk), inplace=True, no_trace=True)
    except Exception:  # noqa: BLE001 - an untraceable model is used as it is
        return None
    return fused if _batchnorms(fused) < n_before else None


def for_inference(encoder: Encoder, fold: bool = True) -> Encoder:
    """``encoder`` in eval mode with its batch norms folded (a new :class:`Encoder` sharing the spec and weights id;
    not with ``fold=False``), channels_last for CNNs; ``encoder`` itself (in eval mode) when nothing is folded.
    ``bn_folded`` on the result says which."""
    encoder = encoder.eval()
    if not isinstance(encoder, Encoder):  # another module that embeds tiles: used as it is
        return encoder
    fused = fold_batchnorm(encoder.trunk) if fold else None  # in eval mode now
    out = encoder if fused is None else Encoder(encoder.spec, fused, encoder.weights_id).to(encoder.mean.device).eval()
    if out.spec.family == "cnn":
        out = out.to(memory_format=torch.channels_last)
    out.bn_folded = fused is not None
    return out


def nonfinite_error(feats: np.ndarray, precision: str, *, what: str, path: str | None = None,
                    coords: np.ndarray | None = None, names: Sequence[str | os.PathLike] | None = None,
                    in_fp32: str = "run with --precision fp32") -> GigaslideError | None:
    """A one-line error when ``feats`` ([N, D], an encoder's output for ``what``, e.g. "slide a") holds NaN or Inf
    values, else None: such features must never be written (every mean, attention weight and AUC made from them
    turns NaN). ``precision``: the one the encoder ran in (fp16 overflows: the fix is another precision);
    ``coords``: the tiles' level-0 (x, y), or ``names``: their files, to name the first bad tile; ``in_fp32``: how
    the command runs the encoder in fp32 (the fix after fp16 / bf16)."""
    finite = np.isfinite(feats).reshape(len(feats), -1).all(1)
    if finite.all():
        return None
    bad = np.flatnonzero(~finite)
    first = (str(names[bad[0]]) if names is not None else
             f"tile {bad[0]}" + ("" if coords is None else f" at level-0 ({coords[bad[0]][0]}, {coords[bad[0]][1]})"))
    kind = "/".join(k for k, has in (("NaN", np.isnan(feats).any()), ("Inf", np.isinf(feats).any())) if has)
    fix = (f"{in_fp32} (the encoder overflows in {precision}), or check its weights"
           if precision in ("fp16", "bf16") else
           "check the encoder's weights (--weights: a damaged or diverged checkpoint gives NaN) and re-run")
    return GigaslideError(f"the encoder gave {kind} features for {len(bad)} of {len(feats)} tiles of {what} (first: "
                          f"{first}, precision {precision}); nothing was written", path=path, fix=fix)

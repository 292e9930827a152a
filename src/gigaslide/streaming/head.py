"""End-to-end model: streamed CNN trunk -> (max-pooled) feature-map positions as a bag -> MIL head (CLAM-SB).

The trunk comes from the encoder registry (:mod:`gigaslide.encoders`): a registry name or an exported
``RUN/encoder`` folder gives the architecture, the weights and the normalisation (mean/std) the
weights were trained with. The head is taken from :data:`gigaslide.mil.models.MIL_MODELS`
(``clam_sb``, ``abmil``, ...); with ``pool_kernel = 8`` (StreamingCLAM) each instance is the max over
8 x 8 trunk positions, streamed (see :class:`~gigaslide.streaming.stream.StreamingCNN`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigaslide.encoders import EncoderSpec, build_encoder
from gigaslide.encoders.model import EXPORT_SPEC, EXPORT_WEIGHTS
from gigaslide.errors import GigaslideError
from gigaslide.streaming.stream import StreamingCNN


def build_trunk(encoder: str = "resnet34", weights: str | None = "default", *, seed: int = 0
                ) -> tuple[nn.Module, EncoderSpec, str]:
    """``(trunk, spec, weights_id)``: the encoder's CNN without global pooling / classifier, in eval mode.

    ``encoder``: a registry name (``gigaslide encoders``) or an exported encoder folder. ``weights``:
    ``default`` (the export's own weights, or the entry's hub weights from the local cache), ``random``,
    a weights file, or an exported encoder folder of the same architecture (its spec, with its mean/std,
    is then used).
    """
    if weights not in (None, "default", "random") and (Path(weights) / EXPORT_SPEC).is_file():
        exported = build_encoder(str(weights), "default", seed=seed)
        own = build_encoder(encoder, "random", seed=seed).spec
        if exported.spec.arch != own.arch:
            raise GigaslideError(f"the exported encoder is a {exported.spec.arch}, not a {own.arch} ('{encoder}')",
                                 path=Path(weights) / EXPORT_WEIGHTS,
                                 fix=f"pass --encoder {weights} (or the registry name of a {exported.spec.arch})")
        enc = exported
    else:
        enc = build_encoder(encoder, "default" if weights is None else weights, seed=seed)
    trunk = enc.trunk
    if hasattr(trunk, "reset_classifier"):  # timm: keep the feature map (no global pooling, no classifier)
        trunk.reset_classifier(0, "")
    # anything else that mixes positions (e.g. resnet50_trunc's mean) is refused by StreamingCNN, naming the layer
    return trunk.eval(), enc.spec, enc.weights_id


def feature_dim(trunk: nn.Module, size: int = 64) -> int:
    """Channels of the trunk's feature map: ``num_features`` (timm), else the output of a forward of a
    ``size`` x ``size`` input on the ``meta`` device (shapes only: no data, no compute), else the last
    convolution's ``out_channels``. (The last convolution alone is wrong for trunks that concatenate
    channels, e.g. a DenseNet.)"""
    dim = getattr(trunk, "num_features", None)
    if dim:
        return int(dim)
    try:
        from torch.func import functional_call

        state = {k: v.to("meta") for k, v in [*trunk.named_parameters(), *trunk.named_buffers()]}
        with torch.no_grad():
            out = functional_call(trunk, state, (torch.zeros(1, 3, size, size, device="meta"),))
        return int(out.shape[1])
    except Exception:  # noqa: BLE001 - a trunk that cannot run on meta tensors: its last convolution
        convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels)


class StreamingMIL(nn.Module):
    """``image [1, 3, H, W] (or a crop source) -> {'logits', 'attention' [h*w], 'fmap_size', ...}``.

    ``fmap_size`` is the (pooled) map the head saw; position ``(i, j)`` covers canvas px
    ``[i, j] * stream.out_stride`` onwards."""

    def __init__(self, stream: StreamingCNN, head: str = "clam_sb", n_classes: int = 2, **head_kw: Any):
        super().__init__()
        from gigaslide.mil.models import build_model

        self.stream = stream
        self.head_name = head
        self.head = build_model(head, feature_dim(stream.trunk, stream.min_tile_size), n_classes, **head_kw)

    def forward(self, image: torch.Tensor | Any, label: int | None = None) -> dict[str, Any]:
        if image.shape[0] != 1:
            raise GigaslideError(f"one slide per step, got a batch of {image.shape[0]}",
                                 fix="use gradient accumulation instead of batches")
        fmap = self.stream(image)  # [1, C, h, w], pooled when stream.pool_kernel > 1
        bag = fmap[0].flatten(1).transpose(0, 1)  # [h*w, C], a view in the trunk's dtype (no float copy)
        kw = {"label": label} if label is not None and self.head_name.startswith("clam") else {}
        out = dict(self.head(bag, **kw))
        out["fmap_size"] = tuple(fmap.shape[-2:])
        return out

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self.stream.trunk.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

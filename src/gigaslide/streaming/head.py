"""End-to-end model: streamed CNN trunk -> feature-map positions as a bag -> MIL head (CLAM-SB by default).

The head is taken from :data:`gigaslide.mil.models.MIL_MODELS` (``clam_sb``, ``abmil``, ...); it sees
every position of the full feature map, so its attention is a map over the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.streaming.stream import StreamingCNN


def build_trunk(encoder: str = "resnet34", weights: str | None = None) -> nn.Module:
    """A timm CNN without global pooling/classifier (eval mode), optionally loading a state_dict file or the
    weights of an exported encoder folder (``RUN_DIR/encoder`` of `gigaslide pretrain`)."""
    import timm

    try:
        trunk = timm.create_model(encoder, pretrained=False, num_classes=0, global_pool="")
    except Exception as e:  # noqa: BLE001
        raise GigaslideError(f"unknown encoder '{encoder}' ({str(e).splitlines()[0][:120]})",
                             fix="use a timm CNN name such as resnet18, resnet34 or resnet50") from None
    if weights:
        from gigaslide.encoders.model import EXPORT_SPEC, EXPORT_WEIGHTS
        from gigaslide.encoders.weights import read_state_dict, strip_prefixes

        if (Path(weights) / EXPORT_SPEC).is_file():  # an exported encoder, e.g. a `gigaslide pretrain` RUN/encoder
            weights = str(Path(weights) / EXPORT_WEIGHTS)
        own = set(trunk.state_dict())
        sd = {k: v for k, v in strip_prefixes(read_state_dict(weights), own).items() if k in own}
        if not sd:
            raise GigaslideError(f"no tensor in the file matches {encoder}", path=weights,
                                 fix=f"give weights of a {encoder} (timm names)")
        bad = [k for k, v in sd.items() if v.shape != trunk.state_dict()[k].shape]
        missing = [k for k in trunk.load_state_dict({k: v for k, v in sd.items() if k not in bad}, strict=False).missing_keys
                   if not k.endswith("num_batches_tracked")]
        if missing or bad:  # a partly loaded trunk would silently train from a half-random start
            first = (bad or missing)[0]
            raise GigaslideError(f"the weights cover only {len(own) - len(missing) - len(bad)} of {len(own)} tensors of "
                                 f"{encoder} (e.g. '{first}' is {'of another shape' if bad else 'missing'})",
                                 path=weights, fix=f"give weights of a {encoder} (timm names), or pick --encoder to match them")
    return trunk.eval()


def feature_dim(trunk: nn.Module) -> int:
    dim = getattr(trunk, "num_features", None)
    if dim:
        return int(dim)
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


class StreamingMIL(nn.Module):
    """``image [1, 3, H, W] -> {'logits', 'attention' [h*w], 'fmap_size', ...}``."""

    def __init__(self, stream: StreamingCNN, head: str = "clam_sb", n_classes: int = 2, **head_kw: Any):
        super().__init__()
        from gigaslide.mil.models import build_model

        self.stream = stream
        self.head_name = head
        self.head = build_model(head, feature_dim(stream.trunk), n_classes, **head_kw)

    def forward(self, image: torch.Tensor, label: int | None = None) -> dict[str, Any]:
        if image.shape[0] != 1:
            raise GigaslideError(f"one slide per step, got a batch of {image.shape[0]}",
                                 fix="use gradient accumulation instead of batches")
        fmap = self.stream(image)  # [1, C, h, w]
        bag = fmap[0].flatten(1).transpose(0, 1).float()  # [h*w, C]
        kw = {"label": label} if label is not None and self.head_name.startswith("clam") else {}
        out = dict(self.head(bag, **kw))
        out["fmap_size"] = tuple(fmap.shape[-2:])
        return out

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self.stream.trunk.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

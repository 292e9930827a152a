"""A HoVer-Net-style network on any registry backbone: a multi-scale encoder and one U-Net decoder per branch.

Branches (Graham et al. 2019): **NP** (nuclear pixel, 2-class logits), **HV** (horizontal / vertical
distance to the nucleus centre, 2 channels) and, when the annotations carry types, **NC** (type logits,
0 = background). The encoder is the trunk of any :func:`gigaslide.encoders.build_encoder` backbone —
a registry name (``resnet18``, ``resnet50`` ...) or an exported ``gigaslide pretrain`` run (``RUN/encoder``):

* ResNets (timm or the truncated CLAM variant) give their stem and stage outputs (strides 2, 4, 8, 16, 32);
* ViTs give their patch-token grid (stride 16 of the ViT's input size, the crop resized to it) plus a small
  convolutional stem at strides 2 and 4 for detail — a simple upsampling decoder.

Input: float ``[N, 3, H, W]`` in [0, 1] (H, W multiples of 32); the backbone's own normalisation is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gigaslide.encoders import EncoderSpec, create_trunk

MODEL_FORMAT = "gigaslide.nuclei-model/1"
#: Bounds :meth:`ModelSpec.check` holds a ``model.json`` to (``nuclei-train`` writes 128 .. 16 and the data set's
#: class count): the network is built from the record before its weights are read.
MAX_DECODER_CHANNELS = 1024
MAX_TYPES = 1000


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network (saved as ``model.json`` beside ``model.safetensors``)."""

    backbone: dict[str, Any]  # the EncoderSpec as a dict
    backbone_source: str  # what --backbone was (registry name or export folder)
    backbone_weights: str  # weights id of the initialisation (sha256:... or random-seedN)
    mpp: float
    n_types: int = 0  # 0: no NC branch
    type_names: dict[str, str] = field(default_factory=dict)  # "1" -> "tumor"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16)
    postprocess: dict[str, float] = field(default_factory=dict)
    crop: int | None = None  # training crop side (px at mpp): a ViT backbone sees each window resized to its input
    # size, so it is run on windows of this side (a 512 px window showed it nuclei at half their trained size)
    format: str = MODEL_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["decoder_channels"] = tuple(d.get("decoder_channels", (128, 64, 32, 16)))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self) -> None:
        """Raise ValueError naming the first field that no ``nuclei-train`` writes: a ``model.json`` from elsewhere
        with ``mpp: "abc"`` or NaN was used as is (a ValueError deep in a slide), ``n_types: -3`` failed building
        the network, and ``decoder_channels: [200000, ...]`` allocated gigabytes before the weights were read."""
        import math

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (isinstance(self.mpp, (int, float)) and not isinstance(self.mpp, bool) and math.isfinite(self.mpp)
                and self.mpp > 0):
            raise ValueError(f"mpp {self.mpp!r} is not a resolution")
        if not (is_int(self.n_types) and 0 <= self.n_types <= MAX_TYPES):
            raise ValueError(f"n_types {self.n_types!r} is not a count of 0..{MAX_TYPES}")
        if not (1 <= len(self.decoder_channels) <= 8
                and all(is_int(c) and 1 <= c <= MAX_DECODER_CHANNELS for c in self.decoder_channels)):
            raise ValueError(f"decoder_channels {list(self.decoder_channels)!r} are not 1..8 widths of "
                             f"1..{MAX_DECODER_CHANNELS}")
        if self.crop is not None and not (is_int(self.crop) and 32 <= self.crop <= 8192 and self.crop % 32 == 0):
            raise ValueError(f"crop {self.crop!r} is not a multiple of 32 px")
        if not isinstance(self.type_names, dict) or not isinstance(self.postprocess, dict):
            raise ValueError("type_names and postprocess must be objects")

    @property
    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec.from_dict(self.backbone)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResNetPyramid(nn.Module):
    """Stem and stage outputs of a timm ResNet (or gigaslide's truncated ResNet) trunk."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        stages = [getattr(trunk, f"layer{i}") for i in range(1, 5) if hasattr(trunk, f"layer{i}")]
        self._stages = stages or list(trunk.layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.trunk
        x = t.act1(t.bn1(t.conv1(x)))
        feats = [x]
        x = t.maxpool(x)
        for s in self._stages:
            x = s(x)
            feats.append(x)
        return feats


class ViTPyramid(nn.Module):
    """Patch-token grid of a timm ViT (input resized to its size) plus a light conv stem at strides 2 and 4."""

    def __init__(self, trunk: nn.Module, input_size: int):
        super().__init__()
        self.trunk, self.input_size = trunk, input_size
        self.stem = nn.Sequential(_conv(3, 32), nn.MaxPool2d(2))
        self.stem2 = nn.Sequential(_conv(32, 64), nn.MaxPool2d(2))
        self.n_prefix = int(getattr(trunk, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        s1 = self.stem(x)
        s2 = self.stem2(s1)
        xi = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        tok = self.trunk.forward_features(xi)[:, self.n_prefix:]
        g = int(round(tok.shape[1] ** 0.5))
        grid = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], g, g)
        grid = F.interpolate(grid, size=(max(1, h // 16), max(1, w // 16)), mode="bilinear", align_corners=False)
        return [s1, s2, grid]


def make_pyramid(trunk: nn.Module, spec: EncoderSpec) -> nn.Module:
    if hasattr(trunk, "conv1") and (hasattr(trunk, "layer1") or hasattr(trunk, "layers")):
        return ResNetPyramid(trunk)
    if hasattr(trunk, "patch_embed") and hasattr(trunk, "forward_features"):
        return ViTPyramid(trunk, spec.input_size)
    from gigaslide.errors import GigaslideError

    raise GigaslideError(f"backbone '{spec.name}' ({spec.arch}) is neither a ResNet nor a ViT",
                         fix="use a ResNet (resnet18, resnet50 ...) or ViT backbone")


class Decoder(nn.Module):
    """Upsample the deepest feature, fusing each shallower one, up to the input size."""

    def __init__(self, in_channels: list[int], channels: tuple[int, ...], out: int):
        super().__init__()
        skips = in_channels[:-1][::-1]  # shallower features, deepest first
        self.blocks = nn.ModuleList()
        c = in_channels[-1]
        for k, sc in enumerate(skips):
            co = channels[min(k, len(channels) - 1)]
            self.blocks.append(nn.Sequential(_conv(c + sc, co), _conv(co, co)))
            c = co
        self.final = nn.Sequential(_conv(c, channels[-1]), nn.Conv2d(channels[-1], out, 1))

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = feats[-1]
        for blk, skip in zip(self.blocks, feats[:-1][::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], 1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.final(x)


class HoVerNet(nn.Module):
    """``forward(x) -> {"np": [N,2,H,W] logits, "hv": [N,2,H,W], "nc": [N,T+1,H,W] logits (with types)}``."""

    def __init__(self, spec: ModelSpec, trunk: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        es = spec.encoder_spec
        self.encoder = make_pyramid(trunk if trunk is not None else create_trunk(es), es)
        self.register_buffer("mean", torch.tensor(es.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(es.std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            was = self.encoder.training
            self.encoder.eval()
            chans = [f.shape[1] for f in self.encoder(torch.zeros(1, 3, 64, 64))]
            self.encoder.train(was)
        ch = tuple(spec.decoder_channels)
        self.np_head = Decoder(chans, ch, 2)
        self.hv_head = Decoder(chans, ch, 2)
        self.nc_head = Decoder(chans, ch, spec.n_types + 1) if spec.n_types else None
        self.frozen = False

    def freeze_encoder(self) -> None:
        """Keep the backbone fixed (no gradients, BatchNorm statistics frozen)."""
        self.frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> HoVerNet:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        feats = self.encoder(x)
        out = {"np": self.np_head(feats, size), "hv": self.hv_head(feats, size)}
        if self.nc_head is not None:
            out["nc"] = self.nc_head(feats, size)
        return out


__all__ = ["MODEL_FORMAT", "Decoder", "HoVerNet", "ModelSpec", "ResNetPyramid", "ViTPyramid", "make_pyramid"]

"""Which ``--backbone`` fits a ViT ``--init`` checkpoint: the shape each registry entry would build, and a one-line
refusal naming the entries that fit when the checkpoint's shape differs (the layouts themselves:
:mod:`gigaslide.encoders.vit_layout`)."""

from __future__ import annotations

import re

import torch
from torch import nn

from gigaslide.encoders import ENCODERS
from gigaslide.encoders.vit_layout import VitShape, patch_size_of, state_shape, strip_layout, trunk_shape
from gigaslide.errors import GigaslideError

__all__ = ["VitShape", "check_vit_state", "matching_backbones", "patch_size_of", "spec_shape", "state_shape",
           "trunk_shape"]


#: timm ViT size names -> (width, depth), for naming registry entries that fit a checkpoint.
_SIZES = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24), "huge": (1280, 32),
          "giant": (1536, 40)}


def spec_shape(spec) -> VitShape | None:  # noqa: ANN001
    """A registry ViT's shape from its timm name and kwargs (``vit_<size>_patch<p>[_reg<r>]``), without building it."""
    m = re.match(r"vit_(tiny|small|base|large|huge|giant)_patch(\d+)", spec.arch)
    if spec.family != "vit" or "out_stage" in spec.timm_kwargs:
        return None
    if not m:  # another naming scheme: build it on the meta device (no memory, no weights)
        from gigaslide.encoders import create_trunk

        try:
            with torch.device("meta"):
                return trunk_shape(create_trunk(spec))
        except Exception:  # noqa: BLE001 - an entry that cannot be built that way is just not suggested
            return None
    dim, depth = _SIZES[m.group(1)]
    reg = re.search(r"_reg(\d+)", spec.arch)
    kw = spec.timm_kwargs
    return VitShape(int(kw.get("patch_size", m.group(2))), int(kw.get("embed_dim", dim)), int(kw.get("depth", depth)),
                    int(kw.get("reg_tokens", reg.group(1) if reg else 0)))


def matching_backbones(shape: VitShape) -> list[str]:
    return [n for n, spec in ENCODERS.items() if spec_shape(spec) == shape]


def check_vit_state(sd: dict[str, torch.Tensor], trunk: nn.Module, source: str, backbone: str) -> None:
    """Refuse (one line) a checkpoint whose ViT shape differs from ``trunk``'s, naming entries that fit it."""
    got = state_shape(strip_layout(sd, trunk))
    want = trunk_shape(trunk)
    if got is None:
        raise GigaslideError(f"--init is not a ViT checkpoint (no patch_embed.proj.weight) but --backbone {backbone} is a ViT "
                             f"({want})", path=source, fix="pick the --backbone these weights were trained with")
    if got != want:
        fits = matching_backbones(got)
        hint = f"use --backbone {' or '.join(fits[:3])}" if fits else "use a --backbone with that architecture"
        raise GigaslideError(f"--init is a ViT with {got} but --backbone {backbone} has {want}", path=source,
                             fix=f"{hint}, or an --init trained with {backbone}")



"""ViT checkpoints for ``--init``: what a state dict is (patch, width, depth, register tokens), whether
it fits the ``--backbone``, and the original DINOv2 layout converted to timm's.

The original DINOv2 release (``dinov2_vits14_pretrain.pth``, ``..._reg4_...``) stores
``mask_token``, ``register_tokens`` and a position embedding that includes the class token; timm's
``checkpoint_filter_fn`` converts it (and resamples the position embedding to the model's grid).
Hugging Face ``transformers`` checkpoints (``facebook/dinov2-small`` ...: ``embeddings.*``,
``encoder.layer.N.*`` with separate query/key/value) are first renamed back to that original layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gigaslide.encoders import ENCODERS
from gigaslide.encoders.weights import strip_prefixes
from gigaslide.errors import GigaslideError


@dataclass(frozen=True)
class VitShape:
    patch: int
    dim: int
    depth: int
    registers: int

    def __str__(self) -> str:
        regs = f"{self.registers} register tokens" if self.registers else "no register tokens"
        return f"patch {self.patch}, {self.dim}-d, {self.depth} blocks, {regs}"


_HF_NAMES = [("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
             ("embeddings.register_tokens", "register_tokens"), ("embeddings.position_embeddings", "pos_embed"),
             ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("layernorm.", "norm.")]
_HF_BLOCK = [("attention.output.dense.", "attn.proj."), ("layer_scale1.lambda1", "ls1.gamma"),
             ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3.")]


def from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``transformers`` Dinov2Model state dict (``embeddings.*``, ``encoder.layer.N.*``) in the original layout."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", k)
        if m is None:
            out[next((k.replace(a, b, 1) for a, b in _HF_NAMES if k.startswith(a)), k)] = v
            continue
        i, rest = m.groups()
        if (q := re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)) is not None:
            qkv.setdefault(f"blocks.{i}.attn.qkv.{q.group(2)}", {})[q.group(1)] = v
            continue
        out[f"blocks.{i}." + next((rest.replace(a, b, 1) for a, b in _HF_BLOCK if rest.startswith(a)), rest)] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _strip(sd: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    if any(k.removeprefix("dinov2.").startswith("embeddings.patch_embeddings.") for k in sd):
        sd = from_transformers(sd)
    sd = strip_prefixes(sd, set(trunk.state_dict()) | {"mask_token", "register_tokens"})
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):  # DINOv2 block chunks: blocks.<chunk>.<block>.
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    return sd


def state_shape(sd: dict[str, torch.Tensor]) -> VitShape | None:
    """The ViT a state dict (timm or original DINOv2 layout, prefixes stripped) describes; None if not a ViT."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    reg = sd.get("reg_token", sd.get("register_tokens"))
    return VitShape(int(w.shape[-1]), int(w.shape[0]), (max(blocks) + 1) if blocks else 0, int(reg.shape[1]) if reg is not None else 0)


def patch_size_of(trunk: nn.Module) -> int | None:
    """A ViT's patch size, read from the model (None for CNNs)."""
    ps = getattr(getattr(trunk, "patch_embed", None), "patch_size", None)
    if ps is None:
        return None
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
    if ps[0] != ps[1]:
        raise GigaslideError(f"non-square patches {ps} are not supported", fix="use a ViT with square patches")
    return int(ps[0])


def trunk_shape(trunk: nn.Module) -> VitShape:
    return VitShape(int(patch_size_of(trunk) or 0), int(trunk.embed_dim), len(trunk.blocks),
                    int(getattr(trunk, "num_reg_tokens", 0) or 0))


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
    got = state_shape(_strip(sd, trunk))
    want = trunk_shape(trunk)
    if got is None:
        raise GigaslideError(f"--init is not a ViT checkpoint (no patch_embed.proj.weight) but --backbone {backbone} is a ViT "
                             f"({want})", path=source, fix="pick the --backbone these weights were trained with")
    if got != want:
        fits = matching_backbones(got)
        hint = f"use --backbone {' or '.join(fits[:3])}" if fits else "use a --backbone with that architecture"
        raise GigaslideError(f"--init is a ViT with {got} but --backbone {backbone} has {want}", path=source,
                             fix=f"{hint}, or an --init trained with {backbone}")


def to_timm_layout(sd: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Prefixes stripped; the original DINOv2 layout converted to timm's (position embedding resampled)."""
    sd = _strip(sd, trunk)
    if ("mask_token" in sd or "register_tokens" in sd) and state_shape(sd) == trunk_shape(trunk):
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = dict(sd)
        sd.setdefault("mask_token", torch.zeros(1, 1))  # marks the layout for timm's converter, dropped by it
        sd = checkpoint_filter_fn(sd, trunk)
    return sd

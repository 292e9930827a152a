"""ViT checkpoint layouts: what a state dict is (patch, width, depth, register tokens) and the layouts other
tools save converted to timm's, so ``build_encoder --weights`` and ``pretrain --init`` read the same files.

- timm's own layout (the registry's hub weights, gigaslide exports): used as it is.
- The original DINOv2 release (``dinov2_vits14_pretrain.pth``, ``..._reg4_...``): ``mask_token``,
  ``register_tokens`` and a position embedding that includes the class token; timm's ``checkpoint_filter_fn``
  converts it (and resamples the position embedding to the model's grid).
- Hugging Face ``transformers`` checkpoints, renamed to the original layout first: ``Dinov2Model``
  (``facebook/dinov2-*``, Phikon-v2: ``embeddings.*``, ``encoder.layer.N.norm1`` ...) and ``ViTModel``
  (Phikon: ``encoder.layer.N.layernorm_before``, ``intermediate.dense`` ...), query/key/value concatenated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

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
             ("layer_scale2.lambda1", "ls2.gamma"), ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3."),
             # ViTModel (no layer scale, plain MLP) names the same parts differently
             ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("intermediate.dense.", "mlp.fc1."),
             ("output.dense.", "mlp.fc2.")]


def from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``transformers`` Dinov2Model or ViTModel state dict (``embeddings.*``, ``encoder.layer.N.*``; ``dinov2.`` /
    ``vit.`` prefixes of their task models dropped, a pooler dropped) in the original layout."""
    sd = {k.removeprefix("dinov2.").removeprefix("vit."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
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


def strip_layout(sd: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` with wrapper prefixes dropped and ``transformers`` names renamed (original DINOv2 layout, or timm's)."""
    if any(k.removeprefix("dinov2.").removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in sd):
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


def to_timm_layout(sd: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Prefixes stripped; the original DINOv2 layout converted to timm's (position embedding resampled)."""
    sd = strip_layout(sd, trunk)
    if ("mask_token" in sd or "register_tokens" in sd) and state_shape(sd) == trunk_shape(trunk):
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = dict(sd)
        sd.setdefault("mask_token", torch.zeros(1, 1))  # marks the layout for timm's converter, dropped by it
        sd = checkpoint_filter_fn(sd, trunk)
    return sd

"""The run's encoder spec, and ``--init``: start from an existing encoder (Roth et al. 2024).

``--init`` accepts a registry name (hub weights from the local cache, e.g. ``vit_small_dinov2``),
a hub id (``hf-hub:timm/vit_small_patch14_dinov2.lvd142m``, local cache only), an export folder
(``RUN_DIR/encoder``), a run folder or its ``checkpoint/``, a folder holding ``model.safetensors``
(a Hugging Face cache snapshot), or a weights file. Weights in timm's layout, in the original
DINOv2 layout (``mask_token``, ``register_tokens``, ``w12``/``w3`` SwiGLU, block chunks; converted by
timm's ``checkpoint_filter_fn``) and in Hugging Face ``transformers``' Dinov2 layout are read
(:mod:`gigaslide.ssl.tile.vit_layout`); DINOv2 ViT-S/B/L/g with or without register tokens.

The source must have the same architecture as ``--backbone``: a ViT's patch size, width, depth and
register tokens are compared before loading and a mismatch is one line naming both and the
registry entries that would fit. Positional embeddings are resampled to the run's tile size on
load; other crop sizes are resampled on the fly (timm ``dynamic_img_size``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gigaslide import runs
from gigaslide.encoders import ENCODERS, EncoderSpec, read_state_dict, resolve_hub_weights
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.vit_layout import check_vit_state, patch_size_of

__all__ = ["init_mask_token", "load_init", "load_init_weights", "patch_size_of", "resolve_init", "run_spec"]


def run_spec(backbone: str, method: str, tile_size: int, mpps: Sequence[float] | None, augment: str) -> EncoderSpec:
    """The spec the trained encoder is exported with: the backbone's architecture at ``tile_size``."""
    base = ENCODERS.get(backbone)
    if "out_stage" in base.timm_kwargs:
        raise GigaslideError(f"backbone '{backbone}' is a truncated feature extractor, not trainable here",
                             fix="use resnet18, resnet50, vit_small or vit_small_dinov2")
    kw = dict(base.timm_kwargs)
    if base.family == "vit":
        kw.update(img_size=int(tile_size), dynamic_img_size=True)  # multi-crop local views have other sizes
    return dataclasses.replace(
        base, name=f"{backbone}_{method}", input_size=int(tile_size), timm_kwargs=kw, hub=None,
        native_mpp=float(mpps[0]) if mpps else None,
        weight_source=f"gigaslide pretrain --method {method} --augment {augment}",
        description=f"{base.arch} self-supervised with {method} on pathology tiles ({tile_size} px, mpp {list(mpps or [])})",
    )


def _arch_of_export(folder: Path) -> tuple[str, dict]:
    try:
        d = json.loads((folder / "encoder.json").read_text())
        return d["arch"], dict(d.get("timm_kwargs") or {})
    except (OSError, ValueError, KeyError) as e:
        raise GigaslideError(f"bad encoder export ({e})", path=folder / "encoder.json", fix="re-export the encoder") from None


def _check_arch(init: str, arch: str, spec: EncoderSpec, backbone: str) -> None:
    if arch != spec.arch:
        same = [n for n, s in ENCODERS.items() if s.arch == arch and "out_stage" not in s.timm_kwargs]
        hint = f"--backbone {same[0]}" if same else f"a --backbone with architecture {arch}"
        raise GigaslideError(f"--init is a {arch} encoder but --backbone {backbone} is {spec.arch}", path=init,
                             fix=f"use {hint}, or an --init trained with {spec.arch}")


def resolve_init(init: str, spec: EncoderSpec, backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, source description) for ``--init``; refuses another architecture."""
    p = Path(init)
    if init.startswith(("hf-hub:", "hf_hub:")):
        return read_state_dict(resolve_hub_weights(init)), init
    if p.is_dir() and not (p / "encoder.json").is_file():
        for name in ("model.safetensors", "pytorch_model.bin"):  # a Hugging Face cache snapshot / model folder
            if (p / name).is_file():
                return read_state_dict(p / name), str(p / name)
    if p.is_dir():
        run = p.parent if p.name == runs.CHECKPOINT_DIR and (p / "last.json").is_file() else p
        if (p / "encoder.json").is_file():
            arch, _ = _arch_of_export(p)
            _check_arch(init, arch, spec, backbone)
            return read_state_dict(p / "weights.safetensors"), str(p)
        if (run / "encoder" / "encoder.json").is_file():
            arch, _ = _arch_of_export(run / "encoder")
            _check_arch(init, arch, spec, backbone)
            return read_state_dict(run / "encoder" / "weights.safetensors"), str(run / "encoder")
        if runs.read_checkpoint_record(run) is not None:  # a pretrain run not exported yet: its checkpoint's trunk
            ck = runs.load_checkpoint(run)
            arch = (ck.get("spec") or {}).get("arch")
            if arch:
                _check_arch(init, arch, spec, backbone)
            pre = ck.get("export_prefix", "backbone.")
            return {k[len(pre):]: v for k, v in ck["model"].items() if k.startswith(pre)}, str(runs.checkpoint_dir(run))
        raise GigaslideError("folder is neither an encoder export nor a pretrain run", path=p,
                             fix="pass RUN_DIR, RUN_DIR/encoder, a weights file, or an encoder name")
    if p.is_file():
        return read_state_dict(p), str(p)
    if any(c in init for c in "/\\") or init.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise GigaslideError("--init not found", path=init, fix="check the path, or pass an encoder name (see `gigaslide encoders`)")
    src = ENCODERS.get(init)
    _check_arch(init, src.arch, spec, backbone)
    if not src.hub:
        raise GigaslideError(f"encoder '{init}' has no pretrained weights to start from", fix="pass a weights file or export folder")
    try:
        path = resolve_hub_weights(src.hub)
    except GigaslideError as e:
        raise GigaslideError(e.what, path=e.path, fix=(e.fix or "").replace("--weights PATH", "--init PATH")) from None
    return read_state_dict(path), f"{init} ({path})"


def init_mask_token(sd: dict[str, torch.Tensor], trunk: nn.Module) -> torch.Tensor | None:
    """The trained DINOv2 mask token ``[1, 1, D]`` an ``--init`` checkpoint carries (the original DINOv2 layout, its
    training checkpoints and ``transformers``' ``embeddings.mask_token``), or None (timm's layout and exports keep
    none). timm's ViT has no mask token, so loading the trunk drops it; ``--method dinov2`` continues from it."""
    from gigaslide.encoders.vit_layout import strip_layout

    dim = getattr(trunk, "embed_dim", None)
    token = strip_layout(sd, trunk).get("mask_token") if dim else None
    if token is None or token.numel() != int(dim):
        return None
    return token.detach().reshape(1, 1, int(dim)).clone()


def load_init(trunk: nn.Module, spec: EncoderSpec, init: str, backbone: str) -> str:
    """Load ``--init`` weights into ``trunk`` in place; returns where they came from."""
    return load_init_weights(trunk, spec, init, backbone)[0]


def load_init_weights(trunk: nn.Module, spec: EncoderSpec, init: str, backbone: str) -> tuple[str, torch.Tensor | None]:
    """:func:`load_init`, plus the checkpoint's DINOv2 mask token (:func:`init_mask_token`) or None."""
    from gigaslide.encoders.model import load_weights_into

    sd, source = resolve_init(init, spec, backbone)
    if spec.family == "vit":  # the shape refusal names the backbones that fit; the layout is converted while loading
        check_vit_state(sd, trunk, source, backbone)
    try:
        load_weights_into(trunk, sd, source, spec)
    except GigaslideError as e:  # the entries the weights fit, when the loader found some, named as --backbone
        fits = e.fix.replace("--encoder", "--backbone") if e.fix and e.fix.startswith("they fit --encoder") else None
        raise GigaslideError(e.what, path=e.path, fix=fits or f"these weights are not a {spec.arch}: pick the "
                             "--backbone they were trained with") from None
    return source, (init_mask_token(sd, trunk) if spec.family == "vit" else None)

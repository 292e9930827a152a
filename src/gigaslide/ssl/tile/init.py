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
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gigaslide import runs
from gigaslide.encoders import ENCODERS, EncoderSpec, resolve_hub_weights
from gigaslide.encoders import read_state_dict as _read_state_dict
from gigaslide.encoders.weights import safetensors_shapes
from gigaslide.errors import GigaslideError
from gigaslide.provenance import check_format, file_sha256
from gigaslide.ssl.tile.config import init_file
from gigaslide.ssl.tile.vit_layout import check_vit_state, patch_size_of

__all__ = ["INIT_EXTRA_ELEMENTS", "INIT_SIZE_FACTOR", "check_init_size", "init_mask_token", "init_weights_sha256",
           "load_init", "load_init_weights", "patch_size_of", "resolve_init", "run_spec"]


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
    """(arch, timm kwargs) of an export folder; an export a newer gigaslide wrote (its provenance's
    ``format_version``) is refused in one line, not read as this version's layout."""
    try:
        d = json.loads((folder / "encoder.json").read_text())
        arch, kw = d["arch"], dict(d.get("timm_kwargs") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GigaslideError(f"bad encoder export ({e})", path=folder / "encoder.json", fix="re-export the encoder") from None
    if isinstance(d.get("provenance"), dict):
        check_format(d["provenance"], folder / "encoder.json")
    return arch, kw


def _check_arch(init: str, arch: str, spec: EncoderSpec, backbone: str) -> None:
    if arch != spec.arch:
        same = [n for n, s in ENCODERS.items() if s.arch == arch and "out_stage" not in s.timm_kwargs]
        hint = f"--backbone {same[0]}" if same else f"a --backbone with architecture {arch}"
        raise GigaslideError(f"--init is a {arch} encoder but --backbone {backbone} is {spec.arch}", path=init,
                             fix=f"use {hint}, or an --init trained with {spec.arch}")


#: An ``--init`` safetensors file may hold at most this many times the trunk's weights (a DINO / DINOv2 training
#: checkpoint holds a teacher, a student and their heads: about 4x) plus :data:`INIT_EXTRA_ELEMENTS`.
INIT_SIZE_FACTOR = 16
#: ... elements (2^28: 1 GiB of fp32; DINO heads of 65,536 prototypes on a small trunk fit easily).
INIT_EXTRA_ELEMENTS = 1 << 28
def check_init_size(path: str | os.PathLike, trunk: nn.Module, backbone: str) -> None:
    """Refuse, from its header alone, a safetensors ``--init`` whose tensors are far larger than ``trunk`` (absurd
    shapes, e.g. a header claiming a [10^6, 10^6] tensor over a sparse file): loading it was an out-of-memory abort
    (``std::bad_alloc``) or a machine swapping, not a one-line error. Other formats and unreadable headers are left to
    the loader."""
    if Path(path).suffix != ".safetensors":
        return
    header = safetensors_shapes(path)
    if not header:
        return  # a damaged file: read_state_dict names it
    shapes = {k: shape for k, (shape, _) in header.items()}
    sizes = {k: math.prod(v) for k, v in shapes.items()}
    total = sum(sizes.values())
    nbytes = sum(sizes[k] * header[k][1] for k in sizes)
    own = sum(t.numel() for t in trunk.state_dict().values())
    if total > INIT_SIZE_FACTOR * own + INIT_EXTRA_ELEMENTS:
        big = max(sizes, key=sizes.get)
        raise GigaslideError(f"--init holds {total:,} weights (the largest, {big}: {shapes[big]}) but --backbone "
                             f"{backbone} has {own:,}: these are no weights of it, and loading them would take "
                             f"{nbytes / 2**30:,.1f} GiB", path=path,
                             fix=f"pass the weights of a {backbone} encoder (or the --backbone they were trained with)")


def resolve_init(init: str | os.PathLike, spec: EncoderSpec, backbone: str,
                 trunk: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, source description) for ``--init``; refuses another architecture, and (given ``trunk``) a
    safetensors file far larger than it before reading it (:func:`check_init_size`)."""

    def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
        if trunk is not None:
            check_init_size(path, trunk, backbone)
        return _read_state_dict(path)

    init = os.fspath(init)
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


def init_weights_sha256(init: str | os.PathLike | None) -> str | None:
    """The sha256 of the weights file ``--init`` names (a file, an export or run folder's ``encoder``, a Hugging Face
    snapshot, a registry name or hub id in the local cache): what the exported encoder's provenance records as
    ``init_sha256``, so it names the weights it continued from, not only a path or a name whose file may change.
    None without ``--init``, for a run folder with a checkpoint but no export, or when the file cannot be found."""
    if not init:
        return None
    init = os.fspath(init)
    path = init_file(init)
    if path is None:
        try:
            if init.startswith(("hf-hub:", "hf_hub:")):
                path = resolve_hub_weights(init)
            elif init in ENCODERS and ENCODERS.get(init).hub:
                path = resolve_hub_weights(ENCODERS.get(init).hub)
        except GigaslideError:
            return None
    return file_sha256(path) if path is not None and Path(path).is_file() else None


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

    sd, source = resolve_init(init, spec, backbone, trunk)
    if spec.family == "vit":  # the shape refusal names the backbones that fit; the layout is converted while loading
        check_vit_state(sd, trunk, source, backbone)
    try:
        load_weights_into(trunk, sd, source, spec)
    except GigaslideError as e:  # the entries the weights fit, when the loader found some, named as --backbone
        fits = e.fix.replace("--encoder", "--backbone") if e.fix and e.fix.startswith("they fit --encoder") else None
        raise GigaslideError(e.what, path=e.path, fix=fits or f"these weights are not a {spec.arch}: pick the "
                             "--backbone they were trained with") from None
    return source, (init_mask_token(sd, trunk) if spec.family == "vit" else None)

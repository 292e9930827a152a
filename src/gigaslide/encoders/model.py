"""Build an encoder: a timm trunk plus its preprocessing, with weights from a file, a local hub
cache, a gigaslide export folder, or random (tests and benchmarks only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gigaslide import atomic
from gigaslide.encoders.specs import ENCODERS, EncoderSpec
from gigaslide.encoders.vit_layout import to_timm_layout
from gigaslide.encoders.weights import read_state_dict, resolve_hub_weights, strip_prefixes, weights_file
from gigaslide.errors import GigaslideError
from gigaslide.provenance import check_format, file_sha256
from gigaslide.runs import isolated_rng

EXPORT_SPEC = "encoder.json"
EXPORT_WEIGHTS = "weights.safetensors"


class TruncatedResNet(nn.Module):
    """A timm ResNet up to ``out_stage`` (1-4), average-pooled (CLAM's resnet50_trunc uses stage 3)."""

    def __init__(self, arch: str, out_stage: int):
        super().__init__()
        import timm

        m = timm.create_model(arch, pretrained=False, num_classes=0)
        self.conv1, self.bn1, self.act1, self.maxpool = m.conv1, m.bn1, m.act1, m.maxpool
        self.out_stage = out_stage
        for i in range(1, out_stage + 1):  # timm's names, so timm / SSL-trained full-ResNet weights load
            setattr(self, f"layer{i}", getattr(m, f"layer{i}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(1, self.out_stage + 1):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3))


def _mlp_layers() -> dict[str, object]:
    from timm.layers import SwiGLUPacked

    return {"swiglu_packed": SwiGLUPacked}


def create_trunk(spec: EncoderSpec) -> nn.Module:
    """The architecture with random weights and no classifier (forward -> [N, width]; the encoder's ``pool`` may
    make its embedding from the tokens instead, see :class:`Encoder`). ``mlp_layer`` in the spec's ``timm_kwargs``
    is a name (``swiglu_packed``), so a spec stays JSON."""
    import timm

    kw = dict(spec.timm_kwargs)
    if "out_stage" in kw:
        return TruncatedResNet(spec.arch, int(kw.pop("out_stage")))
    if isinstance(kw.get("mlp_layer"), str):
        layers = _mlp_layers()
        if kw["mlp_layer"] not in layers:
            raise GigaslideError(f"encoder '{spec.name}': unknown mlp_layer '{kw['mlp_layer']}'",
                                 fix=f"use one of {', '.join(layers)} in its timm_kwargs")
        kw["mlp_layer"] = layers[kw["mlp_layer"]]
    return timm.create_model(spec.arch, pretrained=False, num_classes=0, **kw)


def cls_mean(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token concatenated with the mean of the patch tokens (register tokens left out): ``[N, 2 * width]``."""
    tokens = trunk.forward_features(x)
    return torch.cat([tokens[:, 0], tokens[:, int(getattr(trunk, "num_prefix_tokens", 1)):].mean(1)], dim=-1)


class Encoder(nn.Module):
    """``forward(uint8 NHWC or float NCHW in [0, 1]) -> [N, D]`` with the spec's preprocessing."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights_id = weights_id
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] (as read from slides) or float [N, 3, H, W] in [0, 1] -> normalised float NCHW.

        ``(x / 255 - mean) / std`` as one scale and one shift, in place on the float copy (the caller's tensor is
        never changed): half the time of four passes over the batch; the same values within float rounding.
        Resizing (bilinear, linear in the pixel values) comes first."""
        fresh, top = x.dtype == torch.uint8, 1.0
        if fresh:
            x, top = x.permute(0, 3, 1, 2).float(), 255.0  # NHWC memory: channels_last strides already
        s = self.spec.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=x.shape[-1] > s)
            fresh = True
        scale = 1.0 / (top * self.std)
        x = (x.mul_(scale) if fresh else x * scale).sub_(self.mean / self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.spec.family == "cnn" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        return cls_mean(self.trunk, x) if self.spec.pool == "cls_mean" else self.trunk(x)


def load_weights_into(trunk: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: EncoderSpec, *,
                      assign: bool = False) -> None:
    """Load ``sd`` into ``trunk`` (wrapper prefixes and heads dropped, a ViT's position embedding resampled to the
    trunk's grid), or a one-line error naming what does not fit. ``assign``: the checkpoint's tensors become the
    trunk's (cast to its dtypes), for a trunk made on the meta device. A ViT checkpoint may be in the original
    DINOv2 or a Hugging Face ``transformers`` layout (:mod:`gigaslide.encoders.vit_layout`); weights that do not fit
    name the registry entries they do fit (:func:`fitting_encoders`)."""
    raw = sd
    own = trunk.state_dict()
    try:
        sd, missing, bad_shape, stray, unexpected = _fit(trunk, sd, source, spec)
    except GigaslideError as e:  # a position embedding of another variant
        fits = fitting_encoders(raw, exclude=spec.name)
        if fits:
            raise GigaslideError(e.what, path=source, fix=f"they fit --encoder {' or '.join(fits)}") from None
        raise
    if missing or bad_shape or stray:
        fits = fitting_encoders(raw, exclude=spec.name)
        raise GigaslideError(
            f"weights do not fit encoder '{spec.name}' ({spec.arch}): {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(bad_shape)} with other shapes (e.g. {bad_shape[:2]}), {len(unexpected)} "
            f"unexpected{f' (e.g. {stray[:2]})' if stray else ''}",
            path=source, fix=(f"they fit --encoder {' or '.join(fits)}" if fits else
                              "pick the --encoder these weights were trained for (see `gigaslide encoders`)"),
        )
    trunk.load_state_dict({k: sd[k].to(own[k].dtype) if assign else sd[k] for k in own}, strict=True, assign=assign)


def _fit(trunk: nn.Module, sd: dict[str, torch.Tensor], source: str,
         spec: EncoderSpec) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str], list[str]]:
    """``sd`` as ``trunk`` would load it (layout converted, prefixes and heads dropped, position embedding resampled)
    and what does not fit: (state dict, missing, other shapes, unexpected parts of the trunk's own, unexpected)."""
    own = trunk.state_dict()
    if spec.family == "vit" and getattr(trunk, "patch_embed", None) is not None:
        sd = to_timm_layout(sd, trunk)
    sd = strip_prefixes(sd, set(own))
    # drop classifier / projection heads the trunk does not have
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("fc.", "head.", "classifier.", "projection", "prototypes"))}
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resampled_pos_embed(sd["pos_embed"], own["pos_embed"], trunk, source, spec)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # a checkpoint may hold parts the trunk leaves out on purpose (a truncated ResNet's later stages), but not more of
    # the parts it has (more blocks, more layers of a stage): loading only some of them would change the model
    own_tops = {k.split(".", 1)[0] for k in own}
    stray = [k for k in unexpected if k.split(".", 1)[0] in own_tops]
    bad_shape = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    return sd, missing, bad_shape, stray, unexpected


def fitting_encoders(sd: dict[str, torch.Tensor], exclude: str | None = None, limit: int = 4) -> list[str]:
    """Registry entries (not the tests' tiny ones) whose architecture loads ``sd``: the names a wrong ``--encoder``'s
    error suggests. Each architecture is made once, on the meta device (no memory, seconds for the whole registry)."""
    import json

    fits: list[str] = []
    verdict: dict[tuple[str, str], bool] = {}
    for name, spec in ENCODERS.items():
        if name == exclude or name.startswith("test_") or spec.embed_dim == 0:
            continue
        key = (spec.arch, json.dumps(spec.timm_kwargs, sort_keys=True, default=str), spec.family)
        if key not in verdict:
            try:
                with torch.device("meta"):
                    trunk = create_trunk(spec)
                    _, missing, bad_shape, stray, _ = _fit(trunk, dict(sd), "", spec)
                verdict[key] = not (missing or bad_shape or stray)
            except Exception:  # noqa: BLE001 - an architecture that cannot take them is no suggestion
                verdict[key] = False
        if verdict[key]:
            fits.append(name)
    return fits[:limit]


def _resampled_pos_embed(pos: torch.Tensor, own_pos: torch.Tensor, trunk: nn.Module, source: str,
                         spec: EncoderSpec) -> torch.Tensor:
    """A checkpoint's ViT position embedding resampled to the trunk's patch grid. The prefix tokens (class, registers)
    that have positions are counted off the trunk's own embedding: a ``no_embed_class`` ViT (e.g. DINOv2 with
    registers) keeps none, so its whole embedding is the grid. A checkpoint whose embedding is not a square grid plus
    those prefix positions is one line naming the file."""
    import math

    from timm.layers import resample_abs_pos_embed

    gs = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
    if gs is None or pos.ndim != 3 or own_pos.ndim != 3 or pos.shape[-1] != own_pos.shape[-1]:
        return pos  # the shape check of the caller names it
    n_prefix = int(own_pos.shape[1]) - int(gs[0]) * int(gs[1])
    n_grid = int(pos.shape[1]) - n_prefix
    side = math.isqrt(n_grid) if n_grid > 0 else 0
    if n_prefix < 0 or side * side != n_grid:
        raise GigaslideError(
            f"weights do not fit encoder '{spec.name}' ({spec.arch}): their position embedding has {pos.shape[1]} "
            f"positions, not a square grid plus the {max(n_prefix, 0)} prefix position(s) of this model "
            "(weights of a variant with other class / register tokens?)",
            path=source, fix="pick the --encoder these weights were trained for (see `gigaslide encoders`)")
    return resample_abs_pos_embed(pos, new_size=[int(gs[0]), int(gs[1])], old_size=[side, side],
                                  num_prefix_tokens=n_prefix)


def assignable(trunk: nn.Module) -> bool:
    """Every tensor of ``trunk`` is in its state dict (no non-persistent buffers), so a trunk made on the meta device
    is complete once a checkpoint is assigned into it."""
    return set(dict(trunk.named_parameters())) | set(dict(trunk.named_buffers())) <= set(trunk.state_dict())


def _spec_from_export(folder: Path) -> EncoderSpec:
    """The export's spec; one a newer gigaslide wrote (its provenance's ``format_version``) is refused: keys this
    version does not know were dropped without a word, and the encoder ran as something else."""
    try:
        d = json.loads((folder / EXPORT_SPEC).read_text())
        rec = d.get("provenance") if isinstance(d, dict) else None
        check_format(rec if isinstance(rec, dict) else d if isinstance(d, dict) else {}, folder / EXPORT_SPEC)
        return EncoderSpec.from_dict(d)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise GigaslideError(f"bad encoder export ({e})", path=folder / EXPORT_SPEC, fix="re-export the encoder") from None


def build_encoder(name: str, weights: str | None = "default", *, seed: int = 0) -> Encoder:
    """An :class:`Encoder` in eval mode.

    ``name``: a registry name (``gigaslide encoders``) or a folder exported by :func:`export_encoder`
    (e.g. ``RUN_DIR/encoder``; a run folder ``RUN_DIR`` holding one is read as it). ``weights``: ``"default"``
    (the export's own weights, or the entry's hub weights from the local cache), ``"random"`` (tests and benchmarks
    only: the features mean nothing), or a path to ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` (a downloaded
    model folder: its weights file, :func:`~gigaslide.encoders.weights.weights_file`).
    """
    folder = Path(name)
    if not (folder / EXPORT_SPEC).is_file() and (folder / "encoder" / EXPORT_SPEC).is_file():
        folder = folder / "encoder"  # a pretrain run folder: its export, as pretrain --init reads RUN_DIR
    if (folder / EXPORT_SPEC).is_file():
        spec = _spec_from_export(folder)
        if weights in (None, "default"):
            weights = str(folder / EXPORT_WEIGHTS)
    elif os.sep in name or name.endswith((".json",)):
        raise GigaslideError("not an encoder export folder (no encoder.json)", path=name,
                             fix="pass a registry name (see `gigaslide encoders`) or RUN_DIR/encoder")
    else:
        spec = ENCODERS.get(name)
    path = None  # found before the trunk is made: a missing file is an error at once, not after building a 1B model
    if weights in (None, "default"):
        if not spec.hub:
            raise GigaslideError(f"encoder '{spec.name}' has no default weights", fix="pass --weights PATH or --weights random")
        path = resolve_hub_weights(spec.hub)
    elif weights != "random":
        path = weights_file(weights)  # a folder of a hub download: its weights file
    sd = None if path is None else read_state_dict(path)
    with isolated_rng(seed):  # the trunk's random init from ``seed``; the caller's streams are left as they were
        trunk = None
        if sd is not None:  # made on the meta device and the checkpoint assigned: no random init (~10 s and a second
            with torch.device("meta"):  # copy of the weights for a 1B-parameter ViT)
                meta = create_trunk(spec)
            if assignable(meta):
                load_weights_into(meta, sd, str(path), spec, assign=True)
                trunk = meta
        if trunk is None:
            trunk = create_trunk(spec)
            if sd is not None:
                load_weights_into(trunk, sd, str(path), spec)
        del sd
        if spec.embed_dim == 0:  # tiny test architectures: read the size off the model
            spec = with_embed_dim(spec, trunk)
    weights_id = f"random-seed{seed}" if path is None else "sha256:" + file_sha256(path)
    enc = Encoder(spec, trunk, weights_id).eval()
    return enc


def trunk_width(trunk: nn.Module, input_size: int) -> int:
    """Width of the trunk's own output (``num_features``, else read off one forward pass)."""
    dim = int(getattr(trunk, "num_features", 0) or 0)
    if not dim:
        with torch.no_grad():
            dim = int(trunk(torch.zeros(1, 3, input_size, input_size)).shape[-1])
    return dim


def with_embed_dim(spec: EncoderSpec, trunk: nn.Module) -> EncoderSpec:
    """``spec`` with the embedding size the encoder gives with this trunk: the trunk's width, twice it for
    ``pool="cls_mean"``."""
    import dataclasses

    return dataclasses.replace(spec, embed_dim=trunk_width(trunk, spec.input_size) * (2 if spec.pool == "cls_mean" else 1))


def export_encoder(folder: str | os.PathLike, trunk: nn.Module, spec: EncoderSpec,
                   provenance: dict | None = None) -> Path:
    """Write ``folder/encoder.json`` + ``folder/weights.safetensors`` so ``build_encoder(folder)`` loads it.

    ``provenance`` (optional, e.g. ``Provenance(...).to_dict()``: version, seed, run folder, steps) is stored
    under ``"provenance"`` in ``encoder.json``, where :func:`gigaslide.provenance.read_provenance` finds it.
    """
    from safetensors.torch import save_file

    folder = atomic.ensure_writable_dir(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in trunk.state_dict().items()}
    with atomic.atomic_path(folder / EXPORT_WEIGHTS, suffix=".safetensors") as tmp:
        # one metadata key: safetensors writes its metadata in hash-map order, which changes from call to call, so
        # with several keys identical weights got other bytes -- another weights sha256 (the name and architecture
        # are in encoder.json)
        save_file(sd, str(tmp), metadata={"format": "pt"})
    if provenance is None:
        atomic.write_text(folder / EXPORT_SPEC, spec.to_json())
    else:
        atomic.write_text(folder / EXPORT_SPEC, json.dumps({**json.loads(spec.to_json()), "provenance": provenance},
                                                           indent=2, default=str))
    return folder

"""Pre-training options, the methods' recipe defaults, and what a run's identity is.

A field left ``None`` is filled, in this order, from the method's ``recipe`` (a class attribute of
:class:`~gigaslide.ssl.tile.methods.SSLMethod`: defaults for :class:`PretrainConfig` fields, plus
``method_args`` merged under the user's), then from :data:`DEFAULTS` and the rules of
:func:`resolve_config` (layer decay for a continued ViT, training crop size). The resolved values are
what the run records and what its identity holds, so a re-run with other effective settings is refused.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError
from gigaslide.tiling.tissue import check_background

ENGINES = ("auto", "native", "lightning")
#: Longest --budget a run plans for (a year); above it the step plan overflowed (``--budget 1e308``).
MAX_BUDGET_S = 365 * 86400.0
#: µm/px slides are sampled at without --mpp. A tile folder without --mpp has no known µm/px: its export records
#: none (it was recorded as this default, and `encode --encoder RUN/encoder` then tiled slides at it as the
#: encoder's own resolution).
DEFAULT_SLIDE_MPP = 0.5
#: Coarsest --mpp (µm/px): a 224-px tile at it spans 2.24 cm, wider than a slide.
MAX_MPP = 100.0

#: Fallbacks for fields neither the user nor the method's recipe set. Not tuned: the values of the
#: papers' recipes that fit a single device (batch 64, AdamW weight decay 0.04, 5 % warm-up).
DEFAULTS: dict[str, Any] = {"batch_size": 64, "weight_decay": 0.04, "warmup_frac": 0.05, "n_local": 6,
                            "patch_embed_lr_mult": 1.0, "drop_path": 0.0}


@dataclass
class PretrainConfig:
    data: str
    out: str
    method: str = "dino"
    backbone: str = "resnet18"
    mpp: list[float] | None = None  # slides: sampled at these (None: [DEFAULT_SLIDE_MPP]); tile folders: recorded
    tile_size: int = 224  # the tiles' native size: the exported encoder's input size
    crop_size: int | None = None  # global training crop (None: tile_size for ViTs, ~2/3 of it for CNNs)
    init: str | None = None
    steps: int | None = None
    budget_s: float | None = None
    augment: str = "pathology"
    batch_size: int | None = None
    lr: float | None = None  # None: the method's recipe / default_lr
    weight_decay: float | None = None
    warmup_frac: float | None = None
    layer_decay: float | None = None  # None: 0.75 for a ViT with --init, else 1 (off)
    patch_embed_lr_mult: float | None = None  # lr multiplier of a ViT's patch embedding
    drop_path: float | None = None  # timm drop_path_rate of a ViT trunk
    n_local: int | None = None
    local_size: int | None = None
    local_scale: tuple[float, float] | None = None
    global_scale: tuple[float, float] | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None  # data-loader worker processes (None: gigaslide.devices.loader_workers)
    seed: int = 0
    devices: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (gigaslide.devices.choose_precision)
    checkpoint_every_s: float = 600.0
    min_tissue: float = 0.5
    data_kind: str = "auto"
    slide_mpp: float | str | None = None  # level-0 µm/px (or a CSV slide_id,mpp) for slides whose files lack it
    background: str = "auto"  # slides' background: auto (detected), bright (glass) or dark (fluorescence)
    log_every: int = 10
    monitor_every: int | None = None  # steps between label-free monitor points (None: ~8 per run, 0: off)
    monitor_size: int = 128  # tiles of the monitor set
    # native-size tiles to re-estimate the export's BatchNorm statistics on (0: keep the trained statistics). Off by
    # default: on PCam (bench_tile_ssl.py, 15 min per method, 64 px crops embedded at 96 px) the re-estimate never
    # helped the linear probe and hurt MoCo v2 and Barlow Twins.
    export_bn_tiles: int = 0
    engine: str = "auto"  # auto (lightning when devices > 1) | native | lightning
    stop_after_steps: int | None = None  # stop this invocation after N steps, as if interrupted (tests, chunked jobs)


#: Fields that do not change what is learned (or are fingerprinted as inputs instead of compared as values).
NOT_IDENTITY = ("data", "out", "init", "steps", "budget_s", "workers", "precision", "checkpoint_every_s", "log_every",
                "monitor_every", "monitor_size", "export_bn_tiles", "engine", "stop_after_steps")


def check_config(cfg: PretrainConfig) -> None:
    if cfg.steps is None and cfg.budget_s is None:
        raise GigaslideError("give --steps N or --budget (e.g. 2h, 15m)", fix="add --steps 1000 or --budget 2h")
    if cfg.steps is not None and cfg.steps < 1:
        raise GigaslideError(f"--steps {cfg.steps} must be at least 1")
    if cfg.budget_s is not None and cfg.budget_s <= 0:
        raise GigaslideError(f"--budget {cfg.budget_s}s must be positive")
    if cfg.batch_size is not None and cfg.batch_size < 2:
        raise GigaslideError(f"--batch-size {cfg.batch_size} must be at least 2 (contrastive losses need pairs)")
    if cfg.tile_size < 16:
        raise GigaslideError(f"--tile-size {cfg.tile_size} is too small", fix="use 32 px or more")
    if cfg.crop_size is not None and not 16 <= cfg.crop_size <= cfg.tile_size:
        raise GigaslideError(f"--crop-size {cfg.crop_size} must be between 16 and --tile-size {cfg.tile_size}")
    if cfg.engine not in ENGINES:
        raise GigaslideError(f"unknown engine '{cfg.engine}'", fix=f"use {', '.join(ENGINES)}")
    if cfg.devices < 1:
        raise GigaslideError(f"--devices {cfg.devices} must be at least 1")
    check_numbers(cfg)
    check_background(cfg.background)


#: (field, flag, lowest, highest, lowest allowed itself, example) of the float options; None: no bound on that side.
_FLOAT_RANGES = (("lr", "--lr", 0.0, None, False, "0.001"), ("weight_decay", "--weight-decay", 0.0, None, True, "0.04"),
                 ("warmup_frac", "--warmup-frac", 0.0, 1.0, True, "0.05"),
                 ("layer_decay", "--layer-decay", 0.0, 1.0, False, "0.75"),
                 ("patch_embed_lr_mult", "--patch-embed-lr-mult", 0.0, None, True, "1"),
                 ("drop_path", "--drop-path", 0.0, 1.0, True, "0.1"),
                 ("min_tissue", "--min-tissue", 0.0, 1.0, True, "0.5"),
                 ("checkpoint_every_s", "--checkpoint-every (seconds)", 0.0, None, True, "600"),
                 ("budget_s", "--budget (seconds)", 0.0, MAX_BUDGET_S, False, "7200"))


def check_numbers(cfg: PretrainConfig) -> None:
    """One line for a number no run can use (NaN, inf, 1e308, a negative rate, a seed torch cannot take), before
    any work: from a config file or the Python API they reached the optimiser or the step plan as a bare
    ``ValueError`` / ``OverflowError``, or trained (``layer_decay: .nan``) without a word."""
    def bad(flag: str, v: Any, why: str, example: str) -> GigaslideError:
        return GigaslideError(f"{flag} {v!r} {why}", fix=f"use e.g. {flag.split()[0]} {example}")

    for name, flag, lo, hi, lo_ok, example in _FLOAT_RANGES:
        v = getattr(cfg, name)
        if v is None:
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise bad(flag, v, "is not a number", example) from None
        if not math.isfinite(f):
            raise bad(flag, v, "is not a finite number", example)
        if (f < lo if lo_ok else f <= lo) or (hi is not None and f > hi):
            where = f"{'at least' if lo_ok else 'above'} {lo:g}" + ("" if hi is None else f" and at most {hi:g}")
            raise bad(flag, v, f"must be {where}", example)
    for m in cfg.mpp or []:
        try:
            ok = math.isfinite(float(m)) and 0 < float(m) <= MAX_MPP
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise bad("--mpp", m, f"must be a positive µm/px value of at most {MAX_MPP:g}", "0.5")
    try:
        seed = None if isinstance(cfg.seed, bool) else operator.index(cfg.seed)
    except TypeError:
        seed = None
    if seed is None or not 0 <= seed < 2**63:
        raise bad("--seed", cfg.seed, "must be a whole number from 0 to 2**63 - 1", "0")
    for name in ("n_local", "monitor_size", "export_bn_tiles"):
        v = getattr(cfg, name)
        if v is not None and v < 0:
            raise bad(f"--{name.replace('_', '-')}", v, "must not be negative", "0")
    if cfg.local_size is not None:
        top = cfg.crop_size or cfg.tile_size
        if not 8 <= cfg.local_size <= top:
            raise bad("--local-size", cfg.local_size, f"must be between 8 and the crop size {top}", str(min(top, 96)))


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def resolve_config(cfg: PretrainConfig, method_cls: type, family: str, patch: int | None = None) -> PretrainConfig:
    """``cfg`` with every ``None`` filled (user > method recipe > :data:`DEFAULTS` / rules)."""
    recipe = dict(getattr(method_cls, "recipe", {}) or {})
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = set(recipe) - names
    if unknown:
        raise GigaslideError(f"{method_cls.__name__}.recipe has unknown keys {sorted(unknown)}",
                             fix=f"use PretrainConfig fields: {', '.join(sorted(names))}")
    upd: dict[str, Any] = {}
    for k, v in recipe.items():
        if k == "method_args":
            upd[k] = {**v, **cfg.method_args}
        elif getattr(cfg, k) is None:
            upd[k] = v
    for k, v in DEFAULTS.items():
        if getattr(cfg, k) is None and k not in upd:
            upd[k] = v
    if cfg.lr is None and "lr" not in upd:
        upd["lr"] = float(method_cls.default_lr)
    if cfg.layer_decay is None and "layer_decay" not in upd:
        upd["layer_decay"] = 0.75 if (cfg.init and family == "vit") else 1.0
    if cfg.crop_size is None and "crop_size" not in upd:
        # CNNs: train on ~2/3-size crops and embed at the native size (FixRes, Touvron et al. 2019: random-resized
        # crops zoom in, so testing above the training size matches apparent object size); ~2.2x the steps per budget.
        # Checked on PCam (tile_ssl.md, sections tune and crop96): full 96-px crops beat 64 px for mocov2 at 5 min,
        # not at 15 min (linear Δ -0.002 [-0.014, +0.010], 597 vs 1,055 steps), so the default stays.
        upd["crop_size"] = cfg.tile_size if family == "vit" else min(cfg.tile_size, _round_to(cfg.tile_size * 2 / 3, 8))
    for k in ("data", "out", "init"):  # a pathlib.Path from the Python API: the strings the run records and compares
        if getattr(cfg, k) is not None:
            upd[k] = os.fspath(getattr(cfg, k))
    for k in ("local_scale", "global_scale"):
        v = upd.get(k, getattr(cfg, k))
        if v is not None:
            upd[k] = tuple(float(x) for x in v)
    out = dataclasses.replace(cfg, **upd)
    check_config(out)
    return out


def identity(cfg: PretrainConfig, method_hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options (resolved) that must match to resume a run; ``--data`` and ``--init`` files join as inputs.

    ``method_hparams`` (the method class's defaults) joins as ``method_hparams``, merged under ``method_args``,
    so a run made when a method's defaults were other values is not resumed under the new ones."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}
    if method_hparams is not None:  # the effective settings, however they were given
        d["method_hparams"] = method_settings(cfg, method_hparams)
        del d["method_args"]
    if cfg.init and not init_file(cfg.init):
        d["init"] = cfg.init  # a registry name / hub id: compared by value
    if d.get("mpp") is None:
        d["mpp"] = [DEFAULT_SLIDE_MPP]  # runs made when a tile folder's mpp defaulted to it resume unchanged
    if d.get("slide_mpp") is None:
        d.pop("slide_mpp", None)  # runs made before --slide-mpp existed resume unchanged
    if d.get("background") == "auto":
        d.pop("background", None)  # and those made before --background existed (they detected it: auto)
    return d


def method_settings(cfg: PretrainConfig, method_hparams: dict[str, Any]) -> dict[str, Any]:
    """Every setting the method runs with: its class defaults under the resolved ``method_args``."""
    return {**method_hparams, **cfg.method_args}


def init_file(init: str | None) -> Path | None:
    """The weights file behind ``--init`` (a file, an export folder, a run folder), or None (a registry name)."""
    if not init:
        return None
    p = Path(init)
    if p.is_file():
        return p
    for cand in (p / "weights.safetensors", p / "encoder" / "weights.safetensors", p / "model.safetensors",
                 p / "pytorch_model.bin"):
        if cand.is_file():
            return cand
    return None


def config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["data"] = os.fspath(cfg.data)
    return d


__all__ = ["DEFAULTS", "ENGINES", "MAX_BUDGET_S", "MAX_MPP", "PretrainConfig", "check_config", "check_numbers",
           "config_dict", "identity", "init_file", "method_settings", "resolve_config"]

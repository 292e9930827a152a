"""The pre-training loop: CPU or one CUDA device (AMP), ``--steps`` and/or a wall-clock ``--budget``.

Progress (for the cosine LR, momentum and temperature schedules) is ``max(step / steps,
elapsed / budget)``, so a budget-only run anneals over its budget. The run stops cleanly at the
budget, on Ctrl-C or SIGTERM: it writes a checkpoint and exports ``RUN_DIR/encoder`` (loadable by
``build_encoder`` / ``gigaslide encode --encoder RUN_DIR/encoder``). Re-running the same command
resumes from ``RUN_DIR/checkpoint`` exactly where it stopped. ``devices > 1`` goes through
PyTorch Lightning DDP (:mod:`gigaslide.ssl.tile.lightning`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gigaslide import atomic
from gigaslide.artifacts import provenance
from gigaslide.devices import autocast_ctx
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.ssl.tile import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    data: str
    out: str
    method: str = "dino"
    backbone: str = "resnet18"
    mpp: list[float] = field(default_factory=lambda: [0.5])
    tile_size: int = 224
    init: str | None = None
    steps: int | None = None
    budget_s: float | None = None
    augment: str = "pathology"
    batch_size: int = 64
    lr: float | None = None  # None: the method's default
    weight_decay: float = 0.04
    warmup_frac: float = 0.05
    layer_decay: float | None = None  # None: 0.75 for a ViT with --init, else 1 (off)
    n_local: int = 6
    method_args: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    seed: int = 0
    devices: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    checkpoint_every_s: float = 600.0
    min_tissue: float = 0.5
    data_kind: str = "auto"
    log_every: int = 10
    engine: str = "auto"  # auto (lightning when devices > 1) | native | lightning
    stop_after_steps: int | None = None  # stop this invocation after N steps, as if interrupted (tests, chunked jobs)

    def identity(self) -> dict[str, Any]:
        """Options that must match to resume a run."""
        return {k: getattr(self, k) for k in ("method", "backbone", "tile_size", "augment", "batch_size", "n_local", "method_args", "seed")}


def _check(cfg: PretrainConfig) -> None:
    if cfg.steps is None and cfg.budget_s is None:
        raise GigaslideError("give --steps N or --budget (e.g. 2h, 15m)", fix="add --steps 1000 or --budget 2h")
    if cfg.steps is not None and cfg.steps < 1:
        raise GigaslideError(f"--steps {cfg.steps} must be at least 1")
    if cfg.budget_s is not None and cfg.budget_s <= 0:
        raise GigaslideError(f"--budget {cfg.budget_s}s must be positive")
    if cfg.batch_size < 2:
        raise GigaslideError(f"--batch-size {cfg.batch_size} must be at least 2 (contrastive losses need pairs)")
    if cfg.tile_size < 16:
        raise GigaslideError(f"--tile-size {cfg.tile_size} is too small", fix="use 32 px or more")


def build_model(cfg: PretrainConfig):  # noqa: ANN201
    """(method module, export spec, init source or None)."""
    from gigaslide.encoders import create_trunk
    from gigaslide.ssl.tile.init import load_init, run_spec, with_embed_dim
    from gigaslide.ssl.tile.methods import SSL_METHODS

    cls = SSL_METHODS.get(cfg.method)
    spec = run_spec(cfg.backbone, cfg.method, cfg.tile_size, cfg.mpp, cfg.augment)
    torch.manual_seed(cfg.seed)
    trunk = create_trunk(spec)
    spec = with_embed_dim(spec, trunk)
    source = load_init(trunk, spec, cfg.init, cfg.backbone) if cfg.init else None
    model = cls(trunk, spec.embed_dim, spec.mean, spec.std, channels_last=spec.family == "cnn", **cfg.method_args)
    if spec.family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    return model, spec, source


def param_groups(model, cfg: PretrainConfig, family: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """Trunk groups (layer-wise lr decay for ViTs continued from --init; no decay on norms/biases) + heads."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    ld = cfg.layer_decay if cfg.layer_decay is not None else (0.75 if (cfg.init and family == "vit") else 1.0)
    trunk = model.backbone
    if ld < 1.0 and hasattr(trunk, "group_matcher"):
        groups = param_groups_layer_decay(trunk, weight_decay=cfg.weight_decay, layer_decay=ld)
    else:
        groups = param_groups_weight_decay(trunk, weight_decay=cfg.weight_decay)
    heads = model.head_parameters()
    decay = [p for p in heads if p.ndim > 1]
    no_decay = [p for p in heads if p.ndim <= 1]
    groups = [dict(g) for g in groups] + [{"params": decay, "weight_decay": cfg.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return [g for g in groups if g["params"]]


def lr_at(progress: float, base: float, warmup: float) -> float:
    if progress < warmup:
        return base * progress / warmup
    p = (progress - warmup) / max(1e-8, 1 - warmup)
    return base * (0.5 * (1 + math.cos(math.pi * min(p, 1.0))) * 0.99 + 0.01)


class _Stop:
    """Turns SIGTERM into a clean stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Stop:
        with contextlib.suppress(ValueError):  # not the main thread
            self._old = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) a run in ``cfg.out``; returns the run summary written to ``run.json``."""
    _check(cfg)
    if cfg.engine not in ("auto", "native", "lightning"):
        raise GigaslideError(f"unknown engine '{cfg.engine}'", fix="use auto, native or lightning")
    if cfg.engine == "lightning" or (cfg.engine == "auto" and cfg.devices > 1):
        from gigaslide.ssl.tile.lightning import pretrain_lightning

        return pretrain_lightning(cfg)
    from gigaslide.encoders import export_encoder
    from gigaslide.ssl.tile.augment import MultiView, view_recipes
    from gigaslide.ssl.tile.data import StepSampler, ViewDataset, build_source, make_loader

    out = atomic.ensure_writable_dir(cfg.out)
    atomic.clean_stale_tmp(out)
    atomic.clean_stale_tmp(ckpt.checkpoint_dir(out))
    prev = ckpt.read_state(out)
    if prev is not None and prev.get("identity") != _jsonable(cfg.identity()):
        raise GigaslideError(f"this run folder holds another run ({prev.get('identity')})", path=out,
                             fix="re-run with the same options to resume, or choose a new --out")
    if prev is not None and cfg.init:
        log.info("resuming %s: --init is ignored (the checkpoint already holds the weights)", out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec, init_source = build_model(dataclasses.replace(cfg, init=None) if prev else cfg)
    model.to(device)
    groups = param_groups(model, cfg, spec.family)
    base_lr = cfg.lr if cfg.lr is not None else model.default_lr
    opt = torch.optim.AdamW(groups, lr=base_lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")
    step, elapsed, history, images = 0, 0.0, [], 0
    if prev is not None:
        state, opt_state = ckpt.load_checkpoint(out, model)
        opt.load_state_dict(opt_state["optimizer"])
        if "scaler" in opt_state:
            scaler.load_state_dict(opt_state["scaler"])
        step, elapsed, history, images = state["step"], state["elapsed_s"], state.get("history", []), state.get("images", 0)
        init_source = state.get("init")
    source = build_source(cfg.data, cfg.mpp, cfg.tile_size, cfg.min_tissue, cfg.data_kind)
    multiple = spec.timm_kwargs.get("patch_size", 16) if spec.family == "vit" else 8
    views = MultiView(view_recipes(model.view_kind, cfg.augment, cfg.tile_size, cfg.n_local, multiple))
    dataset = ViewDataset(source, views, cfg.tile_size)
    remaining = None if cfg.steps is None else max(0, cfg.steps - step)
    loader = make_loader(dataset, StepSampler(len(dataset), cfg.batch_size, cfg.seed, step, remaining), cfg.workers)

    def progress_of(s: int, t: float) -> float:
        return max(s / cfg.steps if cfg.steps else 0.0, t / cfg.budget_s if cfg.budget_s else 0.0)

    def snapshot(reason: str) -> None:
        state = {"step": step, "elapsed_s": elapsed, "images": images, "history": history[-2000:], "reason": reason,
                 "identity": _jsonable(cfg.identity()), "config": _jsonable(dataclasses.asdict(cfg)),
                 "spec": json_spec(spec), "init": init_source, "export_prefix": _export_prefix(model),
                 **provenance(kind="ssl_checkpoint", seed=cfg.seed)}
        ckpt.save_checkpoint(out, model, {"optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, state)

    model.train()
    reason = "steps"
    t_ckpt = time.monotonic()
    done = (cfg.steps is not None and step >= cfg.steps) or (cfg.budget_s is not None and elapsed >= cfg.budget_s)
    images_this_run, t_run = 0, 0.0
    loss = None
    try:
        with _Stop() as stop:
            it = iter(loader) if not done else iter(())
            t0 = time.monotonic()
            for batch in it:
                batch = [v.to(device, non_blocking=True) for v in batch]
                progress = progress_of(step, elapsed)
                for g in opt.param_groups:
                    g["lr"] = lr_at(progress, base_lr, cfg.warmup_frac) * g["lr_scale"]
                with autocast_ctx(device, cfg.precision):
                    loss = model.loss(batch, step, progress)
                check_finite_loss(loss, f"step {step}", out)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
                model.before_optimizer_step(step)
                scaler.step(opt)
                scaler.update()
                model.after_step(progress)
                step += 1
                n_img = batch[0].shape[0]
                images += n_img
                images_this_run += n_img
                now = time.monotonic()
                elapsed += now - t0
                t_run += now - t0
                t0 = now
                if step % cfg.log_every == 0 or step == 1:
                    history.append({"step": step, "loss": round(float(loss.item()), 5), "lr": opt.param_groups[0]["lr"],
                                    "elapsed_s": round(elapsed, 2)})
                    log.info("step %d loss %.4f (%.1f img/s)", step, loss.item(), images_this_run / max(t_run, 1e-9))
                if cfg.budget_s is not None and elapsed >= cfg.budget_s:
                    reason = "budget"
                    break
                if stop.requested:
                    reason = "signal"
                    break
                if cfg.stop_after_steps is not None and images_this_run >= cfg.stop_after_steps * cfg.batch_size:
                    reason = "stop_after_steps"
                    break
                if now - t_ckpt >= cfg.checkpoint_every_s:
                    snapshot("periodic")
                    t_ckpt = time.monotonic()
                    t0 = time.monotonic()  # checkpoint time does not count as training
    except KeyboardInterrupt:
        snapshot("interrupted")
        raise
    if not history or history[-1]["step"] != step:
        history.append({"step": step, "loss": round(float(loss.item()), 5) if loss is not None else None,
                        "elapsed_s": round(elapsed, 2)})
    snapshot(reason)
    export_encoder(out / "encoder", model.export_trunk(), spec)
    summary = {"run": str(out), "method": cfg.method, "backbone": cfg.backbone, "steps": step, "stopped_by": reason,
               "elapsed_s": round(elapsed, 1), "images": images,
               "images_per_s": round(images_this_run / t_run, 2) if t_run > 0 else None,
               "device": _device_name(device), "precision": cfg.precision, "init": init_source,
               "data": source.describe(), "encoder": str(out / "encoder"), "final_loss": history[-1].get("loss"),
               "first_loss": history[0].get("loss") if history else None, **provenance(kind="ssl_run", seed=cfg.seed)}
    atomic.write_json(out / "run.json", summary)
    return summary


def _export_prefix(model) -> str:  # noqa: ANN001
    trunk = model.export_trunk()
    for name, mod in model.named_children():
        if mod is trunk:
            return name + "."
    return "backbone."


def json_spec(spec) -> dict[str, Any]:  # noqa: ANN001
    return json_loads(spec.to_json())


def json_loads(s: str) -> Any:
    import json

    return json.loads(s)


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"

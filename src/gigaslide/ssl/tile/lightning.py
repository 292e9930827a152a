"""``--devices N``: the same method, data and checkpoints, driven by PyTorch Lightning (DDP, AMP).

One thin :class:`SSLModule`; everything else (views, sampler, schedules, checkpoint format,
export) is shared with :mod:`gigaslide.ssl.tile.train`. Each rank draws its own slice of every
step's global batch from :class:`~gigaslide.ssl.tile.data.StepSampler`; rank 0 writes the
checkpoint (same pickle-free format, so single-process runs can resume it and vice versa) and the
export. Lightning's own ``.ckpt`` files are not written.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile import checkpoint as ckpt
from gigaslide.ssl.tile.train import PretrainConfig, _export_prefix, build_model, json_spec, lr_at, param_groups


def _module_class():  # noqa: ANN202
    import pytorch_lightning as pl

    class SSLModule(pl.LightningModule):
        def __init__(self, model: torch.nn.Module, cfg: PretrainConfig, family: str, start_step: int, elapsed: float):
            super().__init__()
            self.model, self.cfg, self.family = model, cfg, family
            self.start_step, self.elapsed0, self.t0 = start_step, elapsed, None
            self.base_lr = cfg.lr if cfg.lr is not None else model.default_lr
            self.opt_state: dict | None = None

        def progress(self, step: int) -> float:
            el = self.elapsed0 + (time.monotonic() - self.t0 if self.t0 else 0.0)
            return max(step / self.cfg.steps if self.cfg.steps else 0.0, el / self.cfg.budget_s if self.cfg.budget_s else 0.0)

        def on_train_start(self) -> None:
            self.t0 = time.monotonic()
            self.model.prepare_distributed()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            step = self.start_step + batch_idx
            p = self.progress(step)
            for g in self.optimizers().param_groups:
                g["lr"] = lr_at(p, self.base_lr, self.cfg.warmup_frac) * g["lr_scale"]
            loss = self.model.loss(batch, step, p)
            self.log("loss", loss, prog_bar=True, sync_dist=False)
            return loss

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.model.before_optimizer_step(self.start_step + self.global_step)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.model.after_step(self.progress(self.start_step + batch_idx))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            opt = torch.optim.AdamW(param_groups(self.model, self.cfg, self.family), lr=self.base_lr,
                                    weight_decay=self.cfg.weight_decay)
            if self.opt_state is not None:
                opt.load_state_dict(self.opt_state)
            return opt

    return SSLModule


def pretrain_lightning(cfg: PretrainConfig) -> dict[str, Any]:
    """DDP pre-training over ``cfg.devices`` GPUs (or CPU processes when no GPU is present)."""
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover
        raise GigaslideError("--devices > 1 needs pytorch-lightning", fix="pip install pytorch-lightning") from None
    from gigaslide.encoders import export_encoder
    from gigaslide.ssl.tile.augment import MultiView, view_recipes
    from gigaslide.ssl.tile.data import StepSampler, ViewDataset, build_source, make_loader

    out = atomic.ensure_writable_dir(cfg.out)
    prev = ckpt.read_state(out)
    if prev is not None and prev.get("identity") != json_loads_identity(cfg):
        raise GigaslideError(f"this run folder holds another run ({prev.get('identity')})", path=out,
                             fix="re-run with the same options to resume, or choose a new --out")
    model, spec, init_source = build_model(dataclasses.replace(cfg, init=None) if prev else cfg)
    step, elapsed, opt_state = 0, 0.0, None
    if prev is not None:
        state, opt = ckpt.load_checkpoint(out, model)
        step, elapsed, opt_state, init_source = state["step"], state["elapsed_s"], opt["optimizer"], state.get("init")
    cuda = torch.cuda.is_available()
    precision = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}.get(cfg.precision, "bf16-mixed" if cuda else "32-true")
    remaining = None if cfg.steps is None else max(0, cfg.steps - step)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=cfg.devices, strategy="ddp_find_unused_parameters_true" if cfg.devices > 1 else "auto",
                         precision=precision, max_steps=remaining if remaining is not None else -1,
                         max_time={"seconds": max(1.0, cfg.budget_s - elapsed)} if cfg.budget_s else None,
                         gradient_clip_val=3.0, enable_checkpointing=False, logger=False, use_distributed_sampler=False,
                         enable_model_summary=False, log_every_n_steps=cfg.log_every)
    module = _module_class()(model, cfg, spec.family, step, elapsed)
    module.opt_state = opt_state
    source = build_source(cfg.data, cfg.mpp, cfg.tile_size, cfg.min_tissue, cfg.data_kind)
    multiple = 16 if spec.family == "vit" else 8
    views = MultiView(view_recipes(model.view_kind, cfg.augment, cfg.tile_size, cfg.n_local, multiple))
    sampler = StepSampler(len(source), cfg.batch_size, cfg.seed, step, remaining,
                          rank=trainer.global_rank, world_size=trainer.world_size)
    loader = make_loader(ViewDataset(source, views, cfg.tile_size), sampler, cfg.workers)
    t0 = time.monotonic()
    trainer.fit(module, loader)
    dt = time.monotonic() - t0
    step += trainer.global_step
    elapsed += dt
    summary = {"run": str(out), "method": cfg.method, "backbone": cfg.backbone, "steps": step, "elapsed_s": round(elapsed, 1),
               "images_per_s": round(trainer.global_step * cfg.batch_size * trainer.world_size / dt, 2) if dt else None,
               "devices": trainer.world_size, "precision": precision, "engine": "pytorch-lightning", "init": init_source}
    if trainer.is_global_zero:
        model = module.model.cpu()
        state = {"step": step, "elapsed_s": elapsed, "images": step * cfg.batch_size * trainer.world_size,
                 "identity": json_loads_identity(cfg), "config": json_loads_identity(cfg, full=True),
                 "spec": json_spec(spec), "init": init_source, "reason": "lightning", "export_prefix": _export_prefix(model)}
        ckpt.save_checkpoint(out, model, {"optimizer": trainer.optimizers[0].state_dict()}, state)
        export_encoder(out / "encoder", model.export_trunk(), spec)
        atomic.write_json(out / "run.json", summary)
    return summary


def json_loads_identity(cfg: PretrainConfig, full: bool = False) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg) if full else cfg.identity(), default=str))

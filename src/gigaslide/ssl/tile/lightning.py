"""``--devices N``: the same run driven by PyTorch Lightning (DDP), as a thin wrapper.

Everything but the process launch and gradient all-reduce is the native engine's: the run is opened
by :func:`~gigaslide.ssl.tile.session.open_session` (same run folder, identity, checkpoint format,
precision policy, monitor and export), and each step is :func:`~gigaslide.ssl.tile.step.train_step`
under Lightning's manual optimisation (``manual_backward``; Lightning runs in ``32-true`` and the
run's own autocast applies). Each rank draws its slice of every step's global batch from
:class:`~gigaslide.ssl.tile.data.StepSampler`; rank 0 writes checkpoints and the export, so a
single-process run can resume a Lightning run and vice versa. A budget's step plan is measured on
rank 0 and broadcast, so every rank follows one schedule; the budget itself is Lightning's
``max_time`` (one decision for all ranks). Lightning's own ``.ckpt`` files are not written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.config import PretrainConfig, check_config
from gigaslide.ssl.tile.session import Session, open_session
from gigaslide.ssl.tile.step import StepPlan, train_step

log = logging.getLogger("gigaslide.ssl.tile")


def _module_class():  # noqa: ANN202
    import pytorch_lightning as pl  # optional heavy dependency, only for --devices > 1 / --engine lightning

    class SSLModule(pl.LightningModule):
        def __init__(self, session: Session):
            super().__init__()
            self.model = session.model
            self.session = session
            self.automatic_optimization = False
            self.local = 0
            self.images_this_run = 0
            self.train_s = 0.0
            self.t0 = self.t_ckpt = self.t_last = time.monotonic()

        def on_train_start(self) -> None:
            self.model.prepare_distributed()
            self.t0 = self.t_ckpt = self.t_last = time.monotonic()

        def on_train_epoch_start(self) -> None:
            self.session.restore_rng()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            s, cfg = self.session, self.session.cfg
            loss = train_step(self.model, batch, self.optimizers(), s.scaler, s.step, s.plan.progress(s.step),
                              base_lr=cfg.lr, warmup_frac=cfg.warmup_frac, device=self.device,
                              precision=s.precision.resolved, run_dir=cfg.out, backward=self.manual_backward)
            s.step, self.local = s.step + 1, self.local + 1
            n = batch[0].shape[0] * self.trainer.world_size
            s.images, self.images_this_run = s.images + n, self.images_this_run + n
            # a step's time runs from the end of the previous one (as in the native loop): the wait for its batch
            # is part of it, or a data-bound budget run plans more steps than fit and its cosine never ends
            dt = time.monotonic() - self.t_last
            self.train_s += dt
            s.elapsed = self.elapsed0 + time.monotonic() - self.t0
            s.plan.observe(self.local, dt, s.step, s.elapsed)
            if cfg.budget_s is not None and self.local in StepPlan.CALIBRATE_AT:
                s.plan.planned = int(self.trainer.strategy.broadcast(s.plan.planned, src=0))  # one schedule for all
            if s.run is not None:
                if s.step % cfg.log_every == 0 or self.local == 1:
                    s.history.append({"step": s.step, "loss": round(float(loss), 5),
                                      "lr": self.optimizers().param_groups[0]["lr"], "elapsed_s": round(s.elapsed, 2)})
                if s.monitor_due():
                    s.run_monitor()
                if time.monotonic() - self.t_ckpt >= cfg.checkpoint_every_s:
                    s.save("periodic")
                    self.t_ckpt = time.monotonic()
            self.log("loss", loss, prog_bar=True, sync_dist=False)
            self.t_last = time.monotonic()  # monitor points and checkpoints stay out of the step time, as natively
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.session.opt

    return SSLModule


#: The launchers' rank variables Lightning (and torchmetrics, on import) read as integers.
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")


def check_rank_variables(env: dict[str, str] | None = None) -> None:
    """A one-line error for a rank variable that is set but no whole number (``LOCAL_RANK=`` left empty by a job
    script): importing Lightning failed on it with a torchmetrics traceback."""
    e = os.environ if env is None else env
    for name in RANK_VARIABLES:
        if name in e and not e[name].strip().isdigit():
            raise GigaslideError(f"environment variable {name}={e[name]!r} is not a whole number (torchrun sets it)",
                                 fix=f"unset {name} (the engine starts its own processes for --devices), or launch "
                                     "with torchrun")


def _slurm_int(e: Mapping[str, str], name: str, default: int) -> int:
    text = e.get(name, "").split("(")[0].split(",")[0].strip()  # SLURM_NTASKS_PER_NODE may read "2(x3)" or "2,1"
    return int(text) if text.isdigit() else default


def slurm_layout(devices: int, env: Mapping[str, str] | None = None) -> tuple[bool, int]:
    """How ``--devices N`` runs inside a SLURM job: ``(own_processes, num_nodes)``.

    Lightning takes any SLURM job (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``) for processes started
    by ``srun``: a one-task job (``sbatch --gres=gpu:2`` running ``gigaslide pretrain --devices 2``) failed with a
    Lightning traceback ("devices=2 ... ntasks-per-node=1 does not match"), and a job of N tasks per node run without
    ``srun`` waited for its other ranks forever. Here a job of one task starts its ``--devices`` processes itself (as
    outside SLURM); a job of several tasks is ``srun``'s (one process per device, ``num_nodes`` from the job) when its
    tasks per node equal ``--devices``, else one line saying how to launch it. torchrun's variables win."""
    e = os.environ if env is None else env
    if "RANK" in e and "WORLD_SIZE" in e:
        return False, 1  # torchrun (or Lightning's own child processes): Lightning reads them
    if "SLURM_NTASKS" not in e or e.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return True, 1
    ntasks = _slurm_int(e, "SLURM_NTASKS", 1)
    if ntasks <= 1:
        return True, 1
    per_node = _slurm_int(e, "SLURM_NTASKS_PER_NODE", ntasks)
    if per_node != devices:
        raise GigaslideError(f"this SLURM job runs {per_node} task(s) per node (SLURM_NTASKS_PER_NODE) but --devices "
                             f"is {devices}: each srun task is one process of the run",
                             fix=f"launch `srun gigaslide pretrain --devices {per_node} ...` in a job of "
                                 f"--ntasks-per-node={per_node} (one task per GPU), or run one task (--ntasks=1) "
                                 f"with --devices {devices}")
    return False, _slurm_int(e, "SLURM_NNODES", 1)


def pretrain_lightning(cfg: PretrainConfig) -> dict[str, Any]:
    """DDP pre-training over ``cfg.devices`` GPUs (or CPU processes when no GPU is present), on its own random
    streams seeded with ``cfg.seed`` (the caller's are given back: :func:`gigaslide.runs.isolated_rng`)."""
    check_rank_variables()
    layout = slurm_layout(cfg.devices)  # a SLURM task layout this run cannot use: one line before any work
    with runs.isolated_rng(cfg.seed):
        return _pretrain_lightning(cfg, *layout)


def _pretrain_lightning(cfg: PretrainConfig, own_processes: bool, num_nodes: int) -> dict[str, Any]:
    try:
        import pytorch_lightning as pl  # optional heavy dependency
    except ImportError:  # pragma: no cover
        raise GigaslideError("--devices > 1 needs pytorch-lightning", fix="pip install pytorch-lightning") from None
    check_config(cfg)
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    s = open_session(cfg, write=rank == 0, device=device)
    cfg = s.cfg
    remaining = None if cfg.steps is None else max(0, cfg.steps - s.step)
    if cfg.stop_after_steps is not None:
        remaining = cfg.stop_after_steps if remaining is None else min(remaining, cfg.stop_after_steps)
    left_s = None if cfg.budget_s is None else max(1.0, cfg.budget_s - s.elapsed)
    if not own_processes and num_nodes * cfg.devices > 1 and "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        log.info("SLURM job of %s tasks: this process is task %s; the others must be started by srun "
                 "(`srun gigaslide pretrain ...`), or it waits for them", os.environ.get("SLURM_NTASKS"),
                 os.environ.get("SLURM_PROCID"))
    from lightning_fabric.plugins.environments import LightningEnvironment

    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=cfg.devices, num_nodes=num_nodes,
                         plugins=[LightningEnvironment()] if own_processes and cfg.devices > 1 else None,
                         strategy="ddp_find_unused_parameters_true" if cfg.devices > 1 else "auto",
                         precision="32-true", max_steps=remaining if remaining is not None else -1,
                         max_time={"seconds": left_s} if left_s else None, enable_checkpointing=False, logger=False,
                         use_distributed_sampler=False, enable_model_summary=False, enable_progress_bar=False,
                         log_every_n_steps=cfg.log_every)
    module = _module_class()(s)
    module.elapsed0 = s.elapsed
    done = (remaining == 0) or (cfg.budget_s is not None and s.elapsed >= cfg.budget_s)
    if not done:
        trainer.fit(module, s.loader(rank=trainer.global_rank, world_size=trainer.world_size))
    s.elapsed = module.elapsed0 + (time.monotonic() - module.t0 if not done else 0.0)
    if cfg.steps is not None and s.step >= cfg.steps:
        reason = "steps"
    elif cfg.budget_s is not None and s.elapsed >= cfg.budget_s - 1.0:
        reason = "budget"
    else:
        reason = "stop_after_steps" if cfg.stop_after_steps is not None else "signal"
    if trainer.is_global_zero:
        s.model.cpu()
        s.device = torch.device("cpu")
        if s.monitor is not None and (not s.monitor_log or s.monitor_log[-1]["step"] != s.step):
            s.run_monitor()
    summary = s.summary(reason, module.images_this_run, module.train_s, engine="pytorch-lightning",
                        devices=trainer.world_size)
    if trainer.is_global_zero:
        s.save(reason)
        s.export()
        s.finish(summary)
    return summary


__all__ = ["RANK_VARIABLES", "check_rank_variables", "pretrain_lightning"]

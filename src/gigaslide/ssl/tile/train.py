"""The native pre-training loop: CPU or one CUDA device, ``--steps`` and/or a wall-clock ``--budget``.

The schedules (lr warm-up + cosine, momentum, temperatures) span ``progress = step / planned``:
``planned`` is ``--steps``, or for a ``--budget`` the number of steps the measured step time allows
(:class:`~gigaslide.ssl.tile.step.StepPlan`, logged once estimated). The run stops cleanly at the
budget, on Ctrl-C or SIGTERM (:class:`gigaslide.runs.Stopper`): it writes a checkpoint and exports
``RUN_DIR/encoder``. Re-running the same command resumes bit-exactly. A label-free monitor
(:mod:`~gigaslide.ssl.tile.monitor`) is logged into the run's history ~8 times per run.
Multi-device runs go through :mod:`gigaslide.ssl.tile.lightning` (see :func:`gigaslide.ssl.tile.engine.pretrain`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gigaslide import runs
from gigaslide.ssl.tile.config import PretrainConfig, check_config
from gigaslide.ssl.tile.session import Session, open_session
from gigaslide.ssl.tile.step import build_model, param_groups, train_step

log = logging.getLogger("gigaslide.ssl.tile")


def _log_step(s: Session, loss: float, images_this_run: int, train_s: float) -> None:
    lr = s.opt.param_groups[0]["lr"]
    s.history.append({"step": s.step, "loss": round(loss, 5), "lr": lr, "elapsed_s": round(s.elapsed, 2)})
    log.info("step %d/%d loss %.4f lr %.2e (%.1f img/s)", s.step, s.plan.planned, loss, lr,
             images_this_run / max(train_s, 1e-9))


def pretrain_native(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg.out`` in this process; returns the summary written to ``run.json``. The run
    draws on its own random streams, seeded with ``cfg.seed``; the caller's are as they were
    (:func:`gigaslide.runs.isolated_rng`)."""
    check_config(cfg)
    with runs.isolated_rng(cfg.seed):
        return _pretrain_native(cfg)


def _pretrain_native(cfg: PretrainConfig) -> dict[str, Any]:
    s = open_session(cfg)
    cfg = s.cfg
    it = iter(s.loader())
    s.restore_rng()
    s.model.train()
    reason, loss, local, images_this_run, train_s = None, None, 0, 0, 0.0
    with runs.Stopper(cfg.budget_s, elapsed_s=s.elapsed) as stopper:
        if s.monitor_due():
            s.run_monitor()
        t_ckpt = time.monotonic()
        if cfg.steps is not None and s.step >= cfg.steps:
            reason = "steps"
        reason = reason or stopper.reason()
        while reason is None:
            t0 = time.monotonic()
            try:
                batch = next(it)
            except StopIteration:
                reason = "steps"
                break
            batch = [v.to(s.device, non_blocking=True) for v in batch]
            loss = train_step(s.model, batch, s.opt, s.scaler, s.step, s.plan.progress(s.step), base_lr=cfg.lr,
                              warmup_frac=cfg.warmup_frac, device=s.device, precision=s.precision.resolved,
                              run_dir=cfg.out)
            s.step, local = s.step + 1, local + 1
            n = batch[0].shape[0]
            s.images, images_this_run = s.images + n, images_this_run + n
            dt = time.monotonic() - t0
            train_s += dt
            s.elapsed = stopper.elapsed
            if s.plan.observe(local, dt, s.step, s.elapsed):
                per = s.plan.seconds_per_step
                log.info("planned %d steps for the budget (%s)", s.plan.planned,
                         f"{per:.3f} s/step measured" if per is not None else f"first step {dt:.3f} s, start-up included")
            if s.step % cfg.log_every == 0 or local == 1:
                _log_step(s, float(loss), images_this_run, train_s)
            if s.monitor_due():
                s.run_monitor()
            if cfg.steps is not None and s.step >= cfg.steps:
                reason = "steps"
            elif cfg.stop_after_steps is not None and local >= cfg.stop_after_steps:
                reason = "stop_after_steps"
            else:
                reason = stopper.reason()
            if reason is None and time.monotonic() - t_ckpt >= cfg.checkpoint_every_s:
                s.save("periodic")
                t_ckpt = time.monotonic()
        s.elapsed = stopper.elapsed
    if loss is not None and (not s.history or s.history[-1]["step"] != s.step):
        _log_step(s, float(loss), images_this_run, train_s)
    if s.monitor is not None and s.monitor_every() > 0 and (not s.monitor_log or s.monitor_log[-1]["step"] != s.step):
        s.run_monitor()
    s.save(reason)
    s.export()
    return s.finish(s.summary(reason, images_this_run, train_s, engine="native"))


__all__ = ["PretrainConfig", "build_model", "param_groups", "pretrain_native"]

"""One tile-SSL run on the run layer, shared by the native loop and the Lightning wrapper.

:func:`open_session` resolves the config (method recipe, defaults), builds data, views and model,
opens ``RUN_DIR`` with :func:`gigaslide.runs.open_run` (kind ``tile_ssl``; identity: the resolved
options plus the content of ``--data`` and of the ``--init`` weights file, so a changed folder,
mpp or weights is refused in one line) and restores the last checkpoint: model (incl. non-persistent
buffers such as MoCo's queue), optimiser, AMP scaler, RNG states, step (the sampler's position: each
step's batch depends on ``(seed, step)`` only), the step plan, history and monitor log. A resumed run
therefore continues bit-exactly. :meth:`Session.export` writes ``RUN_DIR/encoder`` with provenance; a
CNN's BatchNorm statistics can be re-measured (on a copy) on ``export_bn_tiles`` native-size tiles first
(off by default: the trained statistics probed better, see ``PretrainConfig.export_bn_tiles``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gigaslide import __version__, atomic, runs
from gigaslide.devices import PrecisionChoice, choose_precision, device_name, loader_workers, pick_device
from gigaslide.encoders import export_encoder
from gigaslide.errors import GigaslideError, check_finite_weights
from gigaslide.provenance import Provenance
from gigaslide.ssl.tile.augment import MultiView, view_recipes
from gigaslide.ssl.tile.config import (DEFAULT_SLIDE_MPP, PretrainConfig, config_dict, identity, init_file,
                                      method_settings, resolve_config)
from gigaslide.ssl.tile.data import SlideSource, StepSampler, ViewDataset, build_source, make_loader
from gigaslide.ssl.tile.init import init_weights_sha256, run_spec
from gigaslide.ssl.tile.methods import SSL_METHODS
from gigaslide.ssl.tile.monitor import Monitor, native_tiles, recalibrate_bn
from gigaslide.ssl.tile.step import StepPlan, build_model, param_groups, trunk_patch_size

log = logging.getLogger("gigaslide.ssl.tile")
RUN_KIND = "tile_ssl"
MONITOR_POINTS = 8  # default monitor points per run


def check_tile_count(n: int, batch_size: int, data: str | os.PathLike) -> None:
    """Refuse fewer than two tiles (every method learns by telling tiles apart, or at least two views of different
    tiles); warn below one batch, where every batch repeats tiles (contrastive negatives include the positive's
    copies)."""
    if n < 2:
        raise GigaslideError(f"--data holds {n} tile{'s' if n != 1 else ''}: self-supervised pre-training learns "
                             "from many different tiles", path=data,
                             fix=f"pass a folder of many tiles (at least one batch, {batch_size}) or of slides")
    if n < batch_size:
        log.warning("--data holds %d tiles, fewer than one batch (%d): every batch repeats tiles, and contrastive "
                    "methods then take copies of a tile as its negatives; use more tiles or a smaller --batch-size",
                    n, batch_size)


def clean_stale_temporaries(out: str | os.PathLike) -> int:
    """Remove the temporary files a killed export or checkpoint left in the run folder ``out``, ``out/encoder``
    and ``out/checkpoint`` (call with the run's lock held): gigaslide's ``.tmp-*`` and safetensors' own
    ``.tmpXXXXXX`` (:func:`gigaslide.atomic.clean_stale_tmp`), each as large as the weights (with the optimiser state,
    three times that). Returns how many were removed."""
    return sum(atomic.clean_stale_tmp(d) for d in (Path(out), Path(out) / "encoder", runs.checkpoint_dir(out)))


def warn_if_blank(tiles: torch.Tensor, data: str | os.PathLike) -> bool:
    """Warn when every one of ``tiles`` (float [N, 3, S, S], the monitor's sample of ``--data``) is one flat colour
    (blank glass, black padding): the run trains without error, on nothing (RankMe 1). True when it warned."""
    if not len(tiles) or not bool((tiles.flatten(1).std(1) < 1 / 255).all()):
        return False
    log.warning("all %d tiles sampled from %s for the monitor are blank (one flat colour each): the encoder has "
                "nothing to learn from them; check --data (slides: --min-tissue, --background)", len(tiles), data)
    return True


@dataclass
class Session:
    cfg: PretrainConfig  # resolved
    run: runs.Run | None  # None on DDP ranks > 0 (read-only)
    model: torch.nn.Module
    spec: Any
    device: torch.device
    precision: PrecisionChoice
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: StepPlan
    source: Any
    dataset: ViewDataset
    monitor: Monitor | None
    init_source: str | None
    step: int = 0
    images: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    monitor_log: list[dict] = field(default_factory=list)
    rng: dict | None = None  # RNG states to restore once the data iterator exists
    init_sha256: str | None = None  # sha256 of the --init weights file (init.init_weights_sha256)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def loader(self, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
        remaining = None if self.cfg.steps is None else max(0, self.cfg.steps - self.step)
        sampler = StepSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.step, remaining,
                              rank=rank, world_size=world_size)
        return make_loader(self.dataset, sampler, self.cfg.workers)

    def restore_rng(self) -> None:
        """Restore the checkpoint's RNG states (call after creating the data iterator, which draws from torch's RNG)."""
        if self.rng is not None:
            runs.set_rng_state(self.rng)
            self.rng = None

    # ------------------------------------------------------------------ monitor
    def monitor_every(self) -> int:
        if self.cfg.monitor_every is not None:
            return int(self.cfg.monitor_every)
        return max(1, self.plan.planned // MONITOR_POINTS)

    def monitor_due(self) -> bool:
        if self.monitor is None or self.monitor_every() <= 0:
            return False
        last = self.monitor_log[-1]["step"] if self.monitor_log else None
        return last is None or self.step - last >= self.monitor_every()

    def run_monitor(self) -> dict:
        m = self.monitor(self.model, self.device, self.precision.resolved)
        entry = {"step": self.step, **m}
        self.monitor_log.append(entry)
        self.plan.monitor_cost_s = m["seconds"]
        every = self.monitor_every()
        self.plan.monitor_points_left = max(0.0, (self.plan.planned - self.step) / every) if every > 0 else 0.0
        last = self.history[-1] if self.history else None  # the last logged step's loss, named with its step
        loss = f"{last['loss']} (logged at step {last['step']})" if last else "none logged yet"
        log.info("monitor step %d/%d: RankMe %s (of %d), view top-1 %s, loss %s", self.step, self.plan.planned,
                 m["rankme"], m["n"], m["view_top1"], loss)
        return entry

    # ------------------------------------------------------------------ checkpoint / export
    def export_prefix(self) -> str:
        trunk = self.model.export_trunk()
        for name, mod in self.model.named_children():
            if mod is trunk:
                return name + "."
        return "backbone."

    def payload(self, reason: str) -> dict[str, Any]:
        return {"model": runs.module_state(self.model), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": runs.rng_state(), "step": self.step, "images": self.images,
                "elapsed_s": self.elapsed, "planned_steps": self.plan.planned, "history": self.history[-2000:],
                "monitor": self.monitor_log[-500:], "init": self.init_source, "init_sha256": self.init_sha256,
                "precision": self.precision.record(),
                "export_prefix": self.export_prefix(), "spec": json.loads(self.spec.to_json()), "reason": reason}

    def check_finite_weights(self) -> None:
        """Refuse to checkpoint or export NaN/inf weights (a one-line error naming the step and the first bad
        tensor): the last checkpoint stays the last good one, and no NaN encoder is written."""
        check_finite_weights(self.model, f"step {self.step}", self.out, then="no checkpoint or encoder was written",
                             fix="lower --lr or use --precision fp32; the last good checkpoint is kept and a re-run "
                                 "resumes from it")

    def save(self, reason: str) -> None:
        if self.run is None:
            return
        self.check_finite_weights()
        self.run.save(self.payload(reason))
        self.run.update(history=self.history[-2000:], monitor=self.monitor_log, planned_steps=self.plan.planned,
                        precision=self.precision.record())

    def data_record(self) -> dict[str, Any]:
        """What the exported encoder's provenance says it learned from: ``--data`` (path and kind), its content hash
        as the run fingerprinted it (``data_sha256``: a file's sha256, a folder's listing hash) and file count, and for
        slides the tiles sampled from them -- so the export alone names its training data, not only its run folder."""
        desc = self.source.describe()
        fp = ((self.run.record.get("inputs") or {}).get("data") or {}) if self.run is not None else {}
        return {"data": fp.get("path") or os.fspath(self.cfg.data), "data_kind": desc.get("kind"),
                "data_sha256": fp.get("sha256") or fp.get("listing_sha256"), "data_files": fp.get("files"),
                "data_tiles": desc.get("n_tiles", desc.get("n_images"))}

    def export(self) -> Any:
        prov = Provenance(kind="encoder", seed=self.cfg.seed, mpp=first_mpp(self.cfg), tile_size=self.cfg.tile_size,
                          encoder=self.spec.name, run=str(self.out.resolve()),
                          extra={"gigaslide": __version__, "run_kind": RUN_KIND, "method": self.cfg.method,
                                 "backbone": self.cfg.backbone, "steps": self.step, "images": self.images,
                                 "init": self.init_source, "init_sha256": self.init_sha256,
                                 "precision": self.precision.resolved, **self.data_record()})
        trunk = self.model.export_trunk()
        n_bn_tiles = 0
        if self.cfg.export_bn_tiles > 0 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in trunk.modules()):
            trunk = copy.deepcopy(trunk).cpu()  # the training model (and so a resume) is left untouched
            tiles = native_tiles(self.source, self.cfg.export_bn_tiles, self.cfg.tile_size, self.cfg.seed, 4099)
            prep = self.model.prep
            recalibrate_bn(trunk, lambda x: prep(x.to(self.model.mean.device)).cpu(), tiles)
            n_bn_tiles = len(tiles)
        prov = prov.with_extra(bn_recalibrated_on_tiles=n_bn_tiles or None)
        return export_encoder(self.out / "encoder", trunk, self.spec, provenance=prov.to_dict())

    def summary(self, reason: str, images_this_run: int, train_s: float, **extra: Any) -> dict[str, Any]:
        first = next((h["loss"] for h in self.history if h.get("loss") is not None), None)
        # an invocation that trained nothing (the run was finished) keeps the rates the run was trained at
        prev = (self.run.record.get("summary") or {}) if self.run is not None else {}
        rate = round(images_this_run / train_s, 2) if images_this_run and train_s > 0 else prev.get("images_per_s")
        per_step = (round(self.plan.seconds_per_step, 4) if images_this_run and self.plan.seconds_per_step
                    else prev.get("seconds_per_step"))
        return {"run": str(self.out), "method": self.cfg.method, "backbone": self.cfg.backbone, "steps": self.step,
                "planned_steps": self.plan.planned, "stopped_by": reason, "elapsed_s": round(self.elapsed, 1),
                "images": self.images, "images_this_invocation": images_this_run, "images_per_s": rate,
                "seconds_per_step": per_step,
                "device": device_name(self.device), "precision": self.precision.record(), "init": self.init_source,
                "data": self.source.describe(), "encoder": str(self.out / "encoder"),
                "final_loss": self.history[-1].get("loss") if self.history else None, "first_loss": first,
                "monitor": self.monitor_log[-1] if self.monitor_log else None,
                "crop_size": self.cfg.crop_size, "batch_size": self.cfg.batch_size, "lr": self.cfg.lr,
                "workers": self.cfg.workers, **extra}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        if self.run is not None:
            if summary["stopped_by"] in ("steps", "budget"):
                self.run.finish(**summary)
            else:
                self.run.update(status="stopped", summary=summary)
        return summary


def first_mpp(cfg: PretrainConfig) -> float | None:
    """The µm/px the run's tiles are at (the first of several), or None: a tile folder given without --mpp."""
    return float(cfg.mpp[0]) if cfg.mpp else None


def open_session(cfg: PretrainConfig, *, write: bool = True, device: torch.device | None = None) -> Session:
    """Resolve, build and open (or resume) the run ``cfg.out``; ``write=False`` for DDP ranks > 0."""
    cls = SSL_METHODS.get(cfg.method)
    family = run_spec(cfg.backbone, cfg.method, cfg.tile_size, cfg.mpp, cfg.augment).family
    cfg = resolve_config(cfg, cls, family)
    device = device or pick_device("auto")
    if cfg.workers is None:
        cfg = dataclasses.replace(cfg, workers=loader_workers(device))
    source = build_source(cfg.data, cfg.mpp or [DEFAULT_SLIDE_MPP], cfg.tile_size, cfg.min_tissue, cfg.data_kind,
                          cfg.slide_mpp, cfg.background)
    if cfg.mpp is None and isinstance(source, SlideSource):
        cfg = dataclasses.replace(cfg, mpp=[DEFAULT_SLIDE_MPP])  # slides: the mpp in effect; tile folders: unknown
    check_tile_count(len(source), cfg.batch_size, cfg.data)
    has_ckpt = runs.read_checkpoint_record(cfg.out) is not None if os.path.isdir(cfg.out) else False
    model, spec, init_source = build_model(cfg, load=not has_ckpt)  # --init is checked before the folder is touched
    patch = trunk_patch_size(model)
    recipes = view_recipes(model.view_kind, cfg.augment, cfg.crop_size, cfg.n_local, patch or 8, patch=patch,
                           local_size=cfg.local_size, global_scale=cfg.global_scale, local_scale=cfg.local_scale)
    views = MultiView(recipes).prepare(source, patch=patch, seed=cfg.seed)  # tile size check; RandStainNA statistics
    recipes = views.recipes
    dataset = ViewDataset(source, views, cfg.tile_size)
    run = None
    if write:
        prev = runs.read_run(cfg.out)
        if prev and prev.get("run_kind") == RUN_KIND and "method_hparams" not in (prev.get("identity") or {}):
            raise GigaslideError("run folder was made before runs recorded their method settings, so its method "
                                 "defaults cannot be checked", path=cfg.out,
                                 fix="choose a new --out (or resume it with the gigaslide version that made it)")
        run = runs.open_run(cfg.out, RUN_KIND, identity(cfg, cls.hparams), config_dict(cfg), seed=cfg.seed,
                            inputs={"data": cfg.data, "init": init_file(cfg.init)},
                            provenance={"mpp": first_mpp(cfg), "tile_size": cfg.tile_size, "encoder": spec.name,
                                        "method": cfg.method})
        clean_stale_temporaries(cfg.out)  # the run lock is held: no live process writes them
    ck = runs.load_checkpoint(cfg.out) if has_ckpt else None
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg, spec.family), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ck is None:
        # training: no forward probe; bf16 on CPU only for a method measured as good in it (see gigaslide.devices)
        precision = choose_precision(device, cfg.precision, bf16_measured=cls.cpu_bf16_basis)
    else:
        precision = PrecisionChoice(**ck["precision"])
        runs.load_module_state(model, ck["model"], runs.checkpoint_dir(cfg.out),
                               fix="resume with the same options, or use a new --out")
        try:
            opt.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:  # other parameter groups: made by another gigaslide's recipe
            raise GigaslideError(f"the checkpoint's optimiser state does not fit this run's parameter groups ({e})",
                                 path=runs.checkpoint_dir(cfg.out),
                                 fix="resume it with the gigaslide version that made it, or use a new --out "
                                     "(--init RUN/encoder continues from its weights)") from None
        init_source = ck.get("init")
    scaler = torch.amp.GradScaler(device.type, enabled=precision.resolved == "fp16" and device.type == "cuda")
    if ck is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    # a budget's plan continues from the checkpoint's, capped by --steps (--steps alone: the plan is --steps, which
    # a resumed run may have raised)
    planned = int(ck["planned_steps"]) if ck and cfg.budget_s else 0
    plan = StepPlan(cfg.steps, cfg.budget_s, planned=min(planned, cfg.steps) if cfg.steps else planned,
                    resumed=ck is not None)
    monitor = None
    if write and cfg.monitor_every != 0 and cfg.monitor_size > 1:  # rank 0 monitors
        monitor = Monitor(source, recipes, cfg.tile_size, cfg.monitor_size, cfg.seed)
        warn_if_blank(monitor.native, cfg.data)
    s = Session(cfg, run, model, spec, device, precision, opt, scaler, plan, source, dataset, monitor, init_source)
    # the --init weights the run started from (a checkpoint made before this was recorded: --init's file, which the
    # run's identity holds to the same content)
    s.init_sha256 = ck.get("init_sha256") if ck is not None and "init_sha256" in ck else init_weights_sha256(cfg.init)
    if ck is not None:
        s.step, s.images, s.elapsed = int(ck["step"]), int(ck["images"]), float(ck["elapsed_s"])
        s.history, s.monitor_log, s.rng = list(ck.get("history", [])), list(ck.get("monitor", [])), ck["rng"]
        log.info("resuming %s at step %d (%.0f s spent)%s", cfg.out, s.step, s.elapsed,
                 "; --init is not re-applied (the checkpoint holds the weights)" if cfg.init else "")
    if run is not None:
        run.update(precision=precision.record(), resolved={k: v for k, v in dataclasses.asdict(cfg).items()
                                                           if k in ("batch_size", "lr", "crop_size", "n_local",
                                                                    "layer_decay", "warmup_frac", "weight_decay")}
                   | {"method_hparams": method_settings(cfg, cls.hparams)})
    if cfg.steps:
        log.info("%s %s: %d steps planned (batch %d, crops %d px, tiles %d px, lr %.2g, %s, %d loader workers)", cfg.method,
                 cfg.backbone, plan.planned, cfg.batch_size, cfg.crop_size, cfg.tile_size, cfg.lr, precision.resolved,
                 cfg.workers)
    else:
        log.info("%s %s: budget %.0f s; the step time of the first steps sets the number of steps the lr "
                 "warm-up + cosine span (batch %d, crops %d px, tiles %d px, lr %.2g, %s, %d loader workers)", cfg.method,
                 cfg.backbone, cfg.budget_s, cfg.batch_size, cfg.crop_size, cfg.tile_size, cfg.lr, precision.resolved,
                 cfg.workers)
    return s


__all__ = ["RUN_KIND", "Session", "clean_stale_temporaries", "open_session", "warn_if_blank"]

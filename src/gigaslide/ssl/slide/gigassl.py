"""Giga-SSL (Lazard et al., CVPRW 2023): SimCLR at slide level over cached augmented views.

Each step takes ``batch_size`` slides (default: all, up to 512 — "as large as memory allows") and
draws, *afresh*, two views of each: a random subset of ``tiles_per_step`` tiles (paper: 5-16) of two
different random cached augmented versions, with the tile grid rotated / flipped / scaled
(:mod:`.sampling`). Both go through the slide encoder (SparseConvMIL, a small sparse ResNet by
default), a lightly ``SimCLRProjectionHead`` and lightly's ``NTXentLoss``; AdamW with linear
warm-up then cosine decay. After every epoch a label-free monitor (held-out-draw view retrieval,
:func:`.sampling.view_retrieval`) scores the encoder; ``select="best"`` exports the best-scoring
epoch (``runs.Selection``), ``"last"`` the last. The untrained encoder is scored first: a run whose
exported epoch does not beat it is finished with ``learned: false`` in ``run.json`` and a warning
(its embeddings are no better than a random slide encoder's by the method's own measure). Before
training, the same monitor on the views' mean raw features (``raw_monitor``,
:func:`.sampling.raw_view_retrieval`) says how much slide identity the cache carries at all: near
chance, the views of one slide are no more alike than two slides, and there is little to learn.

The loop stands on :mod:`gigaslide.runs`: ``run.json`` identity (options + cache fingerprint),
pickle-free checkpoints with model, optimiser, all RNG states (torch/python/numpy and the sampling
``numpy.random.Generator``), the epoch's order and position, so a run stopped (``runs.Stopper``:
SIGTERM, Ctrl-C, ``budget``) or killed resumes bit-exactly.

Embedding (:func:`embed_views`): the mean of the encoder's output over ``ensemble`` random views of
``tiles_per_view`` plain (non-augmented) tiles — the paper's "ensembling".
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gigaslide import runs
from gigaslide.devices import autocast_ctx, choose_precision, grad_scaler, pick_device
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.ssl.slide.encoders import build_slide_encoder
from gigaslide.ssl.slide.export import data_record, export_model, read_config
from gigaslide.ssl.slide.sampling import draw_pairs, raw_view_retrieval, view_retrieval
from gigaslide.ssl.slide.views import load_cache


@dataclass
class GigaSSLConfig:
    encoder: str = "sparseconvmil"
    out_dim: int = 512
    hidden: int = 256
    blocks: int = 2
    norm: str = "batch"
    downsample: bool = True
    proj_dim: int = 128
    temperature: float = 0.05
    epochs: int = 50
    batch_size: int | None = None  # slides per step; None = all slides (at most 512)
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_epochs: int = 5
    tiles_per_step: int = 16
    grid_augment: bool = True
    scale: tuple[float, float] = (0.8, 1.25)
    select: str = "best"  # best (monitor) | last
    patience: int | None = None
    seed: int = 0
    precision: str = "fp32"


class GigaSSLModel(nn.Module):
    def __init__(self, encoder: nn.Module, out_dim: int, proj_dim: int):
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.encoder = encoder
        self.head = SimCLRProjectionHead(out_dim, out_dim, proj_dim, batch_norm=False)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(feats, pos))


def check_config(cfg: GigaSSLConfig) -> None:
    """One line for an option the run could not use (a width of 0 failed deep in the encoder, a patience of 0 exported
    the untrained encoder as a finished run, a negative block count trained without blocks)."""
    from gigaslide.ssl.slide.encoders import NORMS

    if cfg.select not in ("best", "last"):
        raise GigaslideError(f"--select {cfg.select!r}", fix="use best or last")
    if cfg.norm not in NORMS:
        raise GigaslideError(f"--norm {cfg.norm!r}", fix=f"use one of {', '.join(NORMS)}")
    for opt, v, least, eg in (("--tiles-per-step", cfg.tiles_per_step, 1, "16 (paper: 5-16)"),
                              ("--width", cfg.hidden, 1, "256"), ("--out-dim", cfg.out_dim, 1, "512"),
                              ("--blocks", cfg.blocks, 0, "2 (0: no geometry)"),
                              ("--warmup-epochs", cfg.warmup_epochs, 0, "5"),
                              ("--patience", 1 if cfg.patience is None else cfg.patience, 1, "10 (omitted: never)"),
                              ("--epochs", cfg.epochs, 1, "50"), ("proj_dim", cfg.proj_dim, 1, "128")):
        if v < least:
            raise GigaslideError(f"{opt} {v} must be >= {least}", fix=f"use e.g. {opt} {eg}")
    # --epochs 0 exported the untrained encoder as a finished run; a zero / NaN temperature or learning rate failed
    # inside lightly / torch as a bare ValueError
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise GigaslideError(f"--temperature {cfg.temperature} must be a positive number",
                             fix="use e.g. --temperature 0.05")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):  # 0: a run that does not learn (a control)
        raise GigaslideError(f"--lr {cfg.lr} must be a number >= 0", fix="use e.g. --lr 1e-3")
    lo, hi = cfg.scale
    if not 0 < lo <= hi:
        raise GigaslideError(f"scale ({lo}, {hi}) must be 0 < low <= high (the view grid's zoom)",
                             fix="use e.g. scale (0.8, 1.25)")


#: What to do about a loss that became NaN / inf: an existing run keeps its options (another --lr is refused), and
#: re-running the same command resumes bit-exactly from the last checkpoint, so meets the same NaN.
NAN_LOSS_FIX = ("start again with a lower --lr in a new --out (a run keeps its options, and re-running this command "
                "resumes from its last checkpoint, before the NaN, only to meet it again)")


def check_loss(loss: torch.Tensor, at: str, run_dir: str | os.PathLike) -> None:
    """:func:`gigaslide.errors.check_finite_loss` with a fix the slide-SSL runs can follow (its "lower --lr ... a
    re-run resumes" could not be: a re-run with another --lr is refused, the same one meets the same NaN)."""
    check_finite_loss(loss, at, run_dir, fix=NAN_LOSS_FIX)


def make_encoder(cfg: dict[str, Any], in_dim: int) -> nn.Module:
    return build_slide_encoder(cfg["encoder"], in_dim, out_dim=cfg["out_dim"], hidden=cfg["hidden"],
                               blocks=cfg["blocks"], norm=cfg["norm"], downsample=cfg["downsample"])


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@runs.keeps_caller_rng
def pretrain_gigassl(cache: str | os.PathLike, out: str | os.PathLike, cfg: GigaSSLConfig | None = None, *,
                     device: str = "auto", budget: str | float | None = None, stop_after_steps: int | None = None,
                     log=print, **overrides: Any) -> dict[str, Any]:  # noqa: ANN001
    """Pre-train (or resume) a Giga-SSL slide encoder on an augmented-view cache; exports RUN/model.safetensors.

    ``overrides`` set :class:`GigaSSLConfig` fields; ``stop_after_steps``: stop after this many optimiser
    steps *in this call* (tests simulate an interruption mid-epoch)."""
    from lightly.loss import NTXentLoss

    cfg = GigaSSLConfig(**{**asdict(cfg or GigaSSLConfig()), **overrides})
    check_config(cfg)
    budget_s = runs.parse_duration(budget)  # a bad --budget is one line before a run folder is made
    vc = load_cache(cache)
    if len(vc) < 2:
        raise GigaslideError(f"SimCLR needs at least 2 slides, the cache has {len(vc)}", path=cache,
                             fix="cache more slides with augment-cache")
    shapes = {tuple(v.shape[:2]) for v in vc.views}
    if len(shapes) > 1:  # files of two caches (other --views / --tiles-per-view) copied into one folder
        odd = next(s for s, v in zip(vc.slide_ids, vc.views) if tuple(v.shape[:2]) != tuple(vc.views[0].shape[:2]))
        raise GigaslideError(f"the cache mixes recipes: slide '{vc.slide_ids[0]}' has {vc.views[0].shape[0]} views x "
                             f"{vc.views[0].shape[1]} tiles, slide '{odd}' another shape (views x tiles per view: "
                             f"{', '.join(f'{v}x{t}' for v, t in sorted(shapes))}); one cache holds one recipe",
                             path=cache, fix="keep one augment-cache's files per folder (re-cache the odd slides)")
    if min(int(v.shape[0]) for v in vc.views) < 2:
        raise GigaslideError("each slide needs at least 2 cached views", path=cache, fix="rebuild with --views 2 or more")
    few = [s for s, v in zip(vc.slide_ids, vc.views) if v.shape[1] < cfg.tiles_per_step]
    if few or vc.few_tiles:
        log(f"warning: {len(set(few) | set(vc.few_tiles))} slide(s) have fewer tiles than a view needs; "
            f"their views are drawn with replacement (e.g. {sorted(set(few) | set(vc.few_tiles))[0]})")
    bs = max(2, min(cfg.batch_size or 512, len(vc)))
    dev = pick_device(device)
    prec = choose_precision(dev, cfg.precision)
    scaler = grad_scaler(dev, prec.resolved)  # fp16: small gradients would underflow without loss scaling
    tcfg = {**asdict(cfg), "batch_size": bs}
    data = {**data_record(vc.provenance), "dim": vc.dim, "tiles_per_view": int(vc.views[0].shape[1]),
            "n_slides": len(vc)}
    config = {"encoder": {k: tcfg[k] for k in ("encoder", "out_dim", "hidden", "blocks", "norm", "downsample")},
              "data": data, "train": tcfg, "cache": str(cache)}
    run = runs.open_run(out, "gigassl", {"encoder": config["encoder"], "train": tcfg, "data": data}, config,
                        seed=cfg.seed, inputs={"cache": cache}, provenance={**vc.provenance.to_dict(), "run": str(out)})
    run.update(precision=prec.record(), few_tiles=sorted(set(few) | set(vc.few_tiles)))
    torch.manual_seed(cfg.seed)
    model = GigaSSLModel(make_encoder(config["encoder"], vc.dim), cfg.out_dim, cfg.proj_dim).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = NTXentLoss(temperature=cfg.temperature)
    rng = np.random.default_rng([cfg.seed, 1])
    monitor_pairs = draw_pairs(vc.views, vc.pos, np.arange(len(vc)), cfg.tiles_per_step,
                               np.random.default_rng([cfg.seed, 2]), cfg.grid_augment, cfg.scale)  # fixed, not trained on
    steps_per_epoch = math.ceil(len(vc) / bs)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    sel = runs.Selection("max", patience=cfg.patience)
    epoch, pos_in_epoch, step, history, order, elapsed = 0, 0, 0, [], None, 0.0
    losses: list[float] = []
    ck = run.load()
    if ck is None:  # the untrained encoder on the monitor: what training has to beat (eval mode: no RNG, no BN update)
        run.update(untrained_monitor=view_retrieval(model.encoder, monitor_pairs, dev),
                   raw_monitor=raw_view_retrieval(monitor_pairs))
        log(f"slide identity in the cached views before training: mean-feature view retrieval top-1 "
            f"{run.record['raw_monitor']['retrieval_top1']:.3f} (chance {1 / len(vc):.3f})")
    untrained, raw = run.record.get("untrained_monitor"), run.record.get("raw_monitor")
    if ck is not None:
        runs.load_module_state(model, ck["model"], run.dir)
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        runs.set_rng_state(ck["rng"])
        rng.bit_generator.state = ck["gen"]
        epoch, pos_in_epoch, step = int(ck["epoch"]), int(ck["pos"]), int(ck["step"])
        history, order, elapsed = list(ck["history"]), ck.get("order"), float(ck["elapsed"])
        sel = runs.Selection.from_state(ck["selection"])
        losses = list(ck.get("losses") or [])
        log(f"resuming {run.dir} at epoch {epoch}/{cfg.epochs}" + (f", step {pos_in_epoch}" if pos_in_epoch else ""))

    def save(name: str = "last") -> None:
        run.save({"model": runs.module_state(model), "optimizer": opt.state_dict(), "rng": runs.rng_state(),
                  "scaler": scaler.state_dict(), "gen": rng.bit_generator.state, "epoch": epoch, "pos": pos_in_epoch,
                  "step": step, "order": order, "losses": losses, "history": history, "selection": sel.state(),
                  "elapsed": stopper.elapsed})

    done_now, stopped = 0, None
    with runs.Stopper(budget_s, elapsed_s=elapsed) as stopper:
        while epoch < cfg.epochs and not sel.stop:
            if order is None:
                order, pos_in_epoch, losses = rng.permutation(len(vc)), 0, []
            model.train()
            while pos_in_epoch < steps_per_epoch:
                stopped = stopped or stopper.reason() or (
                    "stop_after" if stop_after_steps is not None and done_now >= stop_after_steps else None)
                if stopped:
                    break
                batch = order[pos_in_epoch * bs:(pos_in_epoch + 1) * bs]
                if len(batch) < 2:  # a last batch of one slide has no negatives: give it a partner
                    batch = np.concatenate([batch, order[:1]])
                f0, p0, f1, p1 = draw_pairs(vc.views, vc.pos, batch, cfg.tiles_per_step, rng, cfg.grid_augment, cfg.scale)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warm, cfg.lr)
                with autocast_ctx(dev, prec.resolved):
                    z = model(torch.cat([f0, f1]).to(dev), torch.cat([p0, p1]).to(dev)).float()
                loss = loss_fn(z[: len(batch)], z[len(batch):])
                check_loss(loss, f"epoch {epoch + 1} step {pos_in_epoch + 1}", run.dir)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
                pos_in_epoch, step, done_now = pos_in_epoch + 1, step + 1, done_now + 1
            if stopped:
                break
            mon = view_retrieval(model.encoder, monitor_pairs, dev)
            score = monitor_score(mon)
            improved = sel.update(score, epoch + 1)
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **mon, "lr": lr_at(step - 1, total, warm, cfg.lr),
                            "seconds": stopper.elapsed})
            epoch, order, pos_in_epoch = epoch + 1, None, 0
            if improved:
                run.save({"encoder": runs.module_state(model.encoder), "epoch": epoch}, name="best")
            save()
            h = history[-1]
            log(f"epoch {epoch}/{cfg.epochs} loss {h['loss']:.4f} view-retrieval {h['retrieval_top1']:.3f} "
                f"gap {h['cosine_gap']:.3f}{' *' if improved else ''}")
        if stopped:
            save()
    finished = not stopped and (epoch >= cfg.epochs or sel.stop)
    seconds = stopper.elapsed
    if finished:
        best = run.load("best") if cfg.select == "best" else None
        state = best["encoder"] if best is not None else runs.module_state(model.encoder)
        export_model(run.dir, {k: v for k, v in state.items() if not k.startswith(runs.BUFFER_PREFIX)}, history)
        chosen = int(best["epoch"]) if best is not None else epoch
        learned = learned_over(history[chosen - 1] if 0 < chosen <= len(history) else None, untrained)
        run.update(history=history)
        run.finish(epochs=epoch, exported_epoch=chosen, select=cfg.select, seconds=seconds,
                   final_loss=history[-1]["loss"] if history else None, learned=learned)
        log(f"exported epoch {chosen} ({cfg.select}) -> {run.dir / 'model.safetensors'}")
        if learned is False:
            u, c = untrained["retrieval_top1"], history[chosen - 1]["retrieval_top1"]
            log(f"warning: pre-training did not beat the untrained encoder on the label-free monitor (view retrieval "
                f"top-1 {c:.3f} at the exported epoch {chosen} vs {u:.3f} untrained, chance {1 / len(vc):.3f}): the "
                "slides may share no identity that survives the cached augmentations"
                + (f" (the views' mean features retrieve at top-1 {raw['retrieval_top1']:.3f})" if raw else "")
                + ", or the run is too short (more epochs, a smaller --batch-size for more steps)")
    else:
        run.update(status="stopped", stop_reason=stopped, history=history)
        log(f"stopped ({stopped}) at epoch {epoch}, step {pos_in_epoch}: re-run the same command to resume")
    summ = (run.record.get("summary") or {}) if finished else {}
    return {"run": str(run.dir), "finished": finished, "history": history, "seconds": seconds, "stopped": stopped,
            "untrained_monitor": untrained, "raw_monitor": raw, "exported_epoch": summ.get("exported_epoch"),
            "learned": summ.get("learned")}


def monitor_score(mon: dict[str, float]) -> float:
    """What ``select="best"`` maximises: view-retrieval top-1, ties broken by the positive-negative cosine gap."""
    return mon["retrieval_top1"] + 0.01 * mon["cosine_gap"]


#: At the untrained encoder's view-retrieval top-1, the positive-negative cosine gap must grow by this much for a run
#: to count as learned: a gain of 1e-4 is noise (a run whose loss stayed at ln(batch) counted as learned by it).
MIN_GAP_GAIN = 0.01


def learned_over(exported: dict[str, float] | None, untrained: dict[str, float] | None) -> bool | None:
    """Whether the exported epoch's monitor beats the untrained encoder's: a higher view-retrieval top-1, or the same
    top-1 with a cosine gap at least :data:`MIN_GAP_GAIN` larger (None where either is unknown, e.g. a run started
    before untrained monitors were recorded)."""
    if exported is None or untrained is None:
        return None
    if exported["retrieval_top1"] != untrained["retrieval_top1"]:
        return exported["retrieval_top1"] > untrained["retrieval_top1"]
    return exported["cosine_gap"] - untrained["cosine_gap"] >= MIN_GAP_GAIN


@runs.keeps_caller_rng
def load_encoder(run: str | os.PathLike) -> tuple[nn.Module, dict]:
    from gigaslide.ssl.slide.export import load_weights

    cfg = read_config(run)
    return load_weights(run, make_encoder(cfg["encoder"], cfg["data"]["dim"])), cfg


@torch.no_grad()
def embed_views(encoder: nn.Module, feats: np.ndarray, pos: np.ndarray, *, ensemble: int, tiles_per_view: int,
                rng: np.random.Generator, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Mean embedding over ``ensemble`` random views of ``tiles_per_view`` tiles (all tiles if fewer), each view's
    top-left cell moved to 0 as in training (:func:`~gigaslide.ssl.slide.sampling.draw_view`): the stride-2
    pooling then pairs cells the same way whatever the slide's origin. Views are drawn from the tiles in grid
    order (row-major by position), so the embedding does not depend on the order the feature file lists its
    tiles in (another tool, or a re-encode, lists the same tiles in another order)."""
    n = len(feats)
    t = min(tiles_per_view, n)
    order = np.lexsort((pos[:, 0], pos[:, 1])) if n else np.zeros(0, np.int64)
    encoder.eval()
    outs, views = [], max(1, ensemble)
    for v0 in range(0, views, VIEW_BATCH):  # the views' tiles a batch at a time (--ensemble 10^7 took every byte)
        idx = order[np.stack([rng.choice(n, size=t, replace=False) for _ in range(min(VIEW_BATCH, views - v0))])]
        f = torch.as_tensor(feats[idx], dtype=torch.float32, device=device)
        p = pos[idx]
        p = torch.as_tensor(p - p.min(axis=1, keepdims=True), dtype=torch.long, device=device)
        outs.append(encoder(f, p))
    return torch.cat(outs).mean(0).float().cpu().numpy()


#: Views :func:`embed_views` encodes at once (the default --ensemble 20 is one batch).
VIEW_BATCH = 256

"""StreamingCLAM training (Dooper et al. 2023): whole-slide canvases, streamed trunk, CLAM head, slide labels only.

Per fold (stratified, patient-grouped, from :mod:`gigaslide.evaluation.splits`): a validation split
inside the training slides picks the checkpoint (early stopping on validation loss); the trunk is
frozen for ``freeze_epochs`` epochs (head only, no trunk backward) and then trained at a lower
learning rate; checkpoint selection and patience start when the trunk unfreezes, so the kept model is
trained end to end; one slide per step with gradient accumulation; AMP on CUDA (bf16, else fp16 with a
grad scaler), optional bf16 autocast on CPU. Checkpoints are safetensors written atomically; an
interrupted run resumes from the last finished epoch, finished folds are skipped. Test predictions
are written per fold as ``fold<k>/predictions.csv`` and pooled/evaluated by :mod:`gigaslide.evaluation.slides`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gigaslide import atomic
from gigaslide.artifacts import provenance
from gigaslide.devices import autocast_dtype, pick_device
from gigaslide.errors import GigaslideError
from gigaslide.streaming.data import Augment, Canvas, Normalize, cached_canvas
from gigaslide.streaming.head import StreamingMIL, build_trunk
from gigaslide.streaming.stream import StreamingCNN


@dataclass
class TrainConfig:
    mpp: float = 8.0
    image_size: int = 8192
    tile_size: int = 2048
    encoder: str = "resnet34"
    weights: str | None = None
    head: str = "clam_sb"
    folds: int = 5
    epochs: int = 20
    freeze_epochs: int = 5
    lr: float = 2e-4
    trunk_lr: float = 2e-5
    weight_decay: float = 1e-4
    accumulate: int = 4
    instance_weight: float = 0.3
    patience: int = 5
    val_fraction: float = 0.2
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"
    slide_mpp: float | None = None
    checkpoint_blocks: bool = True  # recompute block activations in backward: lower memory per tile
    trim_memory: bool = True  # return freed tile buffers to the OS at once (glibc): peak RSS tracks live tensors


def build_model(cfg: TrainConfig, n_classes: int, device: torch.device) -> StreamingMIL:
    torch.manual_seed(cfg.seed)  # same trunk initialisation (without --weights) in every fold and baseline
    trunk = build_trunk(cfg.encoder, cfg.weights)
    stream = StreamingCNN(trunk, cfg.tile_size, transform=Normalize(), channels_last=True,
                          checkpoint_blocks=cfg.checkpoint_blocks, trim_memory=cfg.trim_memory)
    model = StreamingMIL(stream, cfg.head, n_classes).to(device)
    trunk.to(memory_format=torch.channels_last)
    return model


def step_loss(model: StreamingMIL, canvas: Canvas, label: int, cfg: TrainConfig, device: torch.device,
              dtype: torch.dtype | None, aug: Augment | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and class probabilities of one slide (augmented when ``aug`` is given)."""
    a = aug or Augment()
    img = a.geometric(canvas.tensor())[None].to(device)
    model.stream.transform = Normalize(a)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(img, label if model.training else None)
    logits = out["logits"].float().reshape(1, -1)
    loss = F.cross_entropy(logits, torch.tensor([label], device=device))
    if model.training and "instance_loss" in out:
        loss = (1 - cfg.instance_weight) * loss + cfg.instance_weight * out["instance_loss"].float()
    return loss, torch.softmax(logits.detach(), -1)[0].cpu()


def evaluate(model: StreamingMIL, canvases: list[Canvas], labels: list[int], cfg: TrainConfig, device: torch.device,
             dtype: torch.dtype | None) -> tuple[float, np.ndarray]:
    model.eval()
    losses, probs = [], []
    with torch.no_grad():
        for c, y in zip(canvases, labels):
            loss, p = step_loss(model, c, y, cfg, device, dtype, None)
            losses.append(float(loss.detach()))
            probs.append(p.numpy())
    return float(np.mean(losses)) if losses else float("nan"), np.asarray(probs)


def _save(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic.atomic_path(path, suffix=".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "gigaslide.streaming"})


def _load(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def train_fold(fold_dir: Path, model: StreamingMIL, train: list[tuple[Canvas, int]], val: list[tuple[Canvas, int]],
               cfg: TrainConfig, device: torch.device, log: Any = print, fold: int = 0) -> dict[str, Any]:
    """Train one fold with early stopping on ``val``; resumes from ``fold_dir/state.json``. Returns the state."""
    dtype = autocast_dtype(device, cfg.precision)
    opt = torch.optim.AdamW([{"params": model.head_parameters(), "lr": cfg.lr},
                             {"params": model.trunk_parameters(), "lr": cfg.trunk_lr}], weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16 and device.type == "cuda")
    state_path = fold_dir / "state.json"
    state: dict[str, Any] = {"epoch": 0, "best_val_loss": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    if state_path.is_file() and (fold_dir / "last.safetensors").is_file():
        state = json.loads(state_path.read_text())
        _load(model, fold_dir / "last.safetensors")
        if (fold_dir / "optimizer.pt").is_file():
            opt.load_state_dict(torch.load(fold_dir / "optimizer.pt", map_location=device, weights_only=True))
        log(f"  resuming at epoch {state['epoch']}")
    rng = np.random.default_rng([cfg.seed, fold, state["epoch"]])
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"]
        frozen = epoch < cfg.freeze_epochs
        for p in model.trunk_parameters():
            p.requires_grad_(not frozen)
        model.train()
        opt.zero_grad(set_to_none=True)
        losses = []
        order = rng.permutation(len(train))
        for i, k in enumerate(order):
            c, y = train[k]
            loss, _ = step_loss(model, c, y, cfg, device, dtype, Augment.draw(rng))
            scaler.scale(loss / cfg.accumulate).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(order):
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
        val_loss, _ = evaluate(model, [c for c, _ in val], [y for _, y in val], cfg, device, dtype) if val else (float(np.mean(losses)), None)
        # the frozen epochs warm the head up: checkpoint selection and patience start once the trunk trains,
        # so the model kept is trained end to end (unless the trunk never unfreezes)
        selecting = not frozen or cfg.freeze_epochs >= cfg.epochs
        improved = selecting and (state["best_val_loss"] is None or val_loss < state["best_val_loss"])
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            _save(model, fold_dir / "best.safetensors")
        elif selecting:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "trunk_frozen": frozen})
        log(f"  epoch {epoch}: train {np.mean(losses):.4f} val {val_loss:.4f}{' *' if improved else ''}{' (trunk frozen)' if frozen else ''}")
        _save(model, fold_dir / "last.safetensors")
        with atomic.atomic_path(fold_dir / "optimizer.pt", suffix=".pt") as tmp:
            torch.save(opt.state_dict(), tmp)
        atomic.write_json(state_path, state)
    return state


def _check_same_config(path: Path, cfg: TrainConfig) -> None:
    """A run folder resumes only the run it holds: other settings would mix folds trained differently."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError):
        return
    new = asdict(cfg)
    same_results = ("device", "checkpoint_blocks", "trim_memory")  # memory/speed only: a run may resume with others
    diff = [k for k in new if k not in same_results and k in old and old[k] != new[k]]
    if diff:
        k = diff[0]
        raise GigaslideError(f"run folder holds a run with other settings ({k}: {old[k]!r} -> {new[k]!r}"
                             f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''})", path=path.parent,
                             fix="use a new --out for new settings, or the same options to resume this run")


def run_training(slides: str, labels: str, out: str, cfg: TrainConfig, log: Any = print) -> dict[str, Any]:
    """Cross-validated StreamingCLAM training; returns the pooled evaluation (AUC, balanced accuracy with CIs)."""
    from gigaslide.evaluation.slides import evaluate_predictions, write_predictions
    from gigaslide.evaluation.splits import make_folds, read_labels, splits_record, validation_split
    from gigaslide.slides import find_slides, slide_id_from_path

    out_dir = atomic.ensure_writable_dir(out)
    atomic.clean_stale_tmp(out_dir)
    table = read_labels(labels)
    paths = {slide_id_from_path(p): p for p in find_slides([slides])}
    missing = [s for s in table.slide_ids if s not in paths]
    if missing:
        raise GigaslideError(f"{len(missing)} labelled slide(s) not found in {slides} (e.g. {missing[0]})", path=labels,
                             fix="check --slides and the slide_id column (file name without extension)")
    device = pick_device(cfg.device)
    stride = StreamingCNN(build_trunk(cfg.encoder), cfg.tile_size).stride
    log(f"reading {len(table)} canvases at {cfg.mpp} µm/px (cache: {out_dir / 'canvases'})")
    canvases = [cached_canvas(paths[s], out_dir / "canvases", cfg.mpp, cfg.image_size, stride, slide_mpp=cfg.slide_mpp)
                for s in table.slide_ids]
    y = table.labels.astype(int)
    folds = make_folds(y, table.patient_ids if table.has_patients else None, cfg.folds, cfg.seed, where=labels)
    atomic.write_json(out_dir / "splits.json", splits_record(table, folds))
    _check_same_config(out_dir / "config.json", cfg)
    atomic.write_json(out_dir / "config.json", {**provenance(kind="streaming_run", mpp=cfg.mpp, tile_size=cfg.tile_size,
                                                            encoder=cfg.encoder, seed=cfg.seed), "config": asdict(cfg)})
    pred_files = []
    for k, (tr, te) in enumerate(folds):
        fold_dir = atomic.ensure_writable_dir(out_dir / f"fold{k}")
        pred_path = fold_dir / "predictions.csv"
        pred_files.append(pred_path)
        if pred_path.is_file():
            log(f"fold {k}: done (skipped)")
            continue
        tr_i, va_i = validation_split(tr, y, table.patient_ids if table.has_patients else None,
                                      fraction=cfg.val_fraction, seed=cfg.seed + k)
        log(f"fold {k}: {len(tr_i)} train, {len(va_i)} val, {len(te)} test slides")
        model = build_model(cfg, table.n_classes, device)
        train_fold(fold_dir, model, [(canvases[i], int(y[i])) for i in tr_i], [(canvases[i], int(y[i])) for i in va_i],
                   cfg, device, log, fold=k)
        _load(model, fold_dir / "best.safetensors")
        _, probs = evaluate(model, [canvases[i] for i in te], [int(y[i]) for i in te], cfg, device, autocast_dtype(device, cfg.precision))
        write_predictions(pred_path, [table.slide_ids[i] for i in te], y[te], probs, k)
    import csv

    rows: list[list[str]] = []
    header: list[str] = []
    for p in pred_files:
        with open(p, newline="") as f:
            r = list(csv.reader(f))
        header, rows = r[0], rows + r[1:]
    with atomic.atomic_path(out_dir / "predictions.csv", suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    res = evaluate_predictions(out_dir / "predictions.csv", out=out_dir)
    log(f"AUC {res['metrics']['auc']['value']:.3f} [{res['metrics']['auc']['ci_low']:.3f}, {res['metrics']['auc']['ci_high']:.3f}]")
    return res

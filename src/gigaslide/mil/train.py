"""Train one MIL model on one fold (CPU-fast), save / load it, predict.

Tile features are z-scored per dimension with the training fold's statistics (stored in the
model as buffers, so prediction and heatmaps apply the same transform). Bag-at-a-time Adam with
class-weighted cross-entropy (each bag's loss times n / (C · n_class) of the training fold, so every class weighs
the same in an epoch; CLAM models add their instance loss with
weight ``1 - bag_weight``); after every epoch the validation split (carved from the training
fold, never the test fold) is scored and the best epoch by ``monitor`` (validation loss, or AUC
with loss as tie-break) is kept; training stops after ``patience`` epochs without improvement.
A model is saved as ``model.safetensors`` + ``config.json`` (atomic writes); loading never
unpickles.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gigaslide import atomic
from gigaslide.provenance import check_format, provenance
from gigaslide.devices import autocast_ctx, grad_scaler, pick_device
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.metrics import auc as auc_metric
from gigaslide.features.stats import STD_FLOOR
from gigaslide.features.stats import feature_stats as cohort_stats
from gigaslide.mil.models import build_model
from gigaslide.runs import Selection, isolated_rng


@dataclass
class TrainConfig:
    model: str = "abmil"
    epochs: int = 40
    patience: int = 8
    min_epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 128
    dropout: float = 0.25
    bag_weight: float = 0.7  # CLAM: weight of the bag loss vs the instance-clustering loss
    monitor: str = "loss"  # "loss" or "auc" on the validation split
    max_tiles: int | None = None  # random subset of tiles per bag and step in training (None = all)
    standardize: bool = True  # z-score features with the training fold's per-dimension tile mean / std
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available
    bf16: bool = False  # bf16 autocast (always on CUDA)
    model_kwargs: dict[str, Any] = field(default_factory=dict)


class Standardized(torch.nn.Module):
    """A MIL model behind a fixed per-dimension z-scoring of the tile features (buffers ``mean``, ``std``)."""

    def __init__(self, mil: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mil = mil
        self.register_buffer("mean", mean.float().reshape(1, -1))
        self.register_buffer("std", std.float().reshape(1, -1))

    def forward(self, bag: torch.Tensor, label: int | None = None, cells: torch.Tensor | None = None) -> dict[str, Any]:
        if bag.ndim == 3 and bag.shape[0] == 1:  # [1, N, D], as the models accept it
            bag = bag[0]
        if bag.ndim == 2 and bag.shape[0] > 0:
            bag = (bag - self.mean) / self.std
        return self.mil(bag, label=label, cells=cells)


def _numpy(b: Any) -> Any:
    if not isinstance(b, torch.Tensor):
        return b
    b = b.detach().cpu()
    return (b.float() if b.dtype == torch.bfloat16 else b).numpy()


def feature_stats(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean / std over all tiles of ``bags`` (:func:`gigaslide.features.stats.feature_stats`:
    one pass, float64 accumulation; bags may be read from disk). A dimension constant over them (std at the floor,
    e.g. a ReLU unit that never fires on the training tiles) gets std 1, as sklearn's ``StandardScaler`` gives it:
    divided by the floor (1e-6), a test tile where that unit fires at 1.0 became 1e6 and set every prediction."""
    mean, std = cohort_stats(_numpy(b) for b in bags)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):  # one NaN tile made every prediction NaN
        for i, b in enumerate(bags):
            _check_finite(bags, i, b)
    std = np.where(std <= STD_FLOOR, np.float32(1.0), std).astype(np.float32)
    return torch.from_numpy(mean), torch.from_numpy(std)


def _check_finite(bags: Sequence[torch.Tensor], i: int, bag: torch.Tensor) -> None:
    """Refuse bag ``i`` in one line, naming its feature file, when some tile feature is NaN / inf."""
    if not bool(torch.isfinite(bag).all()):
        path = bags.path(i) if callable(getattr(bags, "path", None)) else None
        bad = int((~torch.isfinite(bag)).any(-1).sum()) if bag.ndim == 2 else -1
        raise GigaslideError(f"{bad} tile(s) have NaN/inf features" + ("" if path else f" (bag {i})"), path=path,
                             fix="re-encode that slide (the encoder overflowed: try fp32) or remove its file")


@contextlib.contextmanager
def _bag_memory(bags: Sequence[torch.Tensor], i: int, n_tiles: int, training: bool):  # noqa: ANN202
    """An allocation that fails on one bag (TransMIL's attention over 50,000 tiles asks for 40 GB) is one line naming
    the bag's file and its size, not a traceback from the allocator."""
    try:
        yield
    except RuntimeError as e:
        oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "can't allocate memory" in str(e) \
            or "out of memory" in str(e).lower()
        if not oom:
            raise
        path = bags.path(i) if callable(getattr(bags, "path", None)) else None
        first = str(e).splitlines()[0][-160:] if str(e) else type(e).__name__
        raise GigaslideError(f"out of memory on a bag of {n_tiles} tiles" + (" in training" if training else "")
                             + f" ({first})", path=path,
                             fix=("train with --max-tiles (e.g. 8192, or below the one given) or " if training
                                  else "use ")
                             + "a model whose memory grows linearly with the tiles (abmil, clam_sb, clam_mb; "
                             "TransMIL's attention grows with their square)") from None


def _build(cfg: TrainConfig, in_dim: int, n_classes: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> torch.nn.Module:
    model = build_model(cfg.model, in_dim, n_classes, hidden=cfg.hidden, dropout=cfg.dropout, **cfg.model_kwargs)
    if cfg.standardize:
        mean, std = stats if stats is not None else (torch.zeros(in_dim), torch.ones(in_dim))
        model = Standardized(model, mean, std)
    return model


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = 1):  # noqa: ANN201
    """MIL steps are tiny: on CPU one thread is fastest (several threads on a shared CPU are 10-100x slower)."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _cells_of(bags: Sequence[torch.Tensor], cells: Sequence[np.ndarray | None] | None) -> Callable[[int], Any]:
    """Bag ``i``'s grid positions: from ``cells``, else from the bags (a :class:`Bags` knows its files'), else None."""
    if cells is not None:
        return lambda i: cells[i]
    of = getattr(bags, "cells", None)
    return of if callable(of) else (lambda i: None)


def _cells_tensor(c: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if c is None else torch.as_tensor(np.asarray(c), dtype=torch.long, device=device)


@torch.no_grad()
def predict(model: torch.nn.Module, bags: Sequence[torch.Tensor], device: torch.device | None = None,
            bf16: bool = False, cells: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities [N, C] and per-tile scores (attention or instance score) of each bag. ``cells``: each
    bag's tiles on their slide's grid (:meth:`~gigaslide.features.store.FeatureFile.grid_cells`; default: the bags' own, if any)."""
    device = device or next(model.parameters()).device
    model.eval()
    probs, scores = [], []
    cells_of = _cells_of(bags, cells)
    with cpu_threads(device):
        for i, b in enumerate(bags):
            with _bag_memory(bags, i, len(b), False), autocast_ctx(device, "bf16" if bf16 else "auto"):
                out = model(b.to(device), cells=_cells_tensor(cells_of(i), device))
            if not bool(torch.isfinite(out["logits"]).all()):
                _check_finite(bags, i, b)  # the bag's features, rather than a diverged model
                # finite features: the weights are NaN/inf (a NaN model never recovers; its NaN predictions were
                # written as a finished fold, refused later as 'retrain', which deterministically diverged again)
                raise GigaslideError("the MIL model outputs NaN/inf on finite features: training diverged",
                                     fix="train with a lower --lr (e.g. 10x lower)")
            probs.append(torch.softmax(out["logits"].float(), -1).cpu().numpy())
            scores.append(out["instance_scores"].float().cpu().numpy())
    return np.stack(probs), scores


def _val_scores(model: torch.nn.Module, bags: Sequence[torch.Tensor], y: np.ndarray, device: torch.device,
                bf16: bool, cells: Sequence[np.ndarray | None] | None = None) -> tuple[float, float]:
    probs, _ = predict(model, bags, device, bf16, cells)
    loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-8)), torch.from_numpy(y)).item())
    return loss, auc_metric(y, probs)


def train_fold(bags_tr: Sequence[torch.Tensor], y_tr: np.ndarray, bags_va: Sequence[torch.Tensor], y_va: np.ndarray,
               in_dim: int, n_classes: int, cfg: TrainConfig, *, cells_tr: Sequence[np.ndarray | None] | None = None,
               cells_va: Sequence[np.ndarray | None] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``cfg.model``; returns the best model (on CPU) and its training history. ``cells_tr`` / ``cells_va``:
    each bag's tiles on their slide's grid, for models that see the layout (default: the bags' own, if any).
    Seeded with ``cfg.seed`` on streams of its own: the caller's torch / NumPy / Python RNG states are given back
    (its ``torch.manual_seed`` reset the caller's torch generator to the fold's seed: a notebook's later draws
    repeated after each call)."""
    with cpu_threads(pick_device(cfg.device)), isolated_rng():
        return _train_fold(bags_tr, y_tr, bags_va, y_va, in_dim, n_classes, cfg, cells_tr, cells_va)


def _train_fold(bags_tr: Sequence[torch.Tensor], y_tr: np.ndarray, bags_va: Sequence[torch.Tensor], y_va: np.ndarray,
                in_dim: int, n_classes: int, cfg: TrainConfig, cells_tr_: Sequence[np.ndarray | None] | None,
                cells_va: Sequence[np.ndarray | None] | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    cells_tr = _cells_of(bags_tr, cells_tr_)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    model = _build(cfg, in_dim, n_classes, feature_stats(bags_tr) if cfg.standardize else None)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(device, "bf16" if cfg.bf16 else "auto")  # fp16 (auto on GPUs without bf16): loss scaling
    w = class_weights(y_tr, n_classes).to(device)
    sel = Selection("max", patience=cfg.patience)
    best_state = None
    hist: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for step, i in enumerate(rng.permutation(len(bags_tr))):
            bag, cells = bags_tr[i], cells_tr(i)
            if epoch == 0 and not cfg.standardize:  # (standardising checks them all first, in feature_stats)
                _check_finite(bags_tr, i, bag)  # a NaN tile made the loss, then every weight, NaN: a silent NaN model
            if cfg.max_tiles and len(bag) > cfg.max_tiles:
                # in file order: TransMIL's PPEG reads the order as the layout
                keep = np.sort(rng.choice(len(bag), cfg.max_tiles, replace=False))
                bag, cells = bag[torch.from_numpy(keep)], (None if cells is None else np.asarray(cells)[keep])
            label = int(y_tr[i])
            with _bag_memory(bags_tr, i, len(bag), True):
                with autocast_ctx(device, "bf16" if cfg.bf16 else "auto"):
                    out = model(bag.to(device), label=label, cells=_cells_tensor(cells, device))
                # the class weight multiplies the bag's loss (cross_entropy(weight=) divides a batch of one bag by
                # that same weight: no effect)
                loss = w[label] * F.cross_entropy(out["logits"].float()[None], torch.tensor([label], device=device))
                if "instance_loss" in out:
                    loss = cfg.bag_weight * loss + (1 - cfg.bag_weight) * out["instance_loss"].float()
                value = float(loss.detach())
                if not math.isfinite(value) and not scaler.is_enabled():  # (fp16: the scaler skips that step)
                    # the features are finite (checked above): the weights diverged. Training on went on for every
                    # epoch left (without a validation split nothing looked at the model before the test slides)
                    path = bags_tr.path(i) if callable(getattr(bags_tr, "path", None)) else None
                    raise GigaslideError(f"the training loss is {value} at epoch {epoch}, step {step} (bag "
                                         f"{getattr(path, 'name', path) or i}): training diverged",
                                         fix="train with a lower --lr (e.g. 10x lower)")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += value
        rec = {"epoch": epoch, "train_loss": total / max(1, len(bags_tr))}
        if len(bags_va):
            vl, va = _val_scores(model, bags_va, y_va, device, cfg.bf16, cells_va)
            rec.update(val_loss=vl, val_auc=va)
            key = (-vl,) if cfg.monitor == "loss" else (np.nan_to_num(va, nan=0.0), -vl)
        else:
            key = (epoch,)  # no validation split: keep the last epoch
        hist.append(rec)
        if sel.update(key, epoch) or best_state is None:
            best_state = copy.deepcopy(model.state_dict())
        elif sel.stop and epoch + 1 >= cfg.min_epochs:
            break
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    return model, {"history": hist, "best_epoch": sel.best_epoch if sel.best_epoch is not None else 0, "epochs_run": len(hist),
                   "seconds": round(time.perf_counter() - t0, 3), "device": str(device)}


def save_model(fold_dir: str | os.PathLike, model: torch.nn.Module, cfg: TrainConfig, *, in_dim: int, n_classes: int,
               extra: dict[str, Any] | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (everything needed to rebuild the model)."""
    from safetensors.torch import save_file

    d = atomic.ensure_writable_dir(fold_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(d / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
    meta = provenance(kind="mil_model", **(extra or {}))
    meta.update(model=cfg.model, in_dim=in_dim, n_classes=n_classes, train_config=asdict(cfg))
    atomic.write_json(d / "config.json", meta)
    return d


def check_features_fit(meta: dict[str, Any], ff: Any, where: str | os.PathLike,
                       fix: str = "use features from the encoder the model was trained with") -> None:
    """Refuse a feature file a saved MIL model (``meta`` from :func:`load_model`) was not trained on."""
    if ff.dim != int(meta["in_dim"]):
        raise GigaslideError(f"features are {ff.dim}-d but the model was trained on {meta['in_dim']}-d features",
                             path=where, fix=fix)
    if meta.get("encoder") and ff.encoder and ff.encoder != meta["encoder"]:
        raise GigaslideError(f"features come from encoder '{ff.encoder}', the model from '{meta['encoder']}'",
                             path=where, fix=fix)
    w_model, w_feat = meta.get("encoder_weights_sha256"), ff.attrs.get("encoder_weights_sha256")
    if w_model and w_feat and str(w_feat) != str(w_model):  # same architecture, other weights: other features
        raise GigaslideError(f"features come from other weights of encoder '{ff.encoder or meta.get('encoder')}' "
                             f"({str(w_feat)[:16]}, the model's {str(w_model)[:16]})", path=where, fix=fix)
    mpp_model, mpp_feat = meta.get("mpp"), getattr(ff, "mpp", None)
    if mpp_model and mpp_feat and abs(float(mpp_feat) - float(mpp_model)) > 1e-6 * float(mpp_model):
        raise GigaslideError(f"features are at {float(mpp_feat):g} µm/px, the model was trained at "
                             f"{float(mpp_model):g} µm/px", path=where, fix="encode the slide at the model's --mpp")
    # tiles of another size see another field of view (train-mil refuses a cohort that mixes them: so here)
    size_model = meta.get("tile_size")
    size_feat = ff.attrs.get("tile_size", getattr(ff, "coords_attrs", {}).get("patch_size"))
    if size_model and size_feat and int(size_feat) != int(size_model):
        raise GigaslideError(f"features are of {int(size_feat)} px tiles, the model was trained on {int(size_model)} "
                             "px tiles", path=where, fix="encode the slide with the model's --tile-size")


def load_model(fold_dir: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a saved MIL model (safetensors only) and return it with its config."""
    from safetensors.torch import load_file

    d = Path(fold_dir)
    cfg_p, w_p = d / "config.json", d / "model.safetensors"
    if not cfg_p.is_file() or not w_p.is_file():
        raise GigaslideError("no trained MIL model here (config.json + model.safetensors)", path=d,
                             fix="pass RUN_DIR/foldK of a finished `gigaslide train-mil` run")
    refit = "pass the fold folder as `gigaslide train-mil` wrote it (or re-run train-mil: the fold is retrained)"
    try:
        meta = json.loads(cfg_p.read_text())
        tc = dict(meta["train_config"])
        cfg = TrainConfig(**{k: v for k, v in tc.items() if k in TrainConfig.__dataclass_fields__})
        in_dim, n_classes = int(meta["in_dim"]), int(meta["n_classes"])
        cfg.model_kwargs = dict(cfg.model_kwargs)
        for key in ("mpp", "tile_size"):  # compared with the features' (check_features_fit): numbers or absent
            if meta.get(key) is not None and not float(meta[key]) > 0:
                raise ValueError(f"{key} {meta[key]!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GigaslideError(f"not a MIL model's config.json ({type(e).__name__}: {str(e)[:120]})", path=cfg_p,
                             fix=refit) from None
    check_format(meta, cfg_p)  # written by a newer gigaslide: refused, not misread
    stored = _stored_shapes(w_p, refit)
    if cfg.model == "transmil" and "ppeg" not in cfg.model_kwargs and not any(".ppeg." in k or k.startswith("ppeg.")
                                                                               for k in stored):
        cfg.model_kwargs = {**cfg.model_kwargs, "ppeg": False}  # saved before TransMIL had its PPEG
    # the shapes config.json gives, without allocating them (a config.json saying in_dim 10^9 asked for 32 GB and
    # failed in the allocator, or filled the memory), against the tensors stored: one line where they differ
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in _build(cfg, in_dim, n_classes).state_dict().items()}
    except GigaslideError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise GigaslideError(f"config.json describes no model that can be built ({str(e)[:120]})", path=cfg_p,
                             fix=refit) from None
    if want != stored:
        k = next((k for k in sorted(set(want) | set(stored)) if want.get(k) != stored.get(k)))
        raise GigaslideError(f"model.safetensors does not hold the model config.json describes ({k}: "
                             f"{list(stored[k]) if k in stored else 'missing'} stored, "
                             f"{list(want[k]) if k in want else 'none'} expected)", path=d, fix=refit)
    with isolated_rng():  # its random initialisation, replaced by the weights, leaves the caller's stream alone
        model = _build(cfg, in_dim, n_classes)
    model.load_state_dict(load_file(str(w_p)))
    return model.eval(), meta


def _stored_shapes(path: Path, fix: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GigaslideError(f"model.safetensors cannot be read ({why})", path=path, fix=fix) from None

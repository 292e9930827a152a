"""Fine-tune evaluation of a tile encoder: the whole encoder plus a linear head trained end to end on
labelled tiles (Kang et al.'s second protocol), on all labels or a fraction of them (low-label).

For each label fraction the training folder's tiles are subsampled (stratified, at least two per
class), a stratified validation split is held out for model selection (lowest validation loss;
early stopping), and the selected model is tested on the test folder with the same metrics and
bootstrap 95 % CIs as the frozen probes (:mod:`gigaslide.evaluation.tiles`; test tiles resampled within each class),
so the rows of one ``report.md`` compare directly with ``gigaslide evaluate tiles``. A test folder that is, holds or
lies in the training folder, or shares a tile (same content) with it, is refused. Each fraction records the
fingerprint of the tiles it trained on (``train_fingerprint``): a comparison with a baseline that drew other tiles
for a fraction (another ``--seed``, ``--max-train`` or ``--train``) is refused, since the two would differ in their
labels as well as their encoders.

Layout of ``OUT``: ``report.{json,md,png}`` (with the test tiles' fingerprint), ``comparison.{md,json}`` when run
with a baseline (:func:`compare_runs`: paired against another run on the same test tiles), and one folder per
fraction (``fraction_10pct/``) with ``result.json`` (scores and the test predictions; reused when the settings and
the training tiles match -- a re-run resumes -- and predicted again from the finished model when the ``--test`` tiles
changed; another ``--bootstrap`` only re-draws the CIs), ``checkpoint/`` (the last epoch: model, optimiser and history,
:func:`gigaslide.runs.save_checkpoint`; an interrupted run continues from it), ``best.safetensors`` and
``encoder/`` (the fine-tuned encoder as an export folder that ``gigaslide encode`` and ``embed-tiles`` load).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from gigaslide import __version__, atomic, runs
from gigaslide.devices import autocast_ctx, grad_scaler, guard_bf16_convs, pick_device
from gigaslide.encoders import build_encoder
from gigaslide.encoders.model import export_encoder
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.evaluation import compare
from gigaslide.evaluation.compare import Diffs
from gigaslide.evaluation.metrics import METRICS, summarize
from gigaslide.evaluation.tiles import write_report
from gigaslide.features.tiles import read_tile
from gigaslide.locks import ItemLock, socket_safe_tempdir
from gigaslide.provenance import Provenance
from gigaslide.ssl.tile.augment import random_flip_rotate, random_stain_jitter, to_float
from gigaslide.ssl.tile.embed import warn_resized
from gigaslide.ssl.tile.session import clean_stale_temporaries
from gigaslide.ssl.tile.step import check_finite_gradient
from gigaslide.tiling.folders import file_digest, labelled_images, subsample, tiles_fingerprint

log = logging.getLogger("gigaslide.ssl.tile")
AUGMENTS = ("pathology", "none")
#: how a result's CIs were drawn (a result kept from another scheme has them drawn again from its test predictions)
BOOTSTRAP = "test tiles within each class"


@dataclass
class FinetuneConfig:
    fractions: tuple[float, ...] = (1.0,)  # label fractions, e.g. (0.01, 0.1, 1.0)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4  # encoder
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    patience: int = 3  # epochs without a lower validation loss before stopping
    augment: str = "pathology"  # flips, 90° rotations, light H&E stain jitter; or "none"
    max_train: int | None = None  # random subset of the training folder (before fractions)
    precision: str = "auto"
    device: str = "auto"
    workers: int = 1
    seed: int = 0
    n_bootstrap: int = 1000


def check_finetune_config(cfg: FinetuneConfig) -> None:
    """One line for a setting no fine-tuning can use, before any work: from the Python API a NaN weight decay, a
    NaN validation fraction, a batch size of 0, 0 epochs or a patience of 0, a negative seed, ``max_train`` or worker
    count were a bare ValueError / ZeroDivisionError / FileNotFoundError (no best model written), and a negative
    ``head_lr`` or a validation fraction of 2 trained without a word."""
    def bad(flag: str, v: Any, why: str, example: str) -> GigaslideError:
        return GigaslideError(f"{flag} {v!r} {why}", fix=f"use e.g. {flag} {example}")

    def finite(v: Any) -> bool:
        try:
            return math.isfinite(float(v))
        except (TypeError, ValueError):
            return False

    if cfg.augment not in AUGMENTS:
        raise GigaslideError(f"unknown augmentation '{cfg.augment}'", fix=f"use one of: {', '.join(AUGMENTS)}")
    for f in cfg.fractions:
        if not (finite(f) and 0 < float(f) <= 1):
            raise GigaslideError(f"label fraction {f} is outside (0, 1]", fix="use e.g. 0.01,0.1,1.0")
    for flag, v in (("--lr", cfg.lr), ("--head-lr", cfg.head_lr)):
        if not (finite(v) and float(v) > 0):
            raise bad(flag, v, "must be a positive number", "0.0001" if flag == "--lr" else "0.001")
    if not (finite(cfg.weight_decay) and float(cfg.weight_decay) >= 0):  # (no CLI flags: FinetuneConfig's names)
        raise bad("weight_decay", cfg.weight_decay, "must be a number >= 0", "0.0001")
    if not (finite(cfg.val_fraction) and 0 < float(cfg.val_fraction) < 1):
        raise bad("val_fraction", cfg.val_fraction, "must lie between 0 and 1", "0.2")
    for flag, v, lo, example in (("--epochs", cfg.epochs, 1, "10"), ("--batch-size", cfg.batch_size, 2, "64"),
                                 ("patience", cfg.patience, 1, "3"), ("--bootstrap", cfg.n_bootstrap, 0, "1000"),
                                 ("--workers", cfg.workers, 0, "1"), ("--seed", cfg.seed, 0, "0"),
                                 ("--max-train", 2 if cfg.max_train is None else cfg.max_train, 2, "1000")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) < 2**63:
            raise bad(flag, v, f"must be a whole number of at least {lo}", example)


class Classifier(nn.Module):
    """An :class:`~gigaslide.encoders.model.Encoder` and a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).float())


class TileImages(torch.utils.data.Dataset):
    """float [3, S, S] in [0, 1] at the encoder's input size, optionally augmented (seeded per epoch and index)."""

    def __init__(self, files: list[Path], labels: np.ndarray, size: int, augment: bool, seed: int):
        self.files, self.labels, self.size, self.augment, self.seed, self.epoch = files, labels, size, augment, seed, 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_float(torch.from_numpy(read_tile(self.files[i]).copy()))
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)[0]
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
            x = random_flip_rotate(x, g, 0.5, 0.5, True)
            if torch.rand((), generator=g) < 0.5:
                x = random_stain_jitter(x, g, sigma=0.03, bias=0.01).clamp(0.0, 1.0)
        return x.contiguous(), int(self.labels[i])


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified ``fraction`` of ``labels`` with at least two per class (train + validation)."""
    if not 0 < fraction <= 1:
        raise GigaslideError(f"label fraction {fraction} is outside (0, 1]", fix="use e.g. 0.01,0.1,1.0")
    rng = np.random.default_rng([seed, int(round(fraction * 1e6))])
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(len(idx), max(2, int(round(fraction * len(idx)))))
        keep.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(keep))


def _val_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) positions with at least one of each class on both sides."""
    rng = np.random.default_rng([seed, 7])
    tr, va = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_va = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        va.append(idx[:n_va])
        tr.append(idx[n_va:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def _loader(ds: TileImages, cfg: FinetuneConfig, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    if cfg.workers:
        socket_safe_tempdir()  # the workers hand batches back through sockets in multiprocessing's temp folder
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle, generator=g,
                                       num_workers=cfg.workers, persistent_workers=False)


@torch.no_grad()
def predict_tiles(model: Classifier, ds: TileImages, cfg: FinetuneConfig, device: torch.device) -> tuple[np.ndarray, float]:
    """(class probabilities [N, C], mean cross-entropy) of ``ds`` (no augmentation)."""
    model.eval()
    probs, loss_sum = [], 0.0
    for x, y in _loader(ds, cfg, shuffle=False):
        with autocast_ctx(device, cfg.precision):
            logits = model(x.to(device)).float()
        loss_sum += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        probs.append(logits.softmax(-1).cpu().numpy())
    return np.concatenate(probs), loss_sum / max(1, len(ds))


def run_key(cfg: FinetuneConfig, encoder: str, weights: str, n_train: int, train_tiles: str | None = None,
            weights_id: str | None = None) -> str:
    """What a fraction's result and checkpoint depend on (not the list of fractions or the worker count);
    ``train_tiles``: the fingerprint of the fraction's training + validation tiles (names, labels, content);
    ``weights_id``: the encoder's weights as built (``sha256:...``), so a re-exported ``RUN/encoder`` under the same
    path is fine-tuned again, not answered from the old weights' result."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("fractions", "workers")}
    extra = {"train_tiles": train_tiles} if train_tiles else {}
    if weights_id:
        extra["weights_id"] = weights_id
    return json.dumps({**d, "encoder": str(encoder), "weights": str(weights), "n_train": n_train, **extra},
                      sort_keys=True)


def same_training(stored: str | None, key: str) -> bool:
    """Whether a checkpoint / result made under ``stored`` trained the model ``key`` describes: the keys agree but
    for ``n_bootstrap`` (it only scores the test predictions). A key from before the training tiles were
    fingerprinted (or the encoder's weights hashed) is taken on its other settings, as it was then."""
    try:
        a, b = json.loads(stored or ""), json.loads(key)
    except (TypeError, ValueError):
        return False
    for d in (a, b):
        d.pop("n_bootstrap", None)
    for k in ("train_tiles", "weights_id"):  # keys made before these were recorded
        if k not in a:
            b.pop(k, None)
    return a == b


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Balanced cross-entropy weights ``n / (C * count_c)`` (0 for a class absent from ``y``)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return torch.tensor(np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0), dtype=torch.float32)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@runs.keeps_caller_rng
def finetune_fraction(encoder: str, weights: str, train: tuple[list[Path], np.ndarray], val: tuple[list[Path], np.ndarray],
                      test: tuple[list[Path], np.ndarray], n_classes: int, cfg: FinetuneConfig, run_dir: Path,
                      key: str | None = None, heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fine-tune one model on ``train``, select on ``val``, test on ``test``; resumes from ``run_dir/checkpoint``
    when it was made by the same training (``key``: :func:`run_key`, by default without the tiles' fingerprint);
    ``heartbeat`` is called after each epoch (the OUT folder's lock)."""
    check_finetune_config(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    enc = build_encoder(encoder, weights, seed=cfg.seed)
    model = Classifier(enc, n_classes).to(device)
    guard_bf16_convs(model)  # small tiles: CPU bf16 weight gradients of a conv strided past its input are wrong
    size = enc.spec.input_size
    ds_tr = TileImages(*train, size, cfg.augment == "pathology", cfg.seed)
    ds_va, ds_te = TileImages(*val, size, False, cfg.seed), TileImages(*test, size, False, cfg.seed)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": cfg.lr},
                             {"params": model.head.parameters(), "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    scaler = grad_scaler(device, cfg.precision)  # fp16: small gradients would underflow without loss scaling
    per_epoch = math.ceil(len(ds_tr) / cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, min(per_epoch, 50)
    weight = class_weights(train[1], n_classes).to(device)
    key = key or run_key(cfg, encoder, weights, len(ds_tr))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_val_loss": None, "best_epoch": None, "bad_epochs": 0,
                             "history": [], "key": key, "train_seconds": 0.0}
    ck = runs.load_checkpoint(run_dir) if runs.read_checkpoint_record(run_dir) is not None else None
    if ck is not None and same_training(ck["state"].get("key"), key):  # other settings: start over
        state = ck["state"]
        runs.load_module_state(model, ck["model"], runs.checkpoint_dir(run_dir))
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    best_file = run_dir / "best.safetensors"
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        model.train()
        ds_tr.epoch = state["epoch"]
        t0, seen, losses = time.perf_counter(), 0, []
        for x, y in _loader(ds_tr, cfg, shuffle=True, seed=cfg.seed * 1000 + state["epoch"]):
            if len(y) < 2:  # BatchNorm cannot train on a batch of one
                continue
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * _lr_factor(state["step"], total, warmup)
            x, y = x.to(device), y.to(device)
            with autocast_ctx(device, cfg.precision):
                loss = F.cross_entropy(model(x).float(), y, weight=weight)
            check_finite_loss(loss, f"epoch {state['epoch']} step {state['step']}", run_dir)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if not scaler.is_enabled():  # fp16's scaler skips a step with a non-finite gradient (and lowers its scale)
                check_finite_gradient(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                                    if p.grad is not None]),
                                      f"epoch {state['epoch']} step {state['step']}", loss, run_dir)
            scaler.step(opt)
            scaler.update()
            state["step"] += 1
            seen += len(y)
            losses.append(loss.item())
        state["train_seconds"] += time.perf_counter() - t0
        p_va, val_loss = predict_tiles(model, ds_va, cfg, device)
        if not math.isfinite(val_loss):  # not kept as the best model, nor tested: a NaN encoder and NaN metrics
            raise GigaslideError(f"the validation loss became {val_loss} after epoch {state['epoch']}", path=run_dir,
                                 fix="lower --lr; the last good checkpoint is kept and a re-run resumes from it")
        state["history"].append({"epoch": state["epoch"], "train_loss": float(np.mean(losses)) if losses else None,
                                 "val_loss": val_loss, "val_balanced_accuracy": METRICS["balanced_accuracy"](val[1], p_va),
                                 "images_per_s": round(seen / max(1e-9, time.perf_counter() - t0), 1)})
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_epoch=state["epoch"], bad_epochs=0)
            with atomic.atomic_path(best_file, suffix=".safetensors") as tmp:
                save_file({k: v.cpu().contiguous() for k, v in runs.module_state(model).items()}, str(tmp))
        else:
            state["bad_epochs"] += 1
        state["epoch"] += 1
        runs.save_checkpoint(run_dir, {"model": runs.module_state(model), "optimizer": opt.state_dict(), "state": state,
                                       "scaler": scaler.state_dict()})
        if heartbeat is not None:  # the folder's lock stays fresh for processes on other hosts
            heartbeat()
    sd = load_file(str(best_file), device="cpu")
    model.load_state_dict({k: v for k, v in sd.items() if "::" not in k})
    spec = dataclasses.replace(enc.spec, name=f"{enc.spec.name}_finetuned", hub=None,
                               weight_source=f"gigaslide evaluate finetune of {encoder} on {len(train[1])} labelled tiles")
    # the fine-tuned encoder names what it was made from: the encoder and weights it started from, the tiles it
    # trained on (the fingerprint of its training + validation tiles, in the key), seed and epochs
    prov = Provenance(kind="encoder", seed=cfg.seed, tile_size=spec.input_size, mpp=spec.native_mpp, encoder=spec.name,
                      run=str(Path(run_dir).resolve()),
                      extra={"gigaslide": __version__, "run_kind": "tile_finetune", "base_encoder": str(encoder),
                             "base_weights": enc.weights_id, "train_tiles": _train_tiles(key),
                             "n_train": len(train[1]), "n_val": len(val[1]), "epochs_run": state["epoch"],
                             "best_epoch": state["best_epoch"]})
    export_encoder(run_dir / "encoder", model.encoder.trunk, spec, provenance=prov.to_dict())
    probs, _ = predict_tiles(model, ds_te, cfg, device)
    ips = [h["images_per_s"] for h in state["history"]]
    return {**summarize(test[1], probs, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, strata=test[1]),
            "n_labels": len(train[1]) + len(val[1]),
            "n_train": len(train[1]), "n_val": len(val[1]), "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"], "train_seconds": round(state["train_seconds"], 1),
            "train_images_per_s": round(float(np.median(ips)), 1) if ips else None, "history": state["history"],
            "key": key, "test_probs": probs.tolist(), "bootstrap": BOOTSTRAP}


def _train_tiles(key: str) -> str | None:
    """The training tiles' fingerprint a :func:`run_key` holds (None for a key made without it)."""
    try:
        return json.loads(key).get("train_tiles")
    except (TypeError, ValueError, AttributeError):
        return None


def _folder(path: str | os.PathLike, role: str) -> tuple[list[Path], np.ndarray, list[str]]:
    files, labels, classes = labelled_images(path)
    if labels is None:
        raise GigaslideError(f"{role} folder has no class sub-folders", path=path,
                             fix="put the tiles of each class in their own sub-folder")
    return files, labels, classes


@runs.keeps_caller_rng
def finetune_tiles(train_folder: str | os.PathLike, test_folder: str | os.PathLike, encoder: str,
                   out: str | os.PathLike, *, weights: str = "default", cfg: FinetuneConfig | None = None) -> dict[str, Any]:
    """Fine-tune ``encoder`` at each label fraction of ``cfg`` and write ``out/report.{json,md,png}``.

    Returns the report plus ``test_probs`` (protocol -> [n_test, n_classes] predicted probabilities, also kept in each
    fraction's ``result.json``) and ``test_labels``, so two encoders can be compared paired on the same test tiles
    (:func:`compare_reports`)."""
    cfg = cfg or FinetuneConfig()
    check_finetune_config(cfg)
    files, labels, classes = _folder(train_folder, "training")
    te_files, te_labels, te_classes = _folder(test_folder, "test")
    if te_classes != classes:
        raise GigaslideError(f"test classes {te_classes} differ from training classes {classes}", path=test_folder,
                             fix="use the same class sub-folder names in both folders")
    if len(classes) < 2:
        raise GigaslideError("training tiles have a single class", path=train_folder, fix="use a tile folder with at least two classes")
    if cfg.max_train:
        files, labels = subsample(files, labels, limit=cfg.max_train, seed=cfg.seed)
    te_digests = [file_digest(f) for f in te_files]
    _check_no_leak(train_folder, files, test_folder, te_files, te_digests)
    probe = build_encoder(encoder, weights, seed=cfg.seed)  # fail early on a bad encoder / weights
    enc_info = {"encoder": probe.spec.name, "encoder_weights": probe.weights_id, "dim": probe.embed_dim}
    warn_resized(files[0], probe.spec)
    del probe
    out = atomic.ensure_writable_dir(out)
    lock = ItemLock(out, ".finetune")  # two processes on one OUT wrote each other's checkpoint files
    if not lock.acquire():
        raise GigaslideError(f"the folder is in use by {lock.describe()} (another fine-tune run writes it)", path=out,
                             fix="wait for it to finish (or stop it), then re-run to resume; or choose another --out")
    try:
        return _finetune_locked(files, labels, classes, te_files, te_labels, te_digests, train_folder, test_folder,
                                encoder, out, weights, cfg, enc_info, lock)
    finally:
        lock.release()


def _finetune_locked(files: list[Path], labels: np.ndarray, classes: list[str], te_files: list[Path],
                     te_labels: np.ndarray, te_digests: list[bytes], train_folder: str | os.PathLike,
                     test_folder: str | os.PathLike, encoder: str, out: Path, weights: str, cfg: FinetuneConfig,
                     enc_info: dict[str, Any], lock: ItemLock) -> dict[str, Any]:
    """:func:`finetune_tiles` once it holds ``out``'s lock."""
    n_classes = len(classes)
    report: dict[str, Any] = {
        "train": {"path": str(train_folder), **enc_info, "n": len(labels),
                  "class_counts": np.bincount(labels, minlength=n_classes).tolist()},
        "test": {"path": str(test_folder), "n": len(te_labels),
                 "class_counts": np.bincount(te_labels, minlength=n_classes).tolist(),
                 "fingerprint": tiles_fingerprint(Path(test_folder), te_files, te_labels, te_digests)},
        "classes": classes, "n_classes": n_classes, "n_bootstrap": cfg.n_bootstrap, "seed": cfg.seed,
        "config": dataclasses.asdict(cfg), "protocols": {}}
    probs: dict[str, np.ndarray] = {}  # per protocol, for paired comparisons on the same test tiles
    for frac in cfg.fractions:
        name = f"finetune_{frac * 100:g}%"
        run_dir = atomic.ensure_writable_dir(_fraction_dir(out, name))
        clean_stale_temporaries(run_dir)  # what a killed run left (best.safetensors, checkpoint/, encoder/)
        sub = label_subset(labels, frac, cfg.seed)
        tr, va = _val_split(labels[sub], cfg.val_fraction, cfg.seed)
        tr, va = sub[tr], sub[va]
        result_file = run_dir / "result.json"
        res = json.loads(result_file.read_text()) if result_file.is_file() else None
        used = sorted(np.concatenate([tr, va]).tolist())
        train_fp = tiles_fingerprint(Path(train_folder), [files[i] for i in used], labels[used])
        key = run_key(cfg, encoder, weights, len(tr), train_fp, enc_info["encoder_weights"])
        if (res is None or not same_training(res.get("key"), key) or "test_probs" not in res
                or res.get("test_fingerprint") != report["test"]["fingerprint"]):
            # a finished checkpoint of the same training (a result from before test predictions or the test tiles'
            # fingerprint were kept, or one tested on another --test folder) only predicts the test tiles again
            res = finetune_fraction(encoder, weights, ([files[i] for i in tr], labels[tr]), ([files[i] for i in va], labels[va]),
                                    (te_files, te_labels), n_classes, cfg, run_dir, key=key, heartbeat=lock.refresh)
            res["test_fingerprint"] = report["test"]["fingerprint"]
            atomic.write_json(result_file, res)
        elif res.get("key") != key or res.get("bootstrap") != BOOTSTRAP:  # only --bootstrap (or how CIs are drawn)
            # differs: the same predictions, their CIs drawn again
            res.update(summarize(te_labels, np.asarray(res["test_probs"]), n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                 strata=te_labels),
                       key=key, bootstrap=BOOTSTRAP)
            atomic.write_json(result_file, res)
        report["protocols"][name] = {k: v for k, v in res.items()
                                     if k not in ("history", "key", "test_probs", "test_fingerprint", "bootstrap")}
        report["protocols"][name]["train_fingerprint"] = train_fp
        probs[name] = np.asarray(res["test_probs"], dtype=np.float32)
    write_report(report, out)
    return {**report, "test_probs": probs, "test_labels": np.asarray(te_labels)}


def _check_no_leak(train_folder: str | os.PathLike, files: list[Path], test_folder: str | os.PathLike,
                   te_files: list[Path], te_digests: list[bytes]) -> None:
    """Refuse, in one line, test tiles that are training tiles: one folder in the other, or a shared file content."""
    fix = "test on a tile folder apart from the training folder (e.g. pcam/valid for pcam/train)"
    a, b = Path(train_folder).resolve(), Path(test_folder).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise GigaslideError(f"the test folder {'is' if a == b else 'overlaps'} the training folder {train_folder}",
                             path=test_folder, fix=fix)
    where = {d: f for f, d in zip(te_files, te_digests)}
    for f in files:
        hit = where.get(file_digest(f))
        if hit is not None:
            raise GigaslideError(f"test tile {Path(hit).relative_to(test_folder).as_posix()} is also a training tile "
                                 f"({Path(f).relative_to(train_folder).as_posix()}, same content)", path=test_folder,
                                 fix=fix)


def _fraction_dir(out: Path, protocol: str) -> Path:
    """``finetune_10%`` -> ``out/fraction_10pct`` (``finetune_0.5%`` -> ``fraction_0p5pct``)."""
    return out / f"fraction_{protocol.removeprefix('finetune_').removesuffix('%')}pct".replace(".", "p")


def saved_predictions(out: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A finished ``evaluate finetune`` folder's ``report.json`` and its test predictions per protocol."""
    out = Path(out)
    fix = "pass the --out folder of a finished `gigaslide evaluate finetune` run (re-run it to add missing predictions)"
    try:
        report = json.loads((out / "report.json").read_text())
        probs = {name: np.asarray(json.loads((_fraction_dir(out, name) / "result.json").read_text())["test_probs"],
                                  dtype=np.float32) for name in report["protocols"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise GigaslideError("no fine-tune report with test predictions here", path=out, fix=fix) from None
    if not report.get("test", {}).get("fingerprint"):
        raise GigaslideError("this fine-tune report does not record its test tiles", path=out,
                             fix="re-run that fine-tune with its own settings (finished fractions are reused, not "
                                 "re-trained); it then records them")
    return report, probs


def check_baseline(baseline: str | os.PathLike, test_folder: str | os.PathLike,
                   cfg: FinetuneConfig | None = None) -> None:
    """Refuse, before any training, a ``baseline`` that is no finished fine-tune run, was tested on other tiles
    than ``test_folder``'s, or (``cfg``) drew its label fractions with another seed or ``max_train`` (one line)."""
    base, _ = saved_predictions(baseline)
    old = base.get("config") or {}
    for k in ("seed", "max_train"):
        if cfg is not None and k in old and old[k] != getattr(cfg, k):
            raise GigaslideError(f"the baseline drew its label fractions with {k}={old[k]}, this run with "
                                 f"{getattr(cfg, k)}", path=baseline,
                                 fix=f"fine-tune both with the same --{k.replace('_', '-')}")
    files, labels, _ = _folder(test_folder, "test")
    compare.check_same_tiles(tiles_fingerprint(Path(test_folder), files, labels), base, path=baseline, fix=_FIX_TILES)


_FIX_TILES = "compare fine-tune runs on the same --test folder"


def compare_reports(report: dict[str, Any], base: dict[str, Any], *, n_bootstrap: int = 1000, seed: int = 0,
                    path: str | os.PathLike | None = None) -> Diffs:
    """``report`` minus ``base`` (both as :func:`finetune_tiles` returns them), paired on the same test tiles, per
    label fraction both have (:func:`gigaslide.evaluation.compare.compare_reports`). Refused when the two runs
    were tested on other tiles, or trained a shared fraction on other tiles (``train_fingerprint``: another label
    draw; ``path``: the baseline's folder, for the message)."""
    compare.check_same_tiles(report["test"].get("fingerprint"), base, path=path, fix=_FIX_TILES)
    check_same_draws(report, base, path=path)
    return compare.compare_reports(report, base, path=path, n_bootstrap=n_bootstrap, seed=seed,
                                   fix_tiles=_FIX_TILES,
                                   fix_protocols="fine-tune the baseline at the same --fractions")


def check_same_draws(report: dict[str, Any], base: dict[str, Any], *, path: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, a baseline that fine-tuned a label fraction of this run on other training tiles."""
    for name, r in report["protocols"].items():
        b = base["protocols"].get(name)
        if b is None or not r.get("train_fingerprint"):
            continue
        if not b.get("train_fingerprint"):
            raise GigaslideError(f"the baseline does not record which tiles {name} trained on", path=path,
                                 fix="re-run the baseline with its own settings (finished fractions are reused)")
        if b["train_fingerprint"] != r["train_fingerprint"]:
            raise GigaslideError(f"{name} of the baseline trained on other tiles (another label draw: --seed, "
                                 f"--max-train or --train differ)", path=path,
                                 fix="fine-tune both with the same --train, --seed and --max-train")


def compare_runs(report: dict[str, Any], baseline: str | os.PathLike, *, n_bootstrap: int = 1000,
                 seed: int = 0) -> Diffs:
    """:func:`compare_reports` against the finished fine-tune run in folder ``baseline``."""
    base, base_probs = saved_predictions(baseline)
    return compare_reports(report, {**base, "test_probs": base_probs, "test_labels": report["test_labels"]},
                           n_bootstrap=n_bootstrap, seed=seed, path=baseline)


__all__ = ["AUGMENTS", "Classifier", "FinetuneConfig", "check_baseline", "check_finetune_config", "check_same_draws",
           "compare_reports", "compare_runs", "finetune_fraction", "finetune_tiles", "label_subset", "predict_tiles",
           "saved_predictions"]

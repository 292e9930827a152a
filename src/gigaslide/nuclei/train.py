"""``nuclei-train``: HoVer-Net-style training on annotated images, standing on :mod:`gigaslide.runs`.

The run folder holds ``run.json`` (identity, inputs fingerprints), ``split.csv`` (the fixed,
organ-stratified train / val / test split by image), ``checkpoint/`` (last and best epochs,
pickle-free) and, when finished, ``model/`` (``model.safetensors`` + ``model.json`` with provenance; GeoJSON
class names, numbered 1..T in sorted order over all the data set's annotation files, are stored as the
spec's ``type_names``, which slide outputs show and evaluation reads ground truth with).
Each epoch is ``steps_per_epoch`` batches of random crops (flips, rot90, H&E stain jitter, mild blur,
all from :mod:`gigaslide.ssl.tile.augment` with a generator seeded by (seed, epoch, step, sample));
a kill -9 resumes bit-exactly from the last finished epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic, runs
from gigaslide.devices import autocast_ctx, choose_precision, grad_scaler, guard_bf16_convs, pick_device
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.nuclei.data import (Item, check_resolution, dataset_type_codes, find_pairs, hv_maps, load_item,
                                   make_split, read_organs, read_split, subset_fraction, type_map, write_split)
from gigaslide.nuclei.evaluate import score_items
from gigaslide.nuclei.infer import MODEL_DIR, MODEL_JSON, MODEL_WEIGHTS
from gigaslide.nuclei.losses import hovernet_loss
from gigaslide.nuclei.metrics import image_mean
from gigaslide.nuclei.model import MODEL_FORMAT, HoVerNet, ModelSpec
from gigaslide.nuclei.postprocess import PostParams
from gigaslide.provenance import provenance
from gigaslide.ssl.tile.augment import random_blur, random_flip_rotate, random_stain_jitter


@dataclass
class NucleiTrainConfig:
    images: str
    annotations: str
    out: str
    mpp: float = 0.25
    backbone: str = "resnet18"
    weights: str = "default"  # default (export's own / hub cache) | random | PATH
    freeze_encoder: bool = False
    fraction: float = 1.0
    epochs: int | None = None
    budget_s: float | None = None
    steps_per_epoch: int = 50
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-5
    select: str = "pq"  # pq (validation PQ, max) | loss (training loss, min)
    patience: int | None = None
    image_mpp: float | None = None
    organs: str | None = None
    split: str | None = None  # CSV image_id,split to use instead of the computed one
    test_frac: float = 0.3
    val_frac: float = 0.15
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    stop_after_epochs: int | None = None  # stop this invocation after N epochs, as if interrupted (tests)

    def identity(self) -> dict[str, Any]:
        keys = ("mpp", "backbone", "weights", "freeze_encoder", "fraction", "steps_per_epoch", "batch_size", "crop",
                "lr", "weight_decay", "select", "image_mpp", "test_frac", "val_frac", "seed")
        return {k: getattr(self, k) for k in keys}


def _weights_file(backbone: str, weights: str) -> str | None:
    from gigaslide.encoders.model import EXPORT_SPEC, EXPORT_WEIGHTS

    if weights not in ("default", "random", None):
        return weights
    if weights == "default" and (Path(backbone) / EXPORT_SPEC).is_file():
        return str(Path(backbone) / EXPORT_WEIGHTS)
    return None


def sample_batch(items: list[Item], n: int, crop: int, rng: np.random.Generator, seed: int, epoch: int, step: int,
                 n_types: int) -> tuple[torch.Tensor, ...]:
    """``n`` augmented crops: image [n,3,c,c] in [0,1], NP [n,c,c], HV [n,2,c,c], NC [n,c,c]."""
    areas = np.array([it.image.shape[0] * it.image.shape[1] for it in items], np.float64)
    xs, nps, hvs, ncs = [], [], [], []
    for k in range(n):
        it = items[int(rng.choice(len(items), p=areas / areas.sum()))]
        h, w = it.inst.shape
        y0 = int(rng.integers(0, max(1, h - crop + 1)))
        x0 = int(rng.integers(0, max(1, w - crop + 1)))
        img = np.full((crop, crop, 3), 255, np.uint8)
        inst = np.zeros((crop, crop), np.int32)
        ph, pw = min(crop, h - y0), min(crop, w - x0)
        img[:ph, :pw] = it.image[y0:y0 + ph, x0:x0 + pw]
        inst[:ph, :pw] = it.inst[y0:y0 + ph, x0:x0 + pw]
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 10_007 + step * 101 + k)
        stack = torch.cat([torch.from_numpy(img).permute(2, 0, 1).float() / 255.0,
                           torch.from_numpy(inst).float()[None]])  # ids < 2^24 are exact in float32
        stack = random_flip_rotate(stack, g, 0.5, 0.5, True)
        x = random_stain_jitter(stack[:3].contiguous(), g, sigma=0.05, bias=0.02)
        if float(torch.rand(1, generator=g)) < 0.2:
            x = random_blur(x, g, (0.1, 1.0))
        inst_a = stack[3].round().to(torch.int64).numpy().astype(np.int32)
        xs.append(x.clamp(0, 1))
        nps.append(torch.from_numpy((inst_a > 0).astype(np.int64)))
        hvs.append(torch.from_numpy(hv_maps(inst_a)))
        ncs.append(torch.from_numpy(type_map(inst_a, it.types) if n_types else np.zeros(inst_a.shape, np.int64)))
    return torch.stack(xs), torch.stack(nps), torch.stack(hvs), torch.stack(ncs)


def _load_items(cfg: NucleiTrainConfig) -> tuple[dict[str, list[Item]], dict[str, str], dict[str, str], list[str],
                                                 dict[str, int]]:
    """(items by part, split record, organs, problems, class name -> type): GeoJSON classes are numbered over every
    annotation file of the data set (test images included), so a class is one type in all of them."""
    pairs, problems = find_pairs(cfg.images, cfg.annotations)
    codes = dataset_type_codes(pairs)
    organs = read_organs(cfg.images, cfg.organs)
    out_split = Path(cfg.out) / "split.csv"
    recorded = read_split(out_split) if out_split.is_file() else {}
    if cfg.split:
        split = read_split(Path(cfg.split))
        was, new = ({k: "train" if v == "unused" else v for k, v in d.items()} for d in (recorded, split))
        if recorded and new != was:  # the run's model trained and selected on the recorded images: another split
            # rewrote split.csv and model.json's image lists, and nuclei-eval scored training images as test images
            moved = sorted(k for k in set(new) | set(was) if new.get(k) != was.get(k))
            raise GigaslideError(f"--split {cfg.split} differs from the run's split.csv for {len(moved)} image(s) "
                                 f"(e.g. {moved[0]}: {was.get(moved[0], 'absent')} -> {new.get(moved[0], 'absent')})",
                                 path=out_split, fix="give the run's own split (or leave --split out to keep it), or "
                                                     "train with the new split into a new --out folder")
    elif recorded:  # the run's own split ("unused": train images left out by --fraction)
        split = {k: "train" if v == "unused" else v for k, v in recorded.items()}
    else:
        split = make_split([p.id for p in pairs], organs, cfg.seed, cfg.test_frac, cfg.val_frac)
    train_ids = [p.id for p in pairs if split.get(p.id) == "train"]
    if not train_ids:
        raise GigaslideError("no training image in the split", path=cfg.images, fix="give more images or a --split CSV")
    chosen = set(subset_fraction(train_ids, organs, cfg.fraction, cfg.seed))
    if recorded and {k for k, v in recorded.items() if v in ("train", "unused")} == set(train_ids):
        chosen = {k for k, v in recorded.items() if v == "train"}  # a resumed run keeps the images it started with
    items: dict[str, list[Item]] = {"train": [], "val": []}
    for p in pairs:
        part = split.get(p.id)
        if part == "train" and p.id not in chosen:
            continue
        if part not in ("train", "val"):
            continue
        try:
            items[part].append(load_item(p, cfg.mpp, cfg.image_mpp, organs.get(p.id, ""), codes, problems))
        except GigaslideError as e:
            if "coarser" in e.what:
                raise
            problems.append(e.one_line())
    if not items["train"]:
        raise GigaslideError("no training image could be read", path=cfg.images, fix="; ".join(problems[:2]) or None)
    used = {i.id for i in items["train"]}
    split_rec = {i: ("train" if i in used else "unused" if s == "train" else s) for i, s in split.items()}
    return items, split_rec, organs, problems, codes


def _build(cfg: NucleiTrainConfig, n_types: int, type_names: dict[str, str]) -> tuple[HoVerNet, ModelSpec]:
    from gigaslide.encoders import build_encoder

    enc = build_encoder(cfg.backbone, weights=cfg.weights, seed=cfg.seed)
    spec = ModelSpec(backbone=asdict(enc.spec), backbone_source=cfg.backbone, backbone_weights=enc.weights_id, mpp=cfg.mpp,
                     n_types=n_types, type_names=type_names, postprocess=PostParams().to_dict(), crop=cfg.crop)
    torch.manual_seed(cfg.seed)
    model = HoVerNet(spec, trunk=enc.trunk.train())
    if cfg.freeze_encoder:
        model.freeze_encoder()
    return model, spec


def export_model(run: runs.Run, model: HoVerNet, spec: ModelSpec, extra: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    d = atomic.ensure_writable_dir(run.dir / MODEL_DIR)
    sd = {k: v.detach().cpu().contiguous() for k, v in runs.module_state(model).items()}
    with atomic.atomic_path(d / MODEL_WEIGHTS, suffix=".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": MODEL_FORMAT})  # one key: the same bytes every save
        # (safetensors writes several metadata keys in hash-map order); the backbone is in MODEL_JSON
    prov = provenance("nuclei-model", mpp=spec.mpp, encoder=spec.encoder_spec.name,
                      encoder_weights_sha256=spec.backbone_weights, seed=run.record.get("seed"), run=str(run.dir),
                      weights_sha256=runs.file_sha256(d / MODEL_WEIGHTS), **extra)
    atomic.write_json(d / MODEL_JSON, {"format": MODEL_FORMAT, "spec": spec.to_dict(), "provenance": prov})
    return d


def train_nuclei(cfg: NucleiTrainConfig, progress=None) -> dict[str, Any]:  # noqa: ANN001
    """Train (or resume) a nuclei run; returns its summary. The caller's Python / NumPy / torch random streams are
    left as they were (:func:`gigaslide.runs.isolated_rng`): training seeds torch with ``cfg.seed`` and a resume sets
    the checkpoint's streams, which reset a notebook's own stream."""
    with runs.isolated_rng():
        return _train_nuclei(cfg, progress)


def _train_nuclei(cfg: NucleiTrainConfig, progress=None) -> dict[str, Any]:  # noqa: ANN001, C901
    if cfg.epochs is None and cfg.budget_s is None:
        cfg.epochs = 20
    if cfg.epochs is not None and cfg.epochs < 1:
        raise GigaslideError(f"--epochs {cfg.epochs} must be at least 1")
    if cfg.crop % 32:
        raise GigaslideError(f"--crop {cfg.crop} must be a multiple of 32", fix="use e.g. --crop 256")
    if cfg.select not in ("pq", "loss"):
        raise GigaslideError(f"--select {cfg.select}", fix="use pq or loss")
    check_resolution(cfg.mpp, "--mpp")
    check_resolution(cfg.image_mpp, "--image-mpp")
    items, split, organs, problems, codes = _load_items(cfg)
    types = [t for it in items["train"] for t in (it.types or {}).values()]
    n_types = max(int(max(types)) if types else 0, max(codes.values(), default=0))
    wfile = _weights_file(cfg.backbone, cfg.weights)
    run = runs.open_run(cfg.out, "nuclei", cfg.identity(), asdict(cfg), seed=cfg.seed,
                        inputs={"images": cfg.images, "annotations": cfg.annotations, "backbone weights": wfile},
                        provenance={"mpp": cfg.mpp, "encoder": cfg.backbone})
    write_split(run.dir / "split.csv", split, organs)
    model, spec = _build(cfg, n_types, {str(c): n for n, c in codes.items()})
    dev = pick_device(cfg.device)
    model = model.to(dev).to(memory_format=torch.channels_last)
    guard_bf16_convs(model)  # --precision bf16 on CPU: weight gradients of a conv strided past its input are wrong
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    val_nuclei = sum(int(it.inst_orig.max(initial=0) > 0) for it in items["val"])
    if cfg.select == "pq" and items["val"] and not val_nuclei:  # PQ is 0 / 0 on images without a nucleus: every
        # epoch's validation PQ was undefined, stood in for by -1, and the first epoch was kept whatever followed
        problems.append(f"no validation image has an annotated nucleus ({len(items['val'])} images): the best epoch "
                        "is selected by training loss (give validation images with nuclei to select by PQ)")
    sel = runs.Selection("max" if cfg.select == "pq" and val_nuclei else "min", patience=cfg.patience)
    epoch, elapsed, history, done = 0, 0.0, [], False
    prec = choose_precision(dev, cfg.precision)  # training: no forward probe: auto is fp32 on CPU (gigaslide.devices)
    scaler = grad_scaler(dev, prec.resolved)  # fp16 (auto on GPUs without native bf16): loss scaling
    ck = run.load()
    if ck:
        runs.load_module_state(model, ck["model"], run.dir)
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        runs.set_rng_state(ck["rng"])
        rng.bit_generator.state = ck["gen"]
        epoch, elapsed, history, done = ck["epoch"], ck["elapsed"], list(ck["history"]), ck["done"]
        sel = runs.Selection.from_state(ck["selection"])
    stop_reason = None
    with runs.Stopper(cfg.budget_s, elapsed) as stopper:
        while not done:
            model.train()
            losses, t0, stop_reason = [], time.perf_counter(), None
            for step in range(cfg.steps_per_epoch):
                stop_reason = stopper.reason()
                if stop_reason:
                    break
                x, np_t, hv_t, nc_t = (t.to(dev) for t in sample_batch(items["train"], cfg.batch_size, cfg.crop, rng,
                                                                        cfg.seed, epoch, step, n_types))
                with autocast_ctx(dev, prec.resolved):
                    out = model(x)
                loss, parts = hovernet_loss(out, np_t, hv_t, nc_t if n_types else None)
                check_finite_loss(loss, f"epoch {epoch} step {step}", run.dir)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
                if progress:
                    progress(f"epoch {epoch + 1} loss {np.mean(losses):.3f}", step + 1, cfg.steps_per_epoch)
            if stop_reason == "budget" and not losses and history:
                # the budget ran out between epochs (in the last one's validation): the epochs done are the run --
                # it was left "stopped" without a model, and every re-run stopped again at once
                done = True
                run.save({**run.load(), "done": True})
                break
            if stop_reason in ("signal", "interrupt") or not losses:
                break  # the partial epoch is dropped: a re-run repeats it bit-exactly
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                   "seconds": round(time.perf_counter() - t0, 2)}
            if items["val"]:
                model.eval()
                st = score_items(model, items["val"], prec.resolved)
                rec.update(val_pq=image_mean(st, "pq"), val_dice=image_mean(st, "dice"), val_aji=image_mean(st, "aji"))
            value = rec.get("val_pq", float("nan")) if sel.mode == "max" else rec["train_loss"]
            value = -1.0 if sel.mode == "max" and math.isnan(value) else value
            rec = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}  # JSON null
            improved = sel.update(value, epoch)
            history.append(rec)
            epoch += 1
            done = (cfg.epochs is not None and epoch >= cfg.epochs) or sel.stop or stop_reason == "budget"
            if improved:
                run.save({"model": runs.module_state(model), "epoch": epoch - 1}, name="best")
            run.save({"model": runs.module_state(model), "optimizer": opt.state_dict(), "rng": runs.rng_state(),
                      "scaler": scaler.state_dict(), "gen": rng.bit_generator.state, "epoch": epoch,
                      "elapsed": stopper.elapsed, "history": history,
                      "selection": sel.state(), "done": done})
            if cfg.stop_after_epochs is not None and len(history) >= cfg.stop_after_epochs and not done:
                stop_reason = "stop_after_epochs"
                break
            if stopper.reason() in ("signal", "interrupt"):
                stop_reason = stopper.reason()
                break
    summary: dict[str, Any] = {"epochs": epoch, "best_epoch": sel.best_epoch, "selection": cfg.select if sel.mode == "max" else "loss",
                               "best_value": sel.best, "precision": prec.record(), "train_images": len(items["train"]),
                               "val_images": len(items["val"]), "problems": problems, "history": history}
    if not done:
        run.update(status="stopped", stop_reason=stop_reason)
        return {**summary, "status": "stopped", "stop_reason": stop_reason}
    best = run.load("best")
    if best is not None:
        runs.load_module_state(model, best["model"], run.dir)
    d = export_model(run, model.cpu(), spec, {"best_epoch": sel.best_epoch, "selection": summary["selection"],
                                              "train_images": sorted(i.id for i in items["train"]),
                                              "val_images": sorted(i.id for i in items["val"]),
                                              "freeze_encoder": cfg.freeze_encoder, "fraction": cfg.fraction,
                                              "backbone_source": cfg.backbone})
    summary["model"] = str(d)
    run.finish(**{k: v for k, v in summary.items() if k != "history"})
    run.update(history=history)
    return {**summary, "status": "finished"}


__all__ = ["NucleiTrainConfig", "export_model", "sample_batch", "train_nuclei"]

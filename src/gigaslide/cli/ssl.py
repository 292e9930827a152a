"""CLI commands of the tile-level SSL stage: ``pretrain``, ``embed-tiles`` and ``evaluate finetune``."""

from __future__ import annotations

import json
import re
import sys

from gigaslide.cli.main import Command
from gigaslide.errors import GigaslideError


def parse_duration(text: str | float | int | None) -> float | None:
    """``2h``, ``15m``, ``90s``, ``1h30m`` or plain seconds -> seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", s)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", "", s).strip():
        raise GigaslideError(f"cannot read duration '{text}'", fix="use e.g. 2h, 15m, 90s or 1h30m")
    mult = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(v) * mult[u] for v, u in parts)


def parse_mpps(mpp: str | float) -> list[float]:
    try:
        vals = [float(v) for v in str(mpp).split(",") if v.strip()]
    except ValueError:
        raise GigaslideError(f"cannot read --mpp '{mpp}'", fix="use e.g. 0.5 or 0.5,1.0,2.0") from None
    if not vals or any(v <= 0 for v in vals):
        raise GigaslideError(f"--mpp '{mpp}' must be positive µm/px values", fix="use e.g. 0.5 or 0.5,1.0,2.0")
    return vals


def pretrain(data: str, out: str, method: str = "dino", backbone: str = "resnet18", mpp: str = "0.5", tile_size: int = 224,
             init: str | None = None, budget: str | None = None, steps: int | None = None, augment: str = "pathology",
             batch_size: int = 64, lr: float | None = None, layer_decay: float | None = None, n_local: int = 6,
             method_args: str | None = None, devices: int = 1, precision: str = "auto", workers: int = 2, seed: int = 0,
             checkpoint_every: str = "10m", min_tissue: float = 0.5, data_kind: str = "auto", threads: int | None = None) -> None:
    """Self-supervised pre-training of a tile encoder (SimCLR, MoCo v2, Barlow Twins, SwAV, DINO) on your tiles or slides.

    Example: gigaslide pretrain --data slides/ --mpp 0.5,1.0 --method dino --backbone vit_small_dinov2 --init vit_small_dinov2 --budget 2h --out runs/dino

    Tiles are sampled at random from tissue across slides and magnifications (no tile dump needed),
    or read from an image folder. Stops cleanly at --budget / --steps / Ctrl-C, leaving
    OUT/checkpoint (re-run the same command to resume) and OUT/encoder, which
    `gigaslide encode --encoder OUT/encoder` and `gigaslide embed-tiles --encoder OUT/encoder` load.

    Args:
        data: folder of slides (or one slide file), or folder of image tiles (jpg/png/tif, searched recursively)
        out: run folder (checkpoint/, encoder/, run.json)
        method: simclr, mocov2, barlowtwins, swav or dino
        backbone: encoder architecture from `gigaslide encoders` (resnet18, resnet50, vit_small, vit_small_dinov2, ...)
        mpp: resolution(s) in µm/px to sample slides at, comma-separated for several magnifications (recorded for tile folders)
        tile_size: training crop size in px (also the exported encoder's input size)
        init: start from an encoder: registry name (local hub cache), RUN_DIR or RUN_DIR/encoder, or a weights file
        budget: wall-clock training budget, e.g. 2h, 15m, 90s (with or instead of --steps)
        steps: number of optimiser steps (default 2000, as Roth et al., when neither --steps nor --budget is given)
        augment: pathology (stain jitter, flips, 90° rotations, mild colour, no solarisation) or imagenet
        batch_size: tiles per step (per device)
        lr: peak AdamW learning rate (default: the method's, 1e-3; DINO 5e-4), cosine schedule with warm-up
        layer_decay: layer-wise lr decay for the trunk (default 0.75 for a ViT with --init, else off)
        n_local: local crops per tile for DINO and SwAV
        method_args: JSON object overriding method settings, e.g. '{"out_dim": 8192, "temperature": 0.1}'
        devices: number of GPUs; more than 1 runs DDP through PyTorch Lightning
        precision: auto (bf16 AMP on CUDA, fp32 on CPU), bf16 (autocast, also on CPU: ~1.3x more steps here), fp16 or fp32
        workers: data-loader worker processes (0 = in the main process)
        seed: random seed (model init, tile order, augmentations)
        checkpoint_every: checkpoint interval in wall-clock time (e.g. 10m)
        min_tissue: minimum tissue fraction of a sampled slide tile
        data_kind: auto, slides or tiles (how to read --data)
        threads: torch CPU threads (default: torch's)
    """
    import logging

    import torch

    from gigaslide.ssl.tile.train import PretrainConfig
    from gigaslide.ssl.tile.train import pretrain as run_pretrain

    if threads:
        torch.set_num_threads(threads)
    try:
        margs = json.loads(method_args) if method_args else {}
    except ValueError as e:
        raise GigaslideError(f"--method-args is not JSON ({e})", fix='use e.g. \'{"out_dim": 8192}\'') from None
    if not isinstance(margs, dict):
        raise GigaslideError("--method-args must be a JSON object", fix='use e.g. \'{"out_dim": 8192}\'')
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if steps is None and not budget:
        steps = 2000
    cfg = PretrainConfig(data=data, out=out, method=method, backbone=backbone, mpp=parse_mpps(mpp), tile_size=tile_size,
                         init=init, steps=steps, budget_s=parse_duration(budget), augment=augment, batch_size=batch_size,
                         lr=lr, layer_decay=layer_decay, n_local=n_local, method_args=margs, devices=devices,
                         precision=precision, workers=workers, seed=seed,
                         checkpoint_every_s=parse_duration(checkpoint_every) or 600.0, min_tissue=min_tissue,
                         data_kind=data_kind)
    s = run_pretrain(cfg)
    print(f"{s['method']} {s['backbone']}: {s['steps']} steps in {s['elapsed_s']} s ({s.get('images_per_s')} img/s), "
          f"stopped by {s.get('stopped_by', 'steps')}; encoder -> {s.get('encoder', out + '/encoder')}")


def embed_tiles(image_folder: str, encoder: str, out: str, weights: str = "default", batch_size: int = 128,
                limit: int | None = None, seed: int = 0, threads: int | None = None) -> None:
    """Embed a labelled tile folder (one sub-folder per class) into one feature file with labels.

    Example: gigaslide embed-tiles ../shared/data/tiles/pcam/valid --encoder runs/dino/encoder --out feats/valid.h5

    The file stores features, labels (index into the JSON attr `classes`), the encoder name and
    its weights' sha256; `gigaslide evaluate tiles --train A.h5 --test B.h5` probes it.

    Args:
        image_folder: folder with one sub-folder of images per class (a flat folder gives features without labels)
        encoder: RUN_DIR/encoder (from pretrain), another export folder, or a registry name (see `gigaslide encoders`)
        out: output feature file (.h5)
        weights: default (the export's / local hub cache), a weights file, or random (tests only)
        batch_size: tiles per forward pass
        limit: embed a random subset of this many tiles (fixed by --seed)
        seed: random seed (subset, random weights)
        threads: torch CPU threads (default: torch's)
    """
    import torch

    from gigaslide.ssl.tile.embed import embed_folder

    if threads:
        torch.set_num_threads(threads)
    if weights == "random":
        print("note: random weights -- features are for tests and benchmarks only", file=sys.stderr)
    s = embed_folder(image_folder, encoder, out, weights=weights, batch_size=batch_size, limit=limit, seed=seed)
    cls = f"{len(s['classes'])} classes ({', '.join(s['classes'][:10])})" if s["classes"] else "no class sub-folders: no labels"
    print(f"embedded {s['n']} tiles -> {s['out']} ({s['dim']}-d, {cls}, {s['images_per_s']} tiles/s)")


def evaluate_finetune(train: str, test: str, encoder: str, out: str, weights: str = "default", fractions: str = "1.0",
                      epochs: int = 10, batch_size: int = 64, lr: float = 1e-4, head_lr: float = 1e-3,
                      augment: str = "pathology", max_train: int | None = None, precision: str = "auto",
                      workers: int = 1, bootstrap: int = 1000, seed: int = 0, threads: int | None = None) -> None:
    """Fine-tune an encoder end to end (plus a linear head) on labelled tiles; test with bootstrap CIs.

    Example: gigaslide evaluate finetune --train pcam/train --test pcam/valid --encoder runs/dino/encoder --fractions 0.01,0.1,1 --out ft/

    The low-label protocol of Kang et al.: each fraction of the training labels (stratified) is
    fine-tuned separately, with a validation split for model selection. Writes report.{md,json,png}
    (same metrics as `evaluate tiles`) and per fraction the fine-tuned encoder (fraction_*/encoder).
    Re-running with the same settings reuses finished fractions and resumes an interrupted one.

    Args:
        train: folder with one sub-folder of images per class (training tiles)
        test: folder with the same class sub-folders (test tiles)
        encoder: RUN_DIR/encoder (from pretrain), another export folder, or a registry name (see `gigaslide encoders`)
        out: report directory
        weights: default (the export's / local hub cache), a weights file, or random (a from-scratch baseline)
        fractions: comma-separated label fractions, e.g. 0.01,0.1,1.0
        epochs: maximum epochs per fraction (early stopping on validation loss)
        batch_size: tiles per step
        lr: encoder learning rate (AdamW, warm-up then cosine)
        head_lr: linear head learning rate
        augment: pathology (flips, 90° rotations, light stain jitter) or none
        max_train: use a random subset of this many training tiles (fixed by --seed)
        precision: auto (bf16 AMP on CUDA, fp32 on CPU), bf16, fp16 or fp32
        workers: data-loader worker processes
        bootstrap: bootstrap resamples for the 95 % CIs
        seed: random seed (subsets, splits, head init, augmentation)
        threads: torch CPU threads (default: torch's)
    """
    import torch

    from gigaslide.evaluation.finetune import FinetuneConfig, finetune_tiles
    from gigaslide.evaluation.tiles import report_markdown

    if threads:
        torch.set_num_threads(threads)
    try:
        fr = tuple(float(f) for f in str(fractions).split(",") if f.strip())
    except ValueError:
        raise GigaslideError(f"--fractions '{fractions}' is not a list of numbers", fix="use e.g. 0.01,0.1,1.0") from None
    cfg = FinetuneConfig(fractions=fr, epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, augment=augment,
                         max_train=max_train, precision=precision, workers=workers, seed=seed, n_bootstrap=bootstrap)
    print(report_markdown(finetune_tiles(train, test, encoder, out, weights=weights, cfg=cfg)))
    print(f"wrote {out}/report.md, report.json, report.png")


COMMANDS = {
    "pretrain": Command(pretrain, positional=None),
    "embed-tiles": Command(embed_tiles, positional="image_folder", nargs=None),
    "evaluate": {"finetune": Command(evaluate_finetune, positional=None)},
}

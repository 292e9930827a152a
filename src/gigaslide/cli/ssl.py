"""CLI commands of the tile-level SSL stage: ``pretrain`` and ``embed-tiles`` (``evaluate finetune`` is in cli/evaluate.py)."""

from __future__ import annotations

import sys

from gigaslide.cli.main import Command
from gigaslide.cli.validate import json_object
from gigaslide.errors import GigaslideError


def parse_duration(text: str | float | None) -> float | None:
    """The CLI's duration parser (``2h``, ``15m``, ``90s``): :func:`gigaslide.runs.parse_duration`, imported on use
    so that collecting the commands does not import torch (``gigaslide tile`` starts in well under a second)."""
    from gigaslide.runs import parse_duration as parse

    return parse(text)


def parse_mpps(mpp: str | float) -> list[float]:
    try:
        vals = [float(v) for v in str(mpp).split(",") if v.strip()]
    except ValueError:
        raise GigaslideError(f"cannot read --mpp '{mpp}'", fix="use e.g. 0.5 or 0.5,1.0,2.0") from None
    if not vals or any(v <= 0 for v in vals):
        raise GigaslideError(f"--mpp '{mpp}' must be positive µm/px values", fix="use e.g. 0.5 or 0.5,1.0,2.0")
    return vals


def parse_pair(flag: str, value: str | None, single_ok: bool = False) -> tuple[float, ...] | None:
    """``"0.32,1.0"`` -> (0.32, 1.0); with ``single_ok`` one value is allowed too."""
    if value is None or value == "":
        return None
    try:
        vals = tuple(float(v) for v in str(value).split(","))
    except ValueError:
        vals = ()
    if len(vals) != 2 and not (single_ok and len(vals) == 1) or any(v != v or v < 0 for v in vals):
        raise GigaslideError(f"cannot read {flag} '{value}'", fix=f"give MIN,MAX, e.g. {flag} 0.1,0.5")
    if len(vals) == 2 and vals[0] > vals[1]:
        raise GigaslideError(f"{flag} '{value}': the first value must not exceed the second", fix=f"e.g. {flag} 0.1,0.5")
    return vals


def recipe_flags(teacher_temp: str | None = None, mask_ratio: str | None = None, ibot_weight: float | None = None,
                 koleo_weight: float | None = None, momentum: float | None = None) -> dict:
    """The recipe flags of DINO / DINOv2 / MoCo as ``method_args`` keys (``--method-args`` still wins)."""
    out: dict = {}
    tt = parse_pair("--teacher-temp", teacher_temp, single_ok=True)
    if tt is not None:
        if any(v <= 0 for v in tt):
            raise GigaslideError(f"--teacher-temp '{teacher_temp}' must be positive", fix="e.g. --teacher-temp 0.04,0.07")
        out["teacher_temp"] = tt[-1]
        if len(tt) == 2:
            out["warmup_teacher_temp"] = tt[0]
    mr = parse_pair("--mask-ratio", mask_ratio)
    if mr is not None:
        if mr[1] > 1:
            raise GigaslideError(f"--mask-ratio '{mask_ratio}' must lie in [0, 1]", fix="e.g. --mask-ratio 0.1,0.5")
        out["mask_ratio_min"], out["mask_ratio_max"] = mr
    for name, v in (("ibot_weight", ibot_weight), ("koleo_weight", koleo_weight)):
        if v is not None:
            if not v >= 0:
                raise GigaslideError(f"--{name.replace('_', '-')} {v} must be >= 0", fix="0 turns the loss off")
            out[name] = float(v)
    if momentum is not None:
        if not 0 <= momentum < 1:
            raise GigaslideError(f"--momentum {momentum} must lie in [0, 1)", fix="e.g. --momentum 0.996")
        out["momentum"] = float(momentum)
    return out


def pretrain(data: str, out: str, method: str = "dino", backbone: str = "resnet18", mpp: str | None = None,
             tile_size: int = 224,
             init: str | None = None, budget: str | None = None, steps: int | None = None, augment: str = "pathology",
             batch_size: int | None = None, crop_size: int | None = None, lr: float | None = None,
             weight_decay: float | None = None, warmup_frac: float | None = None, layer_decay: float | None = None,
             patch_embed_lr_mult: float | None = None, drop_path: float | None = None, n_local: int | None = None,
             local_size: int | None = None, global_scale: str | None = None, local_scale: str | None = None,
             teacher_temp: str | None = None, mask_ratio: str | None = None, ibot_weight: float | None = None,
             koleo_weight: float | None = None, momentum: float | None = None,
             method_args: str | None = None, devices: int = 1, precision: str = "auto",
             workers: int | None = None, seed: int = 0, checkpoint_every: str = "10m", monitor_every: int | None = None,
             min_tissue: float = 0.5, data_kind: str = "auto", slide_mpp: str | None = None,
             threads: int | None = None, background: str = "auto") -> None:
    """Self-supervised pre-training of a tile encoder (SimCLR, MoCo v2, Barlow Twins, SwAV, DINO, DINOv2).

    Example: gigaslide pretrain --data slides/ --mpp 0.5,1.0 --method dino --backbone vit_small_dinov2 --init vit_small_dinov2 --budget 2h --out runs/dino

    Tiles are sampled at random from tissue across slides and magnifications (no tile dump needed),
    or read from an image folder. With --budget the step time of the first steps decides how many
    steps fit, and the lr warm-up + cosine span exactly those (logged). A label-free monitor (RankMe
    effective rank and same-tile view retrieval on a fixed set of tiles) is logged ~8 times per run
    into OUT/run.json, so you see whether the run still improves. Stops cleanly at --budget /
    --steps / Ctrl-C / SIGTERM (these two exit with status 130 / 143: not finished), leaving
    OUT/checkpoint (re-run the same command to resume exactly; a changed --data, --mpp, --init
    weights or option is refused) and OUT/encoder, which `gigaslide encode --encoder OUT/encoder`
    and `gigaslide embed-tiles --encoder OUT/encoder` load.

    Args:
        data: folder of slides (or one slide file), or folder of image tiles (jpg/png/tif, searched recursively)
        out: run folder (run.json, checkpoint/, encoder/)
        method: simclr, mocov2, barlowtwins, swav or dino (or another registered method, e.g. dinov2)
        backbone: encoder architecture from `gigaslide encoders` (resnet18, resnet50, vit_small, vit_small_dinov2, ...)
        mpp: resolution(s) in µm/px to sample slides at (default 0.5), comma-separated for several magnifications; for a
            tile folder the tiles' µm/px, recorded in the export so `encode` tiles slides at it (without it, none is
            recorded)
        tile_size: the tiles' native size in px: the exported encoder's input size
        init: start from an encoder: registry name (local hub cache), RUN_DIR or RUN_DIR/encoder, or a weights file
        budget: wall-clock training budget, e.g. 2h, 15m, 90s (with or instead of --steps)
        steps: number of optimiser steps (default 2000, as Roth et al., when neither --steps nor --budget is given)
        augment: pathology (stain jitter, flips, 90° rotations, mild colour, no solarisation) or imagenet
        batch_size: tiles per step per device (default: the method's recipe, else 64)
        crop_size: global training crop size (default: the tile size for ViTs; ~2/3 of it, a multiple of 8, for CNNs, which then embed at the full tile size)
        lr: peak AdamW learning rate (default: the method's, 1e-3; DINO 5e-4), linear warm-up then cosine
        weight_decay: AdamW weight decay (default 0.04)
        warmup_frac: share of the planned steps spent warming up the lr (default 0.05)
        layer_decay: layer-wise lr decay for a ViT trunk (default: the method's recipe; 0.75 for a ViT with --init; else off)
        patch_embed_lr_mult: lr multiplier of a ViT's patch embedding (default: the method's recipe, else 1)
        drop_path: stochastic depth rate of a ViT trunk (default: the method's recipe, else 0)
        n_local: local crops per tile for multi-crop methods (DINO, SwAV, DINOv2; default: the method's recipe,
            DINOv2 8, else 6)
        local_size: local crop size in px (default ~43 % of the crop size, a multiple of the ViT patch)
        global_scale: area range of the global crops as MIN,MAX (default: the method's, DINOv2 0.32,1.0)
        local_scale: area range of the local crops as MIN,MAX (default: the method's, DINOv2 0.05,0.32)
        teacher_temp: teacher temperature FINAL or WARMUP,FINAL (DINO, DINOv2; default DINO 0.04, DINOv2 0.04,0.07)
        mask_ratio: iBOT mask ratio range MIN,MAX of masked global crops (DINOv2; default 0.1,0.5)
        ibot_weight: weight of the iBOT masked-patch loss (DINOv2; default 1, 0 = off)
        koleo_weight: weight of the KoLeo regulariser (DINOv2; default 0.1, 0 = off)
        momentum: EMA momentum of the teacher / key encoder, cosine to 1 (default: MoCo v2 0.99, DINO 0.996,
            DINOv2 0.992)
        method_args: JSON object overriding method settings, e.g. '{"out_dim": 8192, "temperature": 0.1}'
        devices: number of GPUs; more than 1 runs DDP through PyTorch Lightning
        precision: auto (bf16 on CUDA; on a CPU with native bf16, bf16 for the methods measured as good in it per step, see benchmarks/results/tile_precision.md, else fp32; recorded in run.json), bf16, fp16 or fp32
        workers: data-loader worker processes (default: on CPU the cores the torch threads leave free, at most 4, so 0 = the main process when the model uses every core; on CUDA the cores but one, at most 8; fewer, or 0, with a warning, when /dev/shm cannot hold their batches)
        seed: random seed (model init, tile order, augmentations)
        checkpoint_every: checkpoint interval in wall-clock time (e.g. 10m)
        monitor_every: steps between label-free monitor points (default ~8 per run; 0 = off)
        min_tissue: minimum tissue fraction of a sampled slide tile
        data_kind: auto, slides or tiles (how to read --data)
        slide_mpp: level-0 µm/px for slides without it in their metadata, or a CSV with columns slide_id,mpp
        threads: torch CPU threads (default: torch's)
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence), for --data
            slides; also what edge tiles read outside the slide (black for dark)
    """
    import logging

    import torch

    from gigaslide.ssl.tile.engine import PretrainConfig
    from gigaslide.ssl.tile.engine import pretrain as run_pretrain

    if threads:
        torch.set_num_threads(threads)
    margs = json_object("--method-args", method_args, '{"out_dim": 8192}')
    margs = {**recipe_flags(teacher_temp=teacher_temp, mask_ratio=mask_ratio, ibot_weight=ibot_weight,
                            koleo_weight=koleo_weight, momentum=momentum), **margs}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if steps is None and not budget:
        steps = 2000
    cfg = PretrainConfig(data=data, out=out, method=method, backbone=backbone,
                         mpp=None if mpp is None else parse_mpps(mpp), tile_size=tile_size, init=init, steps=steps,
                         budget_s=parse_duration(budget), augment=augment, batch_size=batch_size,
                         crop_size=crop_size, lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac,
                         layer_decay=layer_decay, patch_embed_lr_mult=patch_embed_lr_mult, drop_path=drop_path,
                         n_local=n_local, local_size=local_size, method_args=margs,
                         global_scale=parse_pair("--global-scale", global_scale),
                         local_scale=parse_pair("--local-scale", local_scale), devices=devices,
                         precision=precision, workers=workers, seed=seed,
                         checkpoint_every_s=parse_duration(checkpoint_every) or 600.0, monitor_every=monitor_every,
                         min_tissue=min_tissue, data_kind=data_kind, slide_mpp=_slide_mpp(slide_mpp),
                         background=background)
    s = run_pretrain(cfg)
    mon = s.get("monitor") or {}
    tail = f"; RankMe {mon['rankme']}, view top-1 {mon['view_top1']}" if mon else ""
    print(f"{s['method']} {s['backbone']}: {s['steps']} steps in {s['elapsed_s']} s ({s.get('images_per_s')} img/s), "
          f"stopped by {s.get('stopped_by', 'steps')}{tail}; encoder -> {s.get('encoder', out + '/encoder')}")
    from gigaslide.runs import STOP_EXIT_STATUS

    if s.get("stopped_by") in STOP_EXIT_STATUS:  # not finished: a script must not go on (`pretrain && embed-tiles`)
        print(f"stopped at step {s['steps']} of {s.get('planned_steps')} by {s['stopped_by']}: checkpoint and encoder "
              "saved; re-run the same command to resume", file=sys.stderr)
        raise SystemExit(STOP_EXIT_STATUS[s["stopped_by"]])


def _slide_mpp(v: str | float | None) -> float | str | None:
    """``--slide-mpp``: a number (every slide), else a CSV path (per slide)."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return str(v)
    if not f > 0 or f == float("inf"):
        raise GigaslideError(f"--slide-mpp {v} must be a positive number of µm/px", fix="e.g. --slide-mpp 0.25")
    return f


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
        weights: default (the export's / local hub cache), a weights file, or random: the same architecture and
            input size with random weights (seed --seed), the from-scratch baseline to compare an SSL run with
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
        print("note: random weights -- a from-scratch baseline to compare with, not features to use", file=sys.stderr)
    s = embed_folder(image_folder, encoder, out, weights=weights, batch_size=batch_size, limit=limit, seed=seed)
    cls = f"{len(s['classes'])} classes ({', '.join(s['classes'][:10])})" if s["classes"] else "no class sub-folders: no labels"
    rate = "reused: same encoder and tiles" if s.get("reused") else f"{s['images_per_s']} tiles/s"
    print(f"embedded {s['n']} tiles -> {s['out']} ({s['dim']}-d, {cls}, {rate})")
    skipped = s.get("skipped") or {}
    for name, why in list(skipped.items())[:20]:
        print(f"warning: {name}: {why} (left out)", file=sys.stderr)
    if skipped:
        print(f"warning: {len(skipped)} unreadable image(s) left out of {s['out']} (attrs n_skipped, skipped_files); "
              "delete or re-export them and re-run to embed them", file=sys.stderr)


COMMANDS = {
    "pretrain": Command(pretrain, positional=None),
    "embed-tiles": Command(embed_tiles, positional="image_folder", nargs=None),
}

"""Commands of the slide-level supervised stage: mosaic, train-mil, heatmap, benchmark."""

from __future__ import annotations

from gigaslide.cli.main import Command


def train_mil(features: str, labels: str, out: str, model: str = "abmil", folds: int = 5,
              train_slides: int | None = None, repeats: int | None = None, seed: int = 0, epochs: int = 40, patience: int = 8,
              lr: float = 1e-3, hidden: int = 128, monitor: str = "loss", max_tiles: int | None = None,
              standardize: bool = True,
              on_missing: str = "error", bootstrap: int = 1000, device: str = "auto", bf16: bool = False,
              bag_memory_gb: str = "auto", model_args: str | None = None) -> None:
    """Train a MIL model with stratified, patient-grouped cross-validation and report AUC with CIs.

    Example: gigaslide train-mil --features feats/ --labels labels.csv --model abmil --folds 5 --out runs/abmil

    Args:
        features: folder of per-slide feature files (.h5 from `gigaslide encode`, one encoder)
        labels: CSV with columns slide_id,patient_id,label (patient_id -- or CLAM's case_id -- optional; labels
            0..C-1, or class names such as LUAD/LUSC, numbered in sorted order and named in every output)
        out: run directory (models, splits, predictions, evaluation); an interrupted run resumes
        model: one of mean, max, abmil, clam_sb, clam_mb, transmil
        folds: number of cross-validation folds
        train_slides: few-shot: train on this many slides drawn from each training fold (None = all); the validation
            split comes from the drawn slides, or, where some draw cannot give one (a class with one slide), no
            draw gets one and all train on their N slides for --epochs, keeping the last
        repeats: few-shot draws per fold (default: 3 with --train-slides, Giga-SSL protocol; 1 without)
        seed: seed of folds, draws, initialisation
        epochs: maximum epochs per fold
        patience: early-stopping patience (epochs) on the validation split inside the training fold
        lr: Adam learning rate
        hidden: hidden width of the MIL model
        monitor: early-stopping criterion on the validation split: loss or auc
        max_tiles: random subset of tiles per bag per training step (None = all tiles)
        standardize: z-score tile features with the training fold's per-dimension mean/std
        on_missing: error (default) or skip: what to do with slides that have a label but no features or vice versa
        bootstrap: bootstrap resamples for the 95 % CIs (over patients, each with all its slides, where labels.csv
            names them; else over slides)
        device: auto, cpu or cuda
        bf16: bf16 autocast on CPU (always used on CUDA)
        bag_memory_gb: memory the slides' features may take, in GB (auto: half of what is available); the
            bags beyond it are read from their files at every use (same result, more disk reads)
        model_args: JSON object of model settings, e.g. '{"layout": "grid"}' (TransMIL's position encoding on
            the slide's tiling grid instead of the paper's square of tiles in file order), '{"ppeg": false}'
            (TransMIL without it: tile-order invariant), '{"attention": "nystrom"}' (TransMIL with the paper's
            Nystrom attention, linear in the bag; default exact attention; "landmarks": default hidden // 2) or
            '{"k_sample": 16}' (CLAM)
    """
    from gigaslide.cli.validate import json_object
    from gigaslide.errors import GigaslideError
    from gigaslide.evaluation.slides import evaluation_markdown
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.models import MIL_MODELS, build_model, model_settings
    from gigaslide.mil.train import TrainConfig

    MIL_MODELS.get(model)
    margs = json_object("--model-args", model_args, '{"ppeg": false}')
    known = model_settings(model)
    unknown = sorted(set(margs) - set(known))
    if unknown:
        raise GigaslideError(f"--model-args: {model} has no setting {', '.join(unknown)}",
                             fix=f"use some of: {', '.join(known)}")
    build_model(model, 1, 2, hidden=hidden, **margs)  # settings it refuses (a width its heads do not divide): now
    if monitor not in ("loss", "auc"):
        raise GigaslideError(f"--monitor {monitor}", fix="use loss or auc")
    if on_missing not in ("error", "skip"):
        raise GigaslideError(f"--on-missing {on_missing}", fix="use error or skip")
    cfg = TrainConfig(model=model, epochs=epochs, patience=patience, lr=lr, hidden=hidden, monitor=monitor,
                      max_tiles=max_tiles, standardize=standardize, seed=seed, device=device, bf16=bf16,
                      model_kwargs=margs)
    if repeats is None:
        repeats = 3 if train_slides else 1
    res = run_cv(features, labels, out, cfg=cfg, folds=folds, train_slides=train_slides, repeats=repeats,
                 on_missing=on_missing, n_bootstrap=bootstrap, bag_memory_gb=bag_memory_gb)
    print(evaluation_markdown(res, f"{model}: slide-level cross-validation"))
    print(f"wrote {out}")


def mosaic(tiles: str, out: str, slides: int = 200, positive_fraction: float = 0.5, tumor_fraction: str = "0.02-0.2",
           grid: int = 24, mpp: float = 0.97, seed: int = 0, arrangement: str = "contiguous",
           task: str = "tumour", slide_stain: float = 0.0, slide_composition: float = 0.0, tissue_kinds: int = 8) -> None:
    """Build CAMELYON-like mosaic slides (pyramidal TIFF) from a labelled tile folder, with labels and tile ground truth.

    Example: gigaslide mosaic --tiles ../shared/data/tiles/pcam/train --out mosaic/ --slides 200 --tumor-fraction 0.02-0.2

    Args:
        tiles: tile folder with sub-folders 0/ (normal) and 1/ (tumour), e.g. PCam train
        out: output folder (slides/, labels.csv, ground_truth/, mosaic.json); existing slides are kept
        slides: number of slides
        positive_fraction: fraction of slides that contain a tumour region
        tumor_fraction: tumour share of the tissue tiles in positive slides: a range low-high or one value
        grid: tiles per side of a slide (24 x 96 px = 2304 px)
        mpp: resolution written into the TIFF (um/px; PCam is ~0.97)
        seed: random seed (labels, masks, regions, tile choice)
        arrangement: tumour tiles of a positive slide: contiguous (one region), scattered (random cells) or mixed
        task: tumour (label = slide has tumour) or context (every slide has tumour at --tumor-fraction;
            label 1 = one contiguous region, 0 = scattered tiles: only spatial context tells them apart)
            or composition (no tumour; label = the slide's tissue mix, like a subtype: needs --slide-composition)
        slide_stain: give every slide its own stain, as real slides from different labs / batches have: one draw per
            slide of an H / E / D density scale in [1-s, 1+s] and shift in [-0.4s, 0.4s] (0.05 = tile SSL's stain jitter,
            e.g. 0.2 for strong lab-to-lab variation); 0 = tiles keep their colours
        slide_composition: give every slide its own mix of normal tissue, as real slides have: normal tiles are
            grouped into --tissue-kinds kinds (k-means on colour statistics) and each slide draws its weights over
            them from a Dirichlet(a) (0.3 = one or two kinds per slide, 3 = mild); 0 = every slide the pool's mix
        tissue_kinds: number of normal tissue kinds --slide-composition mixes
    """
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, parse_range

    cfg = MosaicConfig(slides=slides, positive_fraction=positive_fraction, tumor_fraction=parse_range(tumor_fraction),
                       grid=grid, mpp=mpp, seed=seed, arrangement=arrangement, task=task,
                       slide_stain=slide_stain, slide_composition=slide_composition, tissue_kinds=tissue_kinds)
    meta = build_mosaic(tiles, out, cfg)
    print(f"wrote {slides} slides ({meta['n_positive']} positive) to {out}/slides, labels to {out}/labels.csv")


def heatmap(slide: str, features: str, model: str, out: str, ground_truth: str | None = None, thumb_size: int = 1024,
            slide_mpp: float | None = None) -> None:
    """Draw a trained MIL model's attention (or tile score) over the slide thumbnail, with a colour bar.

    Example: gigaslide heatmap mosaic/slides/mosaic_0001.tiff --features feats/mosaic_0001.h5 --model runs/abmil/fold0 --out heat.png

    Args:
        slide: the slide file
        features: the slide's feature file (.h5, same encoder as the model)
        model: a trained fold directory (RUN_DIR/foldK with model.safetensors + config.json)
        out: output PNG
        ground_truth: tile ground truth CSV (x,y,size,is_tumor); found automatically for mosaic slides
        thumb_size: longest side of the thumbnail in px
        slide_mpp: override the slide's resolution (um/px) when the file has none
    """
    import json
    from pathlib import Path

    from gigaslide.mil.heatmap import heatmap as draw

    info = draw(slide, features, model, out, ground_truth=ground_truth, thumb_size=thumb_size, slide_mpp=slide_mpp)
    names = json.loads((Path(model) / "config.json").read_text()).get("class_names")  # labels.csv's, if it named them
    probs = [round(p, 3) for p in info["probs"]]
    shown = ", ".join(f"{n}: {p}" for n, p in zip(names, probs)) if names and len(names) == len(probs) else probs
    msg = f"wrote {out}: {info['n_tiles']} tiles, class probabilities {shown}"
    if info["localisation_auc"] is not None:
        msg += f", attention localisation AUC {info['localisation_auc']:.3f}"
    print(msg)


def benchmark(encoders: str, out: str, tiles: str | None = None, slides: str | None = None, weights: str = "default",
              mpp: float = 0.97, tile_size: int = 96, folds: int = 5, model: str = "abmil", epochs: int = 30,
              max_tiles_per_class: int | None = None, bootstrap: int = 1000, seed: int = 0, threads: int = 2) -> None:
    """Patch- and slide-level leaderboard of several encoders in one table and one plot, and every encoder minus
    the first compared paired (same test tiles, same slides: Δ with 95 % CI and p).

    Example: gigaslide benchmark --encoders resnet18,vit_small --tiles ../shared/data/tiles/pcam --slides mosaic/ --out bench/

    Args:
        encoders: comma-separated encoder names (see `gigaslide encoders`) or exported encoder folders; NAME@random
            (or NAME@WEIGHTS_FILE) gives one encoder its own weights, e.g. runs/dino/encoder@random,runs/dino/encoder
            puts an SSL run beside its from-scratch baseline (the first one is the baseline of the paired table)
        out: output folder (features, runs, leaderboard.md/.json/.png); finished parts are reused
        tiles: labelled tile folder with train/ and valid/ (or test/) sub-folders, e.g. ../shared/data/tiles/pcam
        slides: mosaic folder from `gigaslide mosaic` (slides/, labels.csv, ground_truth/)
        weights: encoder weights (unless NAME@WEIGHTS): default (local cache / export), a file path, or random
        mpp: resolution at which the mosaic slides are tiled (um/px)
        tile_size: tile size in px at that resolution
        folds: cross-validation folds for the slide-level MIL model
        model: MIL model for the slide level (default abmil)
        epochs: maximum MIL epochs per fold
        max_tiles_per_class: cap on tiles per class and split at the tile level (None = all)
        bootstrap: bootstrap resamples for the 95 % CIs
        seed: random seed
        threads: torch CPU threads
    """
    import torch

    from pathlib import Path

    from gigaslide.mil.benchmark import run_benchmark

    torch.set_num_threads(max(1, threads))
    names = [e.strip() for e in encoders.split(",") if e.strip()]
    run_benchmark(names, out, tiles=tiles, slides=slides, weights=weights, mpp=mpp, tile_size=tile_size,
                  folds=folds, mil_model=model, epochs=epochs, max_tiles_per_class=max_tiles_per_class,
                  n_bootstrap=bootstrap, seed=seed)
    print((Path(out) / "leaderboard.md").read_text())
    print(f"wrote {out}/leaderboard.md, leaderboard.json, leaderboard.png")


COMMANDS: dict = {
    "benchmark": Command(benchmark, positional=None),
    "heatmap": Command(heatmap, positional="slide", nargs=None),
    "mosaic": Command(mosaic, positional=None),
    "train-mil": Command(train_mil, positional=None),
}

"""Commands of the slide-level SSL stage: augment-cache, pretrain-slides, embed-slides."""

from __future__ import annotations

import warnings

from gigaslide.cli.main import Command
from gigaslide.errors import GigaslideError


def augment_cache(slides: list[str], out: str, encoder: str = "resnet18", weights: str = "default", views: int = 25,
                  tiles_per_view: int = 25, mpp: float = 0.5, tile_size: int = 224, min_tissue: float = 0.25,
                  max_gb: float | None = None, batch_size: int = 64, precision: str = "auto", device: str = "auto",
                  slide_mpp: str | None = None, seed: int = 0, tissue_from: str | None = None,
                  tissue_classes: str | None = None, tissue_detect: bool = False, background: str = "auto") -> None:
    """Build the Giga-SSL augmented-view feature cache (one shared augmentation per view) plus plain features.

    Resumable: finished slides are skipped on a re-run; each slide's file is written atomically. One process writes
    a cache at a time: a second one on the same --out is refused (naming the first).
    Slides with fewer tissue tiles than --tiles-per-view get views drawn with replacement (warned).

    Example: gigaslide augment-cache slides/*.svs --encoder resnet18 --views 25 --tiles-per-view 25 --out cache/

    Args:
        slides: slide files or folders of slides
        out: cache folder (features/<slide_id>.h5 with views, view_coords and plain features)
        encoder: tile encoder (registry name, see `gigaslide encoders`, or an exported encoder folder)
        weights: encoder weights: default, random (tests/benchmarks only) or a weights file
        views: augmented views per slide
        tiles_per_view: random tiles per view
        mpp: tile resolution in µm/px
        tile_size: tile side in px at --mpp
        min_tissue: minimum tissue fraction of a kept tile
        max_gb: disk budget for the cache in GB; stops before the slide that would exceed it
        batch_size: tiles per encoder batch
        precision: auto (bf16 on CUDA; on CPU bf16 only with native bf16 and when the first batch agrees with fp32),
            fp32, bf16 (CPU autocast) or fp16 (CUDA)
        device: auto, cpu or cuda
        slide_mpp: override the level-0 resolution (µm/px), or a CSV slide_id,mpp
        seed: seed of view sampling and augmentations
        tissue_from: folder of tissue annotations, one <slide_id>.geojson per slide, used instead of tissue
            detection (see `gigaslide tile --help`)
        tissue_classes: with --tissue-from, only polygons of these classes count as tissue, comma-separated
            (e.g. Tumor,Stroma; default: all)
        tissue_detect: with --tissue-from, keep only the detected tissue inside the polygons (drops the glass,
            fat and pale areas a coarse outline encloses)
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence); also
            what edge tiles read outside the slide (black for dark). A slide cached with another value is cached again
    """
    from gigaslide.cli.validate import tiling_params
    from gigaslide.slides import find_slides
    from gigaslide.ssl.slide.cache import build_augment_cache

    tiling = tiling_params(mpp, tile_size, 0, min_tissue, background, tissue_from, tissue_classes,
                           tissue_detect)  # checks the tissue options
    slides = [str(f) for f in find_slides(slides)]  # folders expanded; a missing path is one line before any work

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = build_augment_cache(slides, out, encoder, weights=weights, views=views, tiles_per_view=tiles_per_view,
                                  mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, seed=seed, max_gb=max_gb,
                                  batch_size=batch_size, precision=precision, device=device, slide_mpp=_mpp(slide_mpp),
                                  tissue_from=tissue_from, tissue_classes=tiling.tissue_classes,
                                  tissue_detect=tiling.tissue_detect, background=tiling.background)
    for w in caught:
        print(f"warning: {w.message}")
    prec = f" in {res.precision['resolved']}" if res.precision else ""
    print(f"cached {len(res.done)} slides ({res.bytes_written / 1e6:.1f} MB) in {res.seconds:.1f} s{prec}; "
          f"{len(res.skipped)} already done; {len(res.empty)} without tissue; {len(res.with_replacement)} with replacement")
    if res.failed:
        for sid, why in res.failed.items():
            print(f"failed: {why}")
        raise GigaslideError(f"{len(res.failed)} of {len(slides)} slide(s) failed (listed above); the others are cached",
                             path=out, fix="fix or remove those slides and re-run the same command: it resumes")


def _mpp(v: str | None) -> float | str | None:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v


def pretrain_slides(method: str = "gigassl", out: str = "slide_ssl_run", cache: str | None = None,
                    features: str | None = None, encoder: str = "sparseconvmil", epochs: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, budget: str | None = None,
                    temperature: float = 0.05, out_dim: int = 512, width: int = 256, blocks: int = 2,
                    norm: str = "batch", downsample: bool = True, tiles_per_step: int = 16, grid_augment: bool = True,
                    warmup_epochs: int = 5, select: str = "best", patience: int | None = None,
                    region_size: int = 4096, region_mpp: float = 0.5, prototypes: int = 4,
                    losses: str = "dino+intra+inter", warmup: int = 5, head_dim: int = 1024, n_local: int = 8,
                    teacher_temp: float = 0.06, device: str = "auto", precision: str = "fp32", seed: int = 0) -> None:
    """Pre-train a slide encoder without labels: Giga-SSL (on an augment cache) or SLPD (on tile features).

    Re-running the same command resumes bit-exactly from RUN/checkpoint (gigaslide.runs); other options
    in an existing RUN are refused. Stops cleanly on Ctrl-C / SIGTERM (exit status 130 / 143) or --budget (exit
    status 0). Exports RUN/model.safetensors once training finished.

    Example: gigaslide pretrain-slides --method gigassl --cache cache/ --out runs/gigassl --tiles-per-step 16

    Args:
        method: gigassl or slpd
        out: run folder (run.json, checkpoint/, model.safetensors, history.json)
        cache: augment-cache folder (gigassl)
        features: tile feature folder (slpd)
        encoder: gigassl slide encoder: sparseconvmil, abmil or mean
        epochs: training epochs (default 50 gigassl, 20 slpd)
        batch_size: slides per step (gigassl, default: all slides up to 512) or regions per step (slpd, default 64)
        lr: peak learning rate, linear warm-up then cosine (default 1e-3 gigassl, 5e-4 slpd)
        budget: wall-clock budget, e.g. 30m (a clean stop; re-run to continue)
        temperature: SimCLR NT-Xent temperature (gigassl)
        out_dim: slide embedding size (gigassl)
        width: channels of the sparse ResNet (gigassl)
        blocks: submanifold residual blocks (gigassl sparseconvmil; 0 = no geometry)
        norm: normalisation in the blocks: batch, layer or none (gigassl)
        downsample: stride-2 sparse max-pooling between blocks (gigassl)
        tiles_per_step: tiles per view, re-drawn every step from a random cached version (gigassl; paper 5-16)
        grid_augment: rotate / flip / scale the tile grid of every view (gigassl)
        warmup_epochs: learning-rate warm-up epochs (gigassl)
        select: exported epoch: best (label-free view-retrieval monitor) or last (gigassl)
        patience: stop after this many epochs without monitor improvement (gigassl; default: never)
        region_size: region side in px at --region-mpp (slpd; 4096 at 0.5 µm/px = HIPT's 4096 px at 20x)
        region_mpp: resolution the region size is given at, µm/px (slpd)
        prototypes: k-means prototypes per slide (slpd; 4 NSCLC, 2 BRCA in the paper)
        losses: slpd objective: dino (ablation), dino+intra, or dino+intra+inter (the paper)
        warmup: epochs of plain DINO before the prototype losses (slpd)
        head_dim: DINO head output size K (slpd; small K is a collapse guard on small data)
        n_local: local feature-grid crops per region (slpd; 2 global crops always)
        teacher_temp: final DINO teacher temperature after its warm-up from 0.04 (slpd)
        device: auto, cpu or cuda
        precision: fp32, bf16, fp16 or auto (gigassl autocast)
        seed: random seed
    """
    m = method.lower()
    kw = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    if m == "gigassl":
        if not cache:
            raise GigaslideError("--method gigassl needs --cache", fix="build one with `gigaslide augment-cache` and pass --cache DIR")
        from gigaslide.ssl.slide.gigassl import pretrain_gigassl

        res = pretrain_gigassl(cache, out, encoder=encoder, temperature=temperature, out_dim=out_dim, hidden=width,
                               blocks=blocks, norm=norm, downsample=downsample, tiles_per_step=tiles_per_step,
                               grid_augment=grid_augment, warmup_epochs=warmup_epochs, select=select, patience=patience,
                               precision=precision, seed=seed, device=device, budget=budget, **kw)
    elif m == "slpd":
        if not features:
            raise GigaslideError("--method slpd needs --features", fix="pass a folder of tile feature files (gigaslide encode --out)")
        from gigaslide.ssl.slide.slpd import pretrain_slpd

        res = pretrain_slpd(features, out, region_size=region_size, region_mpp=region_mpp, prototypes=prototypes,
                            losses=losses, warmup=warmup, head_dim=head_dim, n_local=n_local, teacher_temp=teacher_temp,
                            seed=seed, device=device, budget=budget, **kw)
        if res.get("collapse"):
            print(f"slpd: COLLAPSED ({res['collapse']}); see {res['run']}/run.json 'collapse'")
    else:
        raise GigaslideError(f"unknown --method '{method}'", fix="use --method gigassl or --method slpd")
    state = "finished" if res["finished"] else f"stopped ({res.get('stopped')}; re-run the same command to resume)"
    print(f"{m}: {state}; {len(res['history'])} epochs in {res['seconds']:.1f} s -> {res['run']}")
    from gigaslide.runs import STOP_EXIT_STATUS

    if res.get("stopped") in STOP_EXIT_STATUS:  # Ctrl-C / SIGTERM: not a success (`pretrain-slides && embed-slides`, a
        raise SystemExit(STOP_EXIT_STATUS[res["stopped"]])  # batch system's job state); a --budget stop is one


def embed_slides(model: str, features: str, out: str = "embeddings.h5", ensemble: int = 20,
                 tiles_per_view: int | None = None, fp16: bool = False, device: str = "auto", seed: int = 0,
                 regions_out: str | None = None) -> None:
    """Embed slides with a pre-trained slide-SSL run: HDF5 with slide_ids and embeddings.

    Example: gigaslide embed-slides --model runs/gigassl --features features/ --ensemble 20 --out embeddings.h5
    Then the linear and k-NN probes on the same folds, with CIs (labels: integers or class names):
      gigaslide evaluate embeddings --embeddings embeddings.h5 --labels labels.csv --out probes/

    Args:
        model: run folder of `gigaslide pretrain-slides`
        features: tile feature folder (or an augment cache: its plain features are used)
        out: output HDF5
        ensemble: random views averaged per slide (gigassl)
        tiles_per_view: tiles per view (gigassl; default: the run's --tiles-per-step)
        fp16: store embeddings as float16
        device: auto, cpu or cuda
        seed: seed of the random views
        regions_out: slpd: also write per-region embeddings as a feature folder (for train-mil over regions)
    """
    from gigaslide.ssl.slide.embed import embed_slides as run_embed

    e = run_embed(model, features, out, ensemble=ensemble, tiles_per_view=tiles_per_view, fp16=fp16, seed=seed, device=device,
                  regions_out=regions_out)
    n, d = e.embeddings.shape
    print(f"{n} slides x {d}-d {e.embeddings.dtype} -> {out}; {e.attrs['bytes_per_slide']} bytes per slide"
          + (f"; region embeddings -> {regions_out}" if regions_out else ""))


COMMANDS = {
    "augment-cache": Command(augment_cache, positional="slides", nargs="+"),
    "pretrain-slides": Command(pretrain_slides, positional=None),
    "embed-slides": Command(embed_slides, positional=None),
}

"""Commands of the slide-level SSL stage: augment-cache, pretrain-slides, embed-slides."""

from __future__ import annotations

import warnings

from gigaslide.cli.main import Command
from gigaslide.errors import GigaslideError


def augment_cache(slides: list[str], out: str, encoder: str = "resnet18", weights: str = "default", views: int = 25,
                  tiles_per_view: int = 25, mpp: float = 0.5, tile_size: int = 224, min_tissue: float = 0.25,
                  max_gb: float | None = None, batch_size: int = 64, precision: str = "fp32", device: str = "auto",
                  slide_mpp: str | None = None, seed: int = 0) -> None:
    """Build the Giga-SSL augmented-view feature cache (one shared augmentation per view) plus plain features.

    Resumable: finished slides are skipped on a re-run; each slide's file is written atomically.
    Slides with fewer tissue tiles than --tiles-per-view get views drawn with replacement (warned).

    Example: gigaslide augment-cache slides/*.svs --encoder resnet18 --views 25 --tiles-per-view 25 --out cache/

    Args:
        slides: slide files
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
        precision: fp32, bf16 (CPU autocast) or fp16 (CUDA)
        device: auto, cpu or cuda
        slide_mpp: override the level-0 resolution (µm/px), or a CSV slide_id,mpp
        seed: seed of view sampling and augmentations
    """
    from gigaslide.ssl.slide.cache import build_augment_cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = build_augment_cache(slides, out, encoder, weights=weights, views=views, tiles_per_view=tiles_per_view,
                                  mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, seed=seed, max_gb=max_gb,
                                  batch_size=batch_size, precision=precision, device=device, slide_mpp=_mpp(slide_mpp))
    for w in caught:
        print(f"warning: {w.message}")
    print(f"cached {len(res.done)} slides ({res.bytes_written / 1e6:.1f} MB) in {res.seconds:.1f} s; "
          f"{len(res.skipped)} already done; {len(res.empty)} without tissue; {len(res.with_replacement)} with replacement")


def _mpp(v: str | None) -> float | str | None:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v


def pretrain_slides(method: str = "gigassl", out: str = "slide_ssl_run", cache: str | None = None,
                    features: str | None = None, encoder: str = "sparseconvmil", epochs: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, temperature: float = 0.05,
                    out_dim: int = 512, region_size: int = 4096, region_mpp: float = 0.5, prototypes: int = 4,
                    warmup: int = 5, device: str = "auto", bf16: bool = False, seed: int = 0) -> None:
    """Pre-train a slide encoder without labels: Giga-SSL (on an augment cache) or SLPD (on tile features).

    Resumes from RUN/checkpoint.pt when re-run with the same options; exports RUN/model.safetensors.

    Example: gigaslide pretrain-slides --method gigassl --cache cache/ --out runs/gigassl

    Args:
        method: gigassl or slpd
        out: run folder
        cache: augment-cache folder (gigassl)
        features: tile feature folder (slpd)
        encoder: gigassl slide encoder: sparseconvmil, abmil or mean
        epochs: training epochs (default 50 gigassl, 20 slpd)
        batch_size: slides per batch (gigassl, default 32) or regions per batch (slpd, default 64)
        lr: learning rate (default 1e-3 gigassl, 5e-4 slpd)
        temperature: SimCLR NT-Xent temperature (gigassl)
        out_dim: slide embedding size (gigassl)
        region_size: region side in px at --region-mpp (slpd; 4096 at 0.5 µm/px = HIPT's 4096 px at 20x)
        region_mpp: resolution the region size is given at, µm/px (slpd)
        prototypes: k-means prototypes per slide (slpd; 4 NSCLC, 2 BRCA in the paper)
        warmup: epochs of plain DINO before the prototype losses (slpd)
        device: auto, cpu or cuda
        bf16: bf16 autocast on CPU (gigassl; CUDA always uses AMP)
        seed: random seed
    """
    m = method.lower()
    if m == "gigassl":
        if not cache:
            raise GigaslideError("--method gigassl needs --cache", fix="build one with `gigaslide augment-cache` and pass --cache DIR")
        from gigaslide.ssl.slide.gigassl import pretrain_gigassl

        kw = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
        res = pretrain_gigassl(cache, out, encoder=encoder, temperature=temperature, out_dim=out_dim, seed=seed,
                               device=device, bf16=bf16, **kw)
    elif m == "slpd":
        if not features:
            raise GigaslideError("--method slpd needs --features", fix="pass a folder of tile feature files (gigaslide encode --out)")
        from gigaslide.ssl.slide.slpd import pretrain_slpd

        kw = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
        res = pretrain_slpd(features, out, region_size=region_size, region_mpp=region_mpp, prototypes=prototypes,
                            warmup=warmup, seed=seed, device=device, **kw)
    else:
        raise GigaslideError(f"unknown --method '{method}'", fix="use --method gigassl or --method slpd")
    state = "finished" if res["finished"] else "stopped early (re-run to resume)"
    print(f"{m}: {state}; {len(res['history'])} epochs in {res['seconds']:.1f} s -> {res['run']}")


def embed_slides(model: str, features: str, out: str = "embeddings.h5", ensemble: int = 20,
                 tiles_per_view: int | None = None, fp16: bool = False, device: str = "auto", seed: int = 0) -> None:
    """Embed slides with a pre-trained slide-SSL run: HDF5 with slide_ids and embeddings.

    Example: gigaslide embed-slides --model runs/gigassl --features features/ --ensemble 20 --out embeddings.h5

    Args:
        model: run folder of `gigaslide pretrain-slides`
        features: tile feature folder (or an augment cache: its plain features are used)
        out: output HDF5
        ensemble: random views averaged per slide (gigassl)
        tiles_per_view: tiles per view (gigassl; default: the cache's)
        fp16: store embeddings as float16
        device: auto, cpu or cuda
        seed: seed of the random views
    """
    from gigaslide.ssl.slide.embed import embed_slides as run_embed

    e = run_embed(model, features, out, ensemble=ensemble, tiles_per_view=tiles_per_view, fp16=fp16, seed=seed, device=device)
    n, d = e.embeddings.shape
    print(f"{n} slides x {d}-d {e.embeddings.dtype} -> {out}; {e.attrs['bytes_per_slide']} bytes per slide")


COMMANDS = {
    "augment-cache": Command(augment_cache, positional="slides", nargs="+"),
    "pretrain-slides": Command(pretrain_slides, positional=None),
    "embed-slides": Command(embed_slides, positional=None),
}

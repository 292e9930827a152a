"""Commands of the spine: info, tile, encoders, encode."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from gigaslide.cli.main import Command
from gigaslide.errors import GigaslideError


def info(slide: str, slide_mpp: float | str | None = None, json_out: bool = False) -> None:
    """Show a slide's levels, dimensions, mpp (and where it came from), vendor and associated images.

    Example:
        gigaslide info ../shared/data/slides/cmu-1-small-region.svs

    Args:
        slide: slide file
        slide_mpp: override the resolution (µm/px at level 0), or a CSV with columns slide_id,mpp
        json_out: print JSON instead of a table
    """
    from gigaslide.slides import open_slide

    with open_slide(slide, mpp=slide_mpp) as s:
        d = s.info()
    if json_out:
        print(json.dumps(d, indent=2))
        return
    print(f"slide       {d['path']}")
    vendor = d["vendor"] if d["vendor"] and d["vendor"] != d["backend"] else None  # no vendor: the reader's own name
    print(f"reader      {d['backend']}" + (f" ({vendor})" if vendor else ""))
    mpp = "unknown (give --slide-mpp)" if d["mpp"] is None else f"{d['mpp'][0]:.4f} x {d['mpp'][1]:.4f} µm/px (from {d['mpp_source']})"
    print(f"mpp         {mpp}")
    if d["objective_power"]:
        print(f"objective   {d['objective_power']}x")
    print(f"levels      {d['level_count']}")
    for i, (dim, ds) in enumerate(zip(d["level_dimensions"], d["level_downsamples"])):
        print(f"  level {i}   {dim[0]} x {dim[1]} px  (downsample {ds:.3g})")
    print(f"associated  {', '.join(d['associated_images']) or '-'}")


def tile(slides: list[str], out: str, mpp: float = 0.5, tile_size: int = 224, overlap: int = 0, min_tissue: float = 0.25,
         slide_mpp: float | str | None = None, background: str = "auto", workers: int | None = None,
         tissue_from: str | None = None, tissue_classes: str | None = None, tissue_detect: bool = False,
         outline_tolerance: float = 0.0) -> None:
    """Segment tissue and tile slides at a physical resolution; writes coords (level-0 px), overlays, GeoJSON.

    Several slides are tiled at once, one per CPU core (each slide's files are written atomically). A re-run
    reuses a slide's coords made at the same settings from the same scan (level-0 mpp and size, and the same slide
    file: its size and a hash of sampled blocks, so a re-exported or colour-normalised file put in place under the
    name is tiled again, a copy moved elsewhere is not); a second slide
    with an id already taken (the same file name in another folder) fails, and the others go on.
    With --tissue-from the tissue is read from annotations (e.g. drawn in QuPath) instead of detected.

    Example:
        gigaslide tile ../shared/data/slides/cmu-1-small-region.svs --out tiles_out --mpp 0.5 --tile-size 224
        gigaslide tile SLIDES --out tiles_out --tissue-from qupath_geojson/ --tissue-classes Tumor,Stroma
        gigaslide tile SLIDES --out tiles_out --tissue-from qupath_geojson/ --tissue-detect   # tissue inside the ROIs
        gigaslide tile SLIDES --out tiles_out --outline-tolerance 16   # lighter GeoJSON outlines, within 16 px

    Output: OUT/patches/<slide>.h5 (coords, CLAM/TRIDENT layout), OUT/tissue/<slide>.png|.geojson (QuPath),
    OUT/grid/<slide>.png, OUT/tile_manifest.json.

    Args:
        slides: slide files or folders of slides
        out: output folder
        mpp: target resolution in µm per pixel (0.5 ~ 20x)
        tile_size: tile size in pixels at the target resolution
        overlap: overlap between neighbouring tiles in pixels at the target resolution
        min_tissue: keep tiles whose tissue fraction is at least this
        slide_mpp: scan resolution override (µm/px at level 0; a number applies to every slide, also those whose
            file has one), or a CSV slide_id,mpp
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence)
        workers: processes tiling slides at once, one slide each (default: the cores; 1 = one after another)
        tissue_from: folder of tissue annotations, one <slide_id>.geojson per slide (QuPath: Export objects as
            GeoJSON; level-0 px): tiles are kept inside its polygons instead of detected tissue
        tissue_classes: with --tissue-from, only polygons of these classes count as tissue, comma-separated
            (e.g. Tumor,Stroma; default: all)
        tissue_detect: with --tissue-from, keep only the detected tissue inside the polygons (drops the glass,
            fat and pale areas a coarse outline encloses)
        outline_tolerance: simplification of the tissue outlines written to OUT/tissue/<slide>.geojson, in
            level-0 pixels: every point of the exact outline lies within this distance of the written one (fewer
            vertices, smaller files for QuPath), e.g. --outline-tolerance 16; default 0: the mask's exact outline.
            Changes only the GeoJSON: a re-run with another value rewrites the GeoJSON of slides already tiled and
            keeps their tiles
    """
    from gigaslide import atomic
    from gigaslide.features.manifest import Manifest
    from gigaslide.slides import by_slide_id, find_slides, slide_id_from_path
    from gigaslide.cli.validate import tiling_params
    from gigaslide.tiling.parallel import tile_many, tiling_workers

    files = find_slides(slides)
    outp = atomic.ensure_writable_dir(out)
    params = _with_outline(tiling_params(mpp, tile_size, overlap, min_tissue, background, tissue_from, tissue_classes,
                                         tissue_detect), outline_tolerance)
    man = Manifest(outp / "tile_manifest.json", {"command": "tile", **params.as_dict()})
    failures: dict[str, str] = {}  # by slide file: two files with one id fail apart

    def failed(f: Path, err: str, key: str | None = None) -> None:
        failures[str(f)] = err
        man.set(key or slide_id_from_path(Path(f)), "failed", path=str(f), error=err)
        print(f"failed: {err}", file=sys.stderr)

    try:
        todo = []
        for f, _, taken in by_slide_id(files):  # one coords file per slide id
            if taken:  # under its file's path: the slide of that id that is tiled keeps the id's entry
                failed(f, taken, key=str(f))
            else:
                todo.append(f)
        n_workers = tiling_workers(len(todo)) if workers is None else workers
        for f, g, err in tile_many(todo, str, outp, params, slide_mpp=slide_mpp, workers=n_workers):
            if err is None:
                man.set(g.slide_id, "done", path=str(f), tiles=len(g))
                print(f"{g.slide_id}: {len(g)} tiles" + (f" ({g.extra['stain']})" if g.extra.get("stain_warning") else ""))
            else:
                failed(f, err)
    finally:
        man.flush()
    print(f"tiled {len(files) - len(failures)}/{len(files)} slides -> {outp}")
    _raise_if_failed(failures, len(files), outp / "tile_manifest.json")


def _with_outline(params, outline_tolerance: float):  # noqa: ANN001, ANN202 - TilingParams (lazy import)
    """``params`` with ``--outline-tolerance`` (checked before any slide is opened: one line, not one per slide)."""
    from dataclasses import replace

    t = float(outline_tolerance)
    if not (math.isfinite(t) and t >= 0):
        raise GigaslideError(f"--outline-tolerance {outline_tolerance!r} must be a finite number of level-0 pixels, "
                             "at least 0", fix="use e.g. --outline-tolerance 16 (outlines within 16 level-0 px), "
                                               "or 0 (the default: the exact outline)")
    return replace(params, outline_tolerance=t)


def _raise_if_failed(failures: dict[str, str], n: int, manifest: Path, left: int = 0) -> None:
    """One error for the slides that failed (``left``: slides another live process still holds, not finished)."""
    n_fail = len(failures)
    if n == 1 and n_fail == 1:  # a single slide: its own reason is the most useful line
        raise GigaslideError(next(iter(failures.values())))
    if n_fail:
        done = n - n_fail - left
        rest = ([f"{left} left to another process"] if left else []) + [
            "none finished" if done <= 0 else "the others finished" if not left else f"{done} finished"]
        raise GigaslideError(f"{n_fail} of {n} slides failed ({', '.join(rest)})", path=manifest,
                             fix="see each slide's error in the manifest; fix or remove those slides and re-run (finished slides are skipped)")


def encoders() -> None:
    """List the encoder registry: name, embedding size, input size, normalisation, native mpp, weight source, and
    whether the entry's hub weights are in the local cache (``cached``: yes / no; ``-``: no hub weights).

    Example:
        gigaslide encoders
    """
    from gigaslide.encoders import ENCODERS, resolve_hub_weights

    def cached(hub: str | None) -> str:
        if not hub:
            return "-"
        try:
            resolve_hub_weights(hub)
        except GigaslideError:
            return "no"
        return "yes"

    rows = [("name", "arch", "dim", "input", "mean / std", "mpp", "cached", "weights")]
    for name, s in ENCODERS.items():
        norm = "/".join(f"{m:.3g}" for m in s.mean) + " / " + "/".join(f"{v:.3g}" for v in s.std)
        rows.append((name, s.arch, str(s.embed_dim or "auto"), str(s.input_size), norm,
                     "-" if s.native_mpp is None else str(s.native_mpp), cached(s.hub), s.hub or s.weight_source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nweights: --weights PATH (.safetensors/.pt/.bin, or a downloaded model folder), a hub id from the local "
          "cache (default), RUN_DIR/encoder exports, or 'random' (tests/benchmarks only); cached = the hub weights are "
          "in the local cache (GIGASLIDE_WEIGHTS, HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME); gated models: accept the "
          "licence and download them on a machine with internet")


def encode(slides: list[str], out: str, encoder: str = "resnet18", weights: str = "default", mpp: float | None = None,
           tile_size: int | None = None, overlap: int = 0, min_tissue: float = 0.25, batch_size: int = 64,
           workers: int | None = None,
           precision: str = "auto", device: str = "auto", slide_mpp: float | str | None = None, threads: int = 2,
           compile: bool = False, background: str = "auto", tile_workers: int | None = None,
           tile_ahead: bool | None = None, fold_bn: bool | None = None, tissue_from: str | None = None,
           tissue_classes: str | None = None, tissue_detect: bool = False,
           decode_device: str | None = None, downsample: str = "box",
           outline_tolerance: float = 0.0) -> None:  # noqa: A002 - the option's name
    """Tile and encode slides into one HDF5 feature file per slide (CLAM/TRIDENT layout); resumable.

    Example:
        gigaslide encode ../shared/data/slides/cmu-1-small-region.svs --out feats --encoder resnet18 --weights random

    Output: OUT/features/<slide>.h5 (features [N,D], coords [N,2] level-0 px, provenance attrs),
    OUT/patches/, OUT/tissue/, OUT/grid/ and OUT/manifest.json (status, error and timing per slide).
    A re-run skips finished slides (a slide whose scan changed -- a corrected --slide-mpp, another file under its
    name, even one of the same size and mpp: its size and a hash of sampled blocks differ -- is tiled and encoded
    again; the same file moved or copied elsewhere is not); a broken slide is reported and the others go on.
    A re-run with another encoder, weights or tiling setting encodes the slides again and replaces their
    features: give each encoder its own OUT. Several runs (or
    `torchrun --nproc-per-node N -m gigaslide encode ...`, or SLURM tasks) may share one OUT: slides are
    locked one by one (OUT/locks/), split longest first, and a dead run's slides are taken over.

    Args:
        slides: slide files or folders of slides
        out: output folder
        encoder: registry name (see `gigaslide encoders`) or an exported encoder folder (RUN_DIR/encoder, or the
            pretrain RUN_DIR)
        weights: default (the encoder's own / local hub cache), a .safetensors/.pt/.pth/.bin path or a downloaded
            model folder (its weights file), or random (tests only)
        mpp: target resolution in µm per pixel; default: the encoder's own (the µm/px it was trained at, e.g. a
            pretrain run's --mpp; 0.5 for an encoder trained on natural images)
        tile_size: tile size in pixels at the target resolution (resized to the encoder's input size); default:
            the encoder's input size (224 for most, a pretrain run's --tile-size for its export), so each tile shows
            the field of view the encoder was trained on
        overlap: overlap between tiles in pixels at the target resolution
        min_tissue: keep tiles whose tissue fraction is at least this
        batch_size: tiles per forward pass
        workers: reader processes decoding tiles (0 = in the main process; default: on CPU 1 when a core is left beside the torch threads, else 0; on CUDA the spare cores up to 16)
        precision: auto (bf16 on CPU when it matches fp32 to cosine 0.999; AMP on CUDA), bf16, fp16 or fp32;
            a re-run with bf16, fp16 or fp32 encodes again the slides encoded in another precision (auto keeps them)
        device: auto, cpu, cuda or cuda:N
        slide_mpp: scan resolution override (µm/px at level 0), or a CSV slide_id,mpp
        threads: torch CPU threads for the model
        compile: torch.compile the encoder (worth it on a GPU for long jobs)
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence)
        tile_workers: processes tiling slides that have no tile grid yet (default: the cores, one slide each; half of them when tiling ahead)
        tile_ahead: tile while earlier slides are encoded (default: on CUDA with one rank; else all slides first)
        fold_bn: run the encoder with its batch norms folded into the convolutions before them (faster per tile;
            the same features within float rounding); default: folded on every run (costs tens of ms once), so a
            slide's features do not depend on what else the run holds; --fold-bn false runs them unfolded. Each
            feature file records it (bn_folded)
        tissue_from: folder of tissue annotations, one <slide_id>.geojson per slide (see `gigaslide tile --help`)
        tissue_classes: with --tissue-from, only polygons of these classes count as tissue, comma-separated
            (e.g. Tumor,Stroma; default: all)
        tissue_detect: with --tissue-from, keep only the detected tissue inside the polygons (drops the glass,
            fat and pale areas a coarse outline encloses)
        decode_device: decode the slides' stored JPEG tiles on this device (cuda: nvJPEG) in the main process,
            instead of reader processes on the CPU -- for machines with few cores per GPU; slides it cannot
            decode (JPEG 2000, other vendors) are read on the CPU. Default: unset (CPU readers)
        downsample: how a read at 2, 4 or 8 times a pyramid level's µm/px is reduced: box (average of the decoded
            level's pixels; the default, the same pixels on every reader path) or dct (JPEG tiles decoded at that
            reduction by the decoder's DCT scaling: faster, a few grey levels apart at sharp edges; see
            benchmarks/results/downsample.md). Features made with the other option are encoded again
        outline_tolerance: simplification of the tissue outlines written to OUT/tissue/<slide>.geojson, in
            level-0 pixels: every point of the exact outline lies within this distance of the written one (fewer
            vertices, smaller files for QuPath), e.g. --outline-tolerance 16; default 0: the mask's exact outline.
            Changes only the GeoJSON of the slides this run tiles (`gigaslide tile` on the same OUT rewrites it for
            slides already tiled, keeping their tiles)
    """
    import torch

    from gigaslide.cli.progress import progress_bar
    from gigaslide.cli.validate import tiling_params
    from gigaslide.encoders import build_encoder
    from gigaslide.features.extract import encode_slides
    from gigaslide.slides import find_slides


    def params_at(mpp: float, tile_size: int):  # noqa: ANN202 - TilingParams (lazy import)
        return _with_outline(tiling_params(mpp, tile_size, overlap, min_tissue, background, tissue_from,
                                           tissue_classes, tissue_detect), outline_tolerance)

    params_at(0.5 if mpp is None else mpp, 224 if tile_size is None else tile_size)  # bad options: before any work
    torch.set_num_threads(max(1, threads))
    files = find_slides(slides)
    enc = build_encoder(encoder, weights)
    if mpp is None or tile_size is None:  # the encoder's own field of view (an export's pretrain --mpp/--tile-size)
        own = mpp is not None or enc.spec.native_mpp is not None
        mpp = (enc.spec.native_mpp or 0.5) if mpp is None else mpp
        tile_size = enc.spec.input_size if tile_size is None else tile_size
        whose = "the encoder's own" if own else "the default: the encoder records no µm/px of its training tiles"
        print(f"tiles of {tile_size} px at {mpp} µm/px ({whose}; --tile-size / --mpp to choose)", file=sys.stderr)
    params = params_at(mpp, tile_size)
    if weights == "random":
        print("note: random weights -- features are for tests and benchmarks only", file=sys.stderr)
    with progress_bar("encode") as update:
        res = encode_slides(files, out, enc, params, batch_size=batch_size,
                            workers=workers, precision=precision, device=device, slide_mpp=slide_mpp, progress=update,
                            compile_model=compile, tile_workers=tile_workers, tile_ahead=tile_ahead,
                            fold_bn=fold_bn, decode_device=decode_device, downsample=downsample)
    rate = res.tiles / res.seconds if res.seconds else 0.0
    # the precision only of tiles encoded now: with none, res.precision is a placeholder (fp32), not the files'
    speed = f", {rate:.1f} tiles/s, {res.precision}" if res.tiles else ""
    print(f"encoded {len(res.done)} slides ({res.tiles} tiles{speed}; "
          f"{res.tiling_seconds:.1f} s of {res.seconds:.1f} s tiling before encoding), "
          f"skipped {len(res.skipped)} finished, failed {len(res.failed)} -> {Path(out) / 'features'}")
    for sid, who in res.others.items():
        print(f"left to another process: {sid} (locked by {who})", file=sys.stderr)
    for sid, err in res.failed.items():
        print(f"failed {sid}: {err}", file=sys.stderr)
    for sid, err in res.failed_elsewhere.items():
        print(f"failed {sid} (on another rank): {err}", file=sys.stderr)
    if res.mixed and res.rank == 0:
        sid, what = next(iter(res.mixed.items()))
        more = f" and {len(res.mixed) - 1} more slide(s)" if len(res.mixed) > 1 else ""
        print(f"warning: {Path(out) / 'features'} also holds features of slides not in this job made otherwise "
              f"({sid}: {what}){more}; train-mil and slide SSL refuse a mixed folder -- encode those slides again "
              "with these settings, or encode into another --out", file=sys.stderr)
    if res.world > 1 and res.rank != 0:  # torchrun stops every rank when one exits with an error: rank 0 reports
        if res.failed:
            print(f"note: rank {res.rank}: {len(res.failed)} slide(s) failed here; rank 0 gives the job's exit status "
                  "once every rank's slides are done", file=sys.stderr)
        return
    _raise_if_failed({**res.failed, **res.failed_elsewhere}, len(files), Path(out) / "manifest.json",
                     left=len(res.others))


COMMANDS = {
    "info": Command(info, positional="slide", nargs=None),
    "tile": Command(tile, positional="slides"),
    "encoders": Command(encoders),
    "encode": Command(encode, positional="slides"),
}

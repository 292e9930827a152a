"""The Giga-SSL augmented-view cache: per slide, ``views`` random tile subsets, each encoded from
augmented images with ONE augmentation shared by all tiles of the view, plus the plain features.

Layout of ``CACHE/``: ``features/<slide_id>.h5`` (one per slide, a regular feature file, so
``embed-slides --features CACHE`` and every feature-file reader work on it) holding

* ``features`` [N, D] float32 and ``coords`` [N, 2] level-0 px: the plain (non-augmented) tiles,
* ``views`` [V, T, D] float16 and ``view_coords`` [V, T, 2] level-0 px: the augmented views,
* ``view_tiles`` [V, T] int: which plain tile each view tile is,
* attrs: provenance (encoder, weights, mpp, tile size, views, tiles per view, seed, augmentation; the slide's
  ``background`` and ``edge_fill``: what the outside of the slide reads as in edge tiles, black on dark-background
  (fluorescence) slides, as ``encode`` reads them; ``background_option``: the ``--background`` it was made with);

``patches/<slide_id>.h5``: the tile grid (spine); ``cache.json``: the cache's parameters and its full
provenance record (tile mpp, tile size, encoder, encoder weights sha256, seed; ``gigaslide.provenance``).

Slides with fewer tissue tiles than ``tiles_per_view`` are **kept**: their views are drawn with
replacement (a warning names them and ``attrs['with_replacement']`` is set); slides with no tiles
are skipped and listed. Each slide is written atomically; a re-run skips finished slides (another slide file
under a cached id -- other size, level-0 size or resolution -- is cached again, with its own tile grid; a
dark-background slide
cached before edge tiles were padded black, with no ``edge_fill``, is cached again, and so is one cached with another
``--background``); a disk budget stops the run with
a clear message before the slide that would exceed it. One process writes a cache at a time
(``CACHE/.augment-cache.lock``, taken over when its holder died): a second one on the same ``--out`` is refused with
one line naming the first.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gigaslide import atomic, runs
from gigaslide.encoders import Encoder, build_encoder
from gigaslide.encoders.inference import for_inference, nonfinite_error
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.locks import ItemLock
from gigaslide.provenance import decode_attrs
from gigaslide.slides import by_slide_id, open_slide
from gigaslide.tiling import IDENTITY_KEY, Scan, TilingParams, layout, load_grid, tile_slide
from gigaslide.tiling.annotations import classes_attr, tissue_attrs
from gigaslide.tiling.store import level0_dimensions
from gigaslide.tiling.tissue import check_background

CACHE_JSON = "cache.json"
#: How augment-cache runs its encoder in fp32 (the fix of features that overflowed in fp16 / bf16).
FP32 = "re-run augment-cache with --precision fp32"
#: The cache's writer lock (``CACHE/.augment-cache.lock``; hidden, so not part of the cache's fingerprint).
CACHE_LOCK = ".augment-cache"
#: Free space kept beyond a slide's estimated file (:func:`cache_bytes`): HDF5 metadata, its tile grid.
FREE_MARGIN = 1 << 20
#: Parameters that must agree between runs writing into one cache.
CACHE_KEYS = ("encoder", "encoder_weights_sha256", "mpp", "tile_size", "views", "tiles_per_view", "seed", "augment",
              "min_tissue", "tissue_source", "tissue_classes")  # the last three: absent from caches built before them


#: A slide file's recipe besides its encoder name and shape: a file of other weights, mpp, seed or augmentation is not
#: finished (cache.json refuses such a rebuild, but a cache without one -- deleted, or built before it -- skipped the
#: slides cached with other weights and cached the others with the new ones: a mixed cache, and a cache.json naming the
#: new weights for every slide).
RECIPE_KEYS = ("encoder_weights_sha256", "mpp", "seed", "augment")


@dataclass
class CacheResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished
    empty: list[str] = field(default_factory=list)  # no tissue tiles
    with_replacement: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # slide id -> one-line reason (the batch went on)
    bytes_written: int = 0
    seconds: float = 0.0
    precision: dict | None = None  # the PrecisionChoice record this invocation encoded with (None: nothing encoded)


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def draw_views(n_tiles: int, views: int, tiles_per_view: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """[V, T] tile indices: each view a random subset (with replacement only when n_tiles < T)."""
    if n_tiles <= 0:
        raise ValueError("no tiles")
    replace_ = n_tiles < tiles_per_view
    idx = np.stack([rng.choice(n_tiles, size=tiles_per_view, replace=replace_) for _ in range(views)])
    return idx.astype(np.int64), replace_


class SharedAugment:
    """One random augmentation per view, applied identically to every tile of it (same generator
    state for each tile: same crop box, flips, rotation, stain and colour jitter). Uses the tile-SSL
    ``pathology`` recipe (Kang et al. 2023) with a milder crop and no grayscale."""

    def __init__(self, tile_size: int):
        from gigaslide.ssl.tile.augment import PRESETS

        self.recipe = replace(PRESETS["pathology"], size=tile_size, scale=(0.5, 1.0), gray=0.0)

    def __call__(self, tiles: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float [T, 3, H, W] in [0, 1]."""
        from gigaslide.ssl.tile.augment import apply_view, to_float

        state = g.get_state()
        out = []
        for t in tiles:
            g.set_state(state)
            out.append(apply_view(to_float(t), self.recipe, g))
        return torch.stack(out)


def _encode(encoder: Encoder, batches: Sequence[torch.Tensor], device: torch.device, precision: str) -> np.ndarray:
    from gigaslide.devices import autocast_ctx

    outs = []
    with torch.inference_mode(), autocast_ctx(device, precision):
        for b in batches:
            outs.append(encoder(b.to(device)).float().cpu())
    return torch.cat(outs).numpy()


def _read(slide, coords: np.ndarray, tile_size: int, mpp: float,  # noqa: ANN001
          background: str | None = "bright") -> np.ndarray:
    """Tiles at ``coords``; the part of an edge tile outside the slide is the ``background``'s (the grid's: black
    on a dark-background slide, as ``encode`` reads it)."""
    out = np.empty((len(coords), tile_size, tile_size, 3), np.uint8)
    level = slide.choose_level(mpp)
    for k, (x, y) in enumerate(coords):
        out[k] = slide.read_region((int(x), int(y)), (tile_size, tile_size), mpp, level=level, background=background)
    return out


def _check_manifest(out: Path, params: dict) -> None:
    mf = out / CACHE_JSON
    if not mf.is_file():
        return
    try:
        old = json.loads(mf.read_text())
    except ValueError:
        raise GigaslideError("cache.json is not valid JSON", path=mf, fix="delete the cache folder and rebuild it") from None
    diff = [k for k in CACHE_KEYS if k in old and old[k] != params[k]]
    if diff:
        desc = ", ".join(f"{k}: {old[k]} (cache) vs {params[k]} (now)" for k in diff)
        raise GigaslideError(f"this cache was built with other parameters ({desc}); one cache holds one encoder/recipe",
                             path=out, fix="use a new --out for the new encoder or parameters")


def cache_bytes(n_tiles: int, dim: int, views: int, tiles_per_view: int) -> int:
    """Estimated file size of one slide: plain fp32 features + fp16 views + coords."""
    return n_tiles * (dim * 4 + 16) + views * tiles_per_view * (dim * 2 + 16 + 8) + 16_384


@runs.keeps_caller_rng
def build_augment_cache(slides: Sequence[str | os.PathLike], out: str | os.PathLike, encoder: Encoder | str, *,
                        weights: str = "default", views: int = 25, tiles_per_view: int = 25, mpp: float = 0.5,
                        tile_size: int = 224, min_tissue: float = 0.25, seed: int = 0, max_gb: float | None = None,
                        batch_size: int = 64, precision: str = "auto", device: str = "auto",
                        slide_mpp: float | str | None = None, tissue_from: str | os.PathLike | None = None,
                        tissue_classes: Sequence[str] | None = None, tissue_detect: bool = False,
                        background: str = "auto", log=print) -> CacheResult:  # noqa: ANN001
    """Build (or resume) the augmented-view cache of ``slides`` under ``out`` (see module doc).

    ``tissue_from``: a folder of ``<slide_id>.geojson`` tissue annotations used instead of tissue detection
    (:mod:`gigaslide.tiling.annotations`), ``tissue_classes`` the classes that count; ``tissue_detect``: only the
    detected tissue inside them. ``background``: ``auto`` (detected from the thumbnail), ``bright`` (glass) or ``dark``
    (fluorescence), as ``tile --background``: the tissue detection's and the fill of edge tiles outside the slide.

    ``precision="auto"`` is resolved once per invocation, on the first slide's first batch, by
    :func:`gigaslide.devices.choose_precision` with that batch as its probe (as ``encode`` does): bf16 on
    CPU only where the CPU computes it natively and it agrees with fp32. The choice is recorded in every
    slide file written (``precision``, ``precision_requested``, ``bf16_cosine``, ``precision_basis``, as
    ``encode`` does) and returned in :attr:`CacheResult.precision`."""
    from gigaslide.devices import pick_device

    if views < 2:
        raise GigaslideError(f"--views {views}: SimCLR needs at least 2 views per slide", fix="use e.g. --views 25")
    if tiles_per_view < 1:
        raise GigaslideError(f"--tiles-per-view {tiles_per_view} must be >= 1", fix="use e.g. --tiles-per-view 25")
    if not slides:
        raise GigaslideError("no slides given", fix="pass slide files: gigaslide augment-cache a.svs b.svs --out CACHE")
    check_background(background)
    enc = build_encoder(encoder, weights, seed=seed) if isinstance(encoder, str) else encoder
    dev = pick_device(device)
    enc = for_inference(enc.to(dev))  # batch norms folded: inference only
    out = atomic.ensure_writable_dir(out)
    lock = ItemLock(out, CACHE_LOCK)
    if not lock.acquire():  # a second writer would delete the first one's temporary files (which then failed with a
        # traceback) and cache the same slides again
        raise GigaslideError(f"another augment-cache ({lock.describe()}) is writing this cache", path=out,
                             fix="wait for it to finish and re-run the same command (it resumes), or use another --out")
    try:
        return _build(slides, out, enc, dev, views=views, tiles_per_view=tiles_per_view, mpp=mpp, tile_size=tile_size,
                      min_tissue=min_tissue, seed=seed, max_gb=max_gb, batch_size=batch_size, precision=precision,
                      slide_mpp=slide_mpp, tissue_from=tissue_from, tissue_classes=tissue_classes,
                      tissue_detect=tissue_detect, background=background, log=log, beat=lock.refresh)
    finally:
        lock.release()


def _build(slides: Sequence[str | os.PathLike], out: Path, enc: Encoder, dev: torch.device, *, views: int,
           tiles_per_view: int, mpp: float, tile_size: int, min_tissue: float, seed: int, max_gb: float | None,
           batch_size: int, precision: str, slide_mpp: float | str | None, tissue_from: str | os.PathLike | None,
           tissue_classes: Sequence[str] | None, tissue_detect: bool, background: str, log,  # noqa: ANN001
           beat=lambda: None) -> CacheResult:  # noqa: ANN001
    """:func:`build_augment_cache` once it holds the cache's lock; ``beat`` is its heartbeat, called every batch (a
    process on another host takes over a lock not refreshed for :data:`gigaslide.locks.STALE_AFTER_S`)."""
    from gigaslide.devices import PrecisionChoice, choose_precision
    from gigaslide.provenance import provenance

    feat_dir = atomic.ensure_writable_dir(out / "features")
    atomic.clean_stale_tmp(feat_dir)  # no other live writer (the lock): these are a killed run's
    tiling = TilingParams(mpp=mpp, tile_size=tile_size, min_tissue=min_tissue, background=background,
                          tissue_from=None if tissue_from is None else str(tissue_from),
                          tissue_classes=tuple(tissue_classes) if tissue_classes else None,
                          tissue_detect=bool(tissue_detect))
    params = {"encoder": enc.spec.name, "encoder_weights_sha256": enc.weights_id, "mpp": float(mpp),
              "tile_size": int(tile_size), "views": int(views), "tiles_per_view": int(tiles_per_view), "seed": int(seed),
              "augment": "shared-view pathology (flip/rot90/crop 0.5-1/stain/colour/blur)", "embed_dim": enc.embed_dim,
              "min_tissue": float(min_tissue), "tissue_source": tiling.tissue_source,
              "tissue_classes": classes_attr(tiling.tissue_classes)}
    _check_manifest(out, params)
    if not (out / CACHE_JSON).is_file():  # written once: a resumed build leaves it (and so the cache's fingerprint,
        # which runs trained on the cache check when they resume) unchanged
        atomic.write_json(out / CACHE_JSON, {**provenance("augment_cache", mpp=float(mpp), tile_size=int(tile_size),
                                                          encoder=enc.spec.name, encoder_weights_sha256=enc.weights_id,
                                                          seed=int(seed), run=str(out)), **params})
    aug = SharedAugment(tile_size)
    budget = None if max_gb is None else int(max_gb * 1e9)
    used = sum(f.stat().st_size for f in feat_dir.glob("*.h5"))
    res = CacheResult()
    choice: PrecisionChoice | None = None
    t0 = time.perf_counter()
    for i, (path, sid, taken) in enumerate(by_slide_id(slides)):
        if taken is not None:  # one cache file per slide id: the second slide was reported as cached already
            res.failed[str(path)] = taken
            log(f"[{i + 1}/{len(slides)}] {sid}: failed -- {taken}")
            continue
        try:
            with open_slide(path, mpp=slide_mpp) as s:
                sid, scan = s.id, Scan.of(s)
            target, size = feat_dir / f"{sid}.h5", _size(path)
            if _finished(target, params, tiling, out, path, slide_mpp, scan=scan, size=size):
                res.skipped.append(sid)
                continue
            if _other_slide(target, size):  # another file under this id: its tile grid is not this slide's
                layout(out, sid)["coords"].unlink(missing_ok=True)
            try:
                grid = tile_slide(path, out, tiling, slide_mpp=slide_mpp, overlays=False)
            except GigaslideError as e:
                if "no tissue tiles" not in e.what:
                    raise
                # stacklevel: the caller of build_augment_cache (3 is its RNG wrapper, keeps_caller_rng)
                warnings.warn(f"{sid}: no tissue tiles, skipped", stacklevel=4)
                res.empty.append(sid)
                continue
            need = cache_bytes(len(grid), enc.embed_dim, views, tiles_per_view)
            if budget is not None and used + need > budget:
                raise GigaslideError(
                    f"disk budget of {max_gb} GB reached: {len(res.done) + len(res.skipped)} slides cached, the next "
                    f"({sid}, ~{need / 1e6:.1f} MB) would exceed it; finished slides are kept",
                    path=out, fix="raise --max-gb (or free space) and re-run the same command: it resumes")
            free = _free_bytes(feat_dir)
            if free is not None and free < need + FREE_MARGIN:  # h5py hitting a full disk mid-write printed pages of
                # tracebacks and crashed the process (segmentation fault); every next slide would fail the same way
                raise GigaslideError(
                    f"disk full: {free / 1e6:.1f} MB free, the next slide ({sid}) needs ~{need / 1e6:.2f} MB and "
                    f"{FREE_MARGIN / 1e6:.0f} MB of headroom; "
                    f"{len(res.done) + len(res.skipped)} slides cached, finished slides are kept", path=feat_dir,
                    fix="free disk space (or use another --out) and re-run the same command: it resumes")
            rng = slide_rng(seed, sid)
            idx, with_repl = draw_views(len(grid), views, tiles_per_view, rng)
            if with_repl:
                warnings.warn(f"{sid}: {len(grid)} tiles < --tiles-per-view {tiles_per_view}; views drawn with replacement",
                              stacklevel=4)  # the caller of build_augment_cache (its RNG wrapper: 3)
                res.with_replacement.append(sid)
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            # tiles are read a batch at a time (a whole slide's 224 px tiles are ~7 GB at 50,000 tiles); the views'
            # tiles (at most views x tiles_per_view) are read once more, for their augmentations
            plain = np.empty((len(grid), enc.embed_dim), np.float32)
            background = grid.extra.get("background")
            with open_slide(path, mpp=slide_mpp) as s:
                for j in range(0, len(grid), batch_size):
                    beat()
                    batch = torch.from_numpy(_read(s, grid.coords[j:j + batch_size], tile_size, mpp, background))
                    if choice is None:  # the first batch of the invocation is the probe (fp32 and bf16 by auto)
                        first = batch.to(dev)
                        choice = choose_precision(dev, precision, probe=lambda first=first: enc(first[:8]))
                        res.precision = choice.record()
                        del first
                    plain[j:j + len(batch)] = _encode(enc, [batch], dev, choice.resolved)
                bad = nonfinite_error(plain, choice.resolved, what=f"slide {sid}", path=str(path), coords=grid.coords,
                                      in_fp32=FP32)
                if bad is not None:  # NaN features must never be cached (pretraining's loss, every embedding: NaN)
                    raise bad
                used_tiles, where = np.unique(idx, return_inverse=True)
                tiles = _read(s, grid.coords[used_tiles], tile_size, mpp, background)
            where = where.reshape(idx.shape)
            view_feats = np.empty((views, tiles_per_view, enc.embed_dim), np.float16)
            group = max(1, batch_size // tiles_per_view)  # views encoded together (fills the batch)
            for v0 in range(0, views, group):
                beat()
                augmented = torch.cat([aug(torch.from_numpy(tiles[where[v]]), g)
                                       for v in range(v0, min(v0 + group, views))])
                f = _encode(enc, [augmented[j:j + batch_size] for j in range(0, len(augmented), batch_size)], dev,
                            choice.resolved)
                bad = nonfinite_error(f, choice.resolved, what=f"the augmented views of slide {sid}", path=str(path),
                                      in_fp32=FP32)
                if bad is not None:
                    raise bad
                with np.errstate(over="ignore"):  # said below, in one line (not as a numpy warning)
                    view_feats[v0:v0 + group] = f.reshape(-1, tiles_per_view, enc.embed_dim).astype(np.float16)
                if not np.isfinite(view_feats[v0:v0 + group]).all():  # finite in fp32, inf as the cache's float16
                    raise GigaslideError(f"slide {sid}: view features exceed float16's range (+-65504, the dtype of "
                                         f"cached views; largest {np.abs(f).max():.3g}); nothing was written",
                                         path=str(path), fix="use an encoder whose features stay within float16's "
                                                             "range (or scale its output)")
            del tiles
            attrs = {**params, "run": str(out), "slide_id": sid, "slide_path": os.path.abspath(path),  # as encode's
                     "slide_bytes": size, "slide_mpp": grid.slide_mpp, IDENTITY_KEY: scan.identity or "",
                     "with_replacement": int(with_repl), "precision": choice.resolved,
                     "precision_requested": choice.requested, "bf16_cosine": choice.bf16_cosine,
                     "precision_basis": choice.basis, "cache_kind": "gigassl_views", "complete": 1,
                     "background": background, "edge_fill": grid.edge_fill, "background_option": tiling.background,
                     **tissue_attrs(grid.extra)}
            coords_attrs = {"patch_size": tile_size, "patch_size_level0": grid.tile_size_level0,
                            "patch_level": grid.read_level, "target_mpp": float(mpp), "level0_mpp": grid.slide_mpp,
                            "level0_width": int(grid.slide_dimensions[0]),
                            "level0_height": int(grid.slide_dimensions[1])}
            store.save(target, plain.astype(np.float32), grid.coords, attrs=attrs, coords_attrs=coords_attrs,
                       extra={"views": view_feats, "view_coords": grid.coords[idx], "view_tiles": idx})
            size = target.stat().st_size
            used += size
            res.bytes_written += size
            res.done.append(sid)
            log(f"[{i + 1}/{len(slides)}] {sid}: {len(grid)} tiles, {views}x{tiles_per_view} views, {size / 1e6:.2f} MB")
        except GigaslideError as e:
            if e.what.startswith(("disk budget", "disk full")):
                raise  # the batch stops by design; finished slides are kept
            res.failed[sid] = e.one_line()  # a broken slide is reported, the batch goes on
            log(f"[{i + 1}/{len(slides)}] {sid}: failed -- {e.one_line()}")
    res.seconds = time.perf_counter() - t0
    return res


def _finished(path: Path, params: dict, tiling: TilingParams, out: Path | None = None,
              slide: str | os.PathLike | None = None, slide_mpp: float | str | None = None, *,
              scan: Scan | None = None, size: int | None = None) -> bool:
    """A complete slide file of this recipe, its tiles from the same tissue (detected, or the same annotation file)
    at the same ``--background`` (``background_option``; a file without it was made at ``auto``), and its edge tiles
    padded as ``encode`` pads them: a file without ``edge_fill`` (cached before edge tiles were
    padded black on dark-background slides) is finished only where the slide is not dark (see :func:`_was_dark`).
    ``scan``: the slide's resolution and level-0 size now; a file made from another scan (another slide file under
    the same id, or a corrected ``--slide-mpp``: its ``slide_mpp`` or recorded level-0 size differ) is not finished, nor
    is one whose recorded slide file size (``slide_bytes``) is not ``size`` (a slide of the same size and id moved
    elsewhere is still finished)."""
    if not path.is_file():
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            a = decode_attrs(f.attrs)
            ok = "views" in f and int(a.get("complete", 0)) == 1
            dims = level0_dimensions(decode_attrs(f["coords"].attrs)) if "coords" in f else None
    except OSError:
        return False
    if ok and scan is not None and not scan.made(a.get("slide_mpp"), dims, a.get(IDENTITY_KEY) or None,
                                                 written=path.stat().st_mtime):  # another file of the same size too
        return False
    if ok and size is not None and a.get("slide_bytes") is not None and int(a["slide_bytes"]) != size:
        return False
    return (ok and all(_same(a.get(k), params[k]) for k in ("encoder", "views", "tiles_per_view", "tile_size"))
            and all(_same(a.get(k, params[k]), params[k]) for k in RECIPE_KEYS)  # absent from older files: as now
            and _same(a.get("min_tissue", params["min_tissue"]), params["min_tissue"])
            and tiling.tissue_matches(a, str(a.get("slide_id", path.stem)), a.get("slide_path"))
            and a.get("background_option", "auto") == tiling.background
            and ("edge_fill" in a or not _was_dark(out, str(a.get("slide_id", path.stem)), slide, slide_mpp, tiling)))


def _was_dark(out: Path | None, slide_id: str, slide: str | os.PathLike | None, slide_mpp: float | str | None,
              tiling: TilingParams) -> bool:
    """Whether the slide of a cache file made before ``edge_fill`` was recorded has a dark background (its edge tiles
    were then padded white): from the cache's tile grid (``patches/<slide_id>.h5``), else tiled again (the grid is
    kept, so the rebuild reuses it). Unknown (no cache folder or slide given): not dark."""
    if out is None or slide is None:
        return False
    try:
        grid = load_grid(layout(out, slide_id)["coords"])
    except (GigaslideError, OSError):
        try:
            grid = tile_slide(slide, out, tiling, slide_mpp=slide_mpp, overlays=False)
        except GigaslideError:
            return False  # no tissue tiles: the slide is handled (skipped) as before
    return grid.edge_fill == "dark"


def _other_slide(path: Path, size: int | None) -> bool:
    """The cache file ``path`` was made from a slide file of another size than ``size`` (its ``slide_bytes``)."""
    if size is None or not path.is_file():
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            old = decode_attrs(f.attrs).get("slide_bytes")
    except OSError:
        return False
    return old is not None and int(old) != size


def _free_bytes(folder: Path) -> int | None:
    """Bytes the current user may still write in ``folder``'s file system (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


def _size(path: str | os.PathLike) -> int | None:
    """The slide file's size in bytes (a folder slide, e.g. DICOM: the sum of its files; None: unreadable)."""
    try:
        p = Path(path)
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    except OSError:
        return None


def _same(a, b) -> bool:  # noqa: ANN001
    if isinstance(b, (int, float)) and a is not None:
        return abs(float(a) - float(b)) < 1e-9
    return a == b

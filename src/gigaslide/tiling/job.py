"""Tile one slide end to end: tissue mask -> grid -> coords file + overlays (resumable)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.locks import exclusive_file
from gigaslide.slides import Slide, open_slide
from gigaslide.provenance import file_sha256
from gigaslide.tiling.annotations import SOURCES, annotation_path, annotation_tissue, classes_attr
from gigaslide.tiling.grid import GRID_RULE, TileGrid, make_grid
from gigaslide.tiling.overlay import grid_overlay_png
from gigaslide.tiling.store import load_grid, save_grid
from gigaslide.tiling.stain import StainWarning
from gigaslide.tiling.tissue import (TissueMask, check_background, check_tolerance, largest_speck_um2, min_area_px,
                                    overlay_png, save_geojson, saved_tolerance, segment_tissue)


@dataclass(frozen=True)
class TilingParams:
    mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.25
    background: str = "auto"  # auto, bright (glass) or dark (fluorescence): see tiling.tissue
    tissue_from: str | None = None  # folder of <slide_id>.geojson tissue annotations (None: detect tissue)
    tissue_classes: tuple[str, ...] | None = None  # annotation classes that count as tissue (None: every polygon)
    tissue_detect: bool = False  # with tissue_from: only the detected tissue inside the annotations
    #: simplification (level-0 px) of the tissue outlines written to OUT/tissue/<slide>.geojson: 0 writes the mask's
    #: exact outline (see tiling.tissue.mask_to_geojson); not a tiling setting: a grid is reused whatever it is
    outline_tolerance: float = 0.0

    def matches(self, grid: TileGrid) -> bool:
        return (abs(grid.target_mpp - self.mpp) < 1e-9 and grid.tile_size == self.tile_size
                and grid.overlap == self.overlap and abs(grid.min_tissue - self.min_tissue) < 1e-9
                and grid.extra.get("grid_rule") == GRID_RULE
                and grid.extra.get("background_option", "auto") == self.background
                and self.tissue_matches(grid.extra, grid.slide_id, grid.slide_path))

    @property
    def tissue_source(self) -> str:
        """``detected``, ``annotations`` or ``annotations+detected`` (detected inside the annotations): recorded as
        ``tissue_source`` (absent from detected grids made before it)."""
        return SOURCES[self.tissue_from is not None, self.tissue_from is not None and self.tissue_detect]

    def annotation_file(self, slide_id: str, slide_path: str | os.PathLike | None = None) -> Path | None:
        """The slide's tissue annotation file under ``tissue_from`` (None without one, or when tissue is detected)."""
        return None if self.tissue_from is None else annotation_path(self.tissue_from, slide_id, slide_path)

    def tissue_matches(self, attrs: dict, slide_id: str, slide_path: str | os.PathLike | None = None) -> bool:
        """``attrs`` (of a tile grid or a feature file) had its tissue from the same source: detection, or this
        slide's annotation file with its current content (SHA-256) and the same classes."""
        if attrs.get("tissue_source", "detected") != self.tissue_source:
            return False
        if self.tissue_from is None:
            return True
        p = self.annotation_file(slide_id, slide_path)
        return (p is not None and attrs.get("tissue_annotations_sha256") == file_sha256(p)
                and attrs.get("tissue_classes", "") == classes_attr(self.tissue_classes))

    def as_dict(self) -> dict:
        return asdict(self)


#: File attribute of tile grids and feature files holding :func:`slide_identity` of the slide file they were made from.
IDENTITY_KEY = "slide_identity"
#: :func:`slide_identity` hashes this many blocks of this many bytes, spread evenly over the slide's bytes.
IDENTITY_BLOCKS, IDENTITY_BLOCK_BYTES = 16, 64 * 1024


def _slide_files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) of every file holding the slide at ``path``: the file; a folder slide's (e.g. DICOM) files, by
    their path inside it; a MIRAX ``.mrxs`` index and the files of its companion folder (``<stem>/``)."""
    if path.is_dir():
        return sorted((f.relative_to(path).as_posix(), f) for f in path.rglob("*") if f.is_file())
    files = [("", path)]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        files += sorted((f.relative_to(companion).as_posix(), f) for f in companion.rglob("*") if f.is_file())
    return files


def slide_identity(path: str | os.PathLike) -> str | None:
    """A cheap identity of the slide file(s) at ``path``: ``v1:<bytes>:<hash>``, the total size and a SHA-256 of
    :data:`IDENTITY_BLOCKS` blocks of 64 KiB spread evenly over the bytes (the first and the last included; the whole
    file when it is smaller), plus a folder slide's file names and sizes. About 1 MB is read whatever the slide's size
    (milliseconds on a multi-GB file); it does not depend on the file's name, folder or times, so a slide copied or
    moved elsewhere keeps it, while another file put in place under the same name -- a re-export, a colour-normalised
    copy: every pixel's bytes differ -- gets another (a change confined to bytes no block reads is not seen; the
    full :func:`~gigaslide.provenance.file_sha256` would read the whole slide). None when it cannot be read."""
    try:
        files = [(name, f, f.stat().st_size) for name, f in _slide_files(Path(path))]
        total = sum(n for _, _, n in files)
        h = hashlib.sha256()
        if len(files) > 1 or files[0][0]:
            for name, _, n in files:
                h.update(f"{name}\0{n}\0".encode())
        span = IDENTITY_BLOCKS * IDENTITY_BLOCK_BYTES
        starts = ([0] if total <= span else
                  [round(i * (total - IDENTITY_BLOCK_BYTES) / (IDENTITY_BLOCKS - 1)) for i in range(IDENTITY_BLOCKS)])
        size = total if total <= span else IDENTITY_BLOCK_BYTES
        for start in starts:  # each block read from the files laid end to end
            begin = 0
            for _, f, n in files:
                lo, hi = max(start, begin), min(start + size, begin + n)
                if lo < hi:
                    with open(f, "rb") as fh:
                        fh.seek(lo - begin)
                        h.update(fh.read(hi - lo))
                begin += n
    except (OSError, IndexError):  # unreadable, or a folder without files
        return None
    return f"v1:{total}:{h.hexdigest()[:32]}"


def _changed_at(path: str | os.PathLike) -> float | None:
    """When the slide file(s) at ``path`` last changed or were put there (the latest mtime or ctime: a ``mv`` of an
    older file changes only the ctime); None when they cannot be read."""
    try:
        return max(max(st.st_mtime, st.st_ctime) for st in (f.stat() for _, f in _slide_files(Path(path))))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Scan:
    """A slide's level-0 resolution now (after any ``--slide-mpp``; None: unknown), its level-0 dimensions, and the
    file it was read from (``path``, for :attr:`identity`; None: unknown, identities are not compared).

    A tile grid or feature file records all three (``level0_mpp`` / ``slide_mpp``, ``level_dim``, ``slide_identity``:
    :func:`slide_identity`); one made from another scan -- a corrected ``--slide-mpp``, or another file put in place
    under the same name, even one of the same size and resolution -- is made again."""

    mpp: float | None
    dimensions: tuple[int, int]
    path: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, slide: Slide) -> Scan:
        """The slide's scan; its mpp is unknown (None: nothing made from it is reused) without one, or when its pixels
        are not square (a grid made before such slides were refused is made again, and refused with the reason)."""
        try:
            slide.check_square()
        except GigaslideError:
            return cls(None, slide.dimensions, str(slide.path))
        return cls(float(slide.mpp) if slide.has_mpp else None, slide.dimensions, str(slide.path))

    @classmethod
    def read(cls, path: str | os.PathLike, slide_mpp: float | str | None = None) -> Scan | None:
        """The scan of the slide at ``path`` (``slide_mpp`` as for :func:`tile_slide`); None when it cannot be opened
        (tiling it then says why)."""
        try:
            with open_slide(path, mpp=slide_mpp) as slide:
                return cls.of(slide)
        except Exception:  # noqa: BLE001 - a damaged slide is reported where it is tiled
            return None

    @functools.cached_property
    def identity(self) -> str | None:
        """:func:`slide_identity` of the slide file (read once, when first compared or recorded); None: no ``path``,
        or the file cannot be read."""
        return None if self.path is None else slide_identity(self.path)

    def made(self, mpp: float | None, dimensions: Sequence[int] | None, identity: str | None = None, *,
             written: float | None = None) -> bool:
        """Something recording level-0 ``mpp`` and ``dimensions`` ((w, h)) was made from this scan. Either may be None
        (not recorded, e.g. by another tool): it is not compared. Never when this scan's mpp is unknown, or when a
        recorded value is not a number.

        ``identity``: the :func:`slide_identity` recorded; it must be this slide file's (a scan without ``path`` does
        not compare it). A record without one, made before identities were recorded, is compared as before (mpp and
        dimensions) and, given ``written`` (when the record was written: its file's mtime), also by time: it was
        made from this file only when the file has not changed or been put in place since (see :func:`_changed_at`);
        a slide copied since (``cp`` without ``-p``, a new ctime) is then made again once, which records the identity.
        """
        if self.mpp is None:
            return False
        try:
            if mpp is not None and not math.isclose(float(mpp), self.mpp, rel_tol=1e-9):
                return False
            if dimensions is not None and [int(d) for d in dimensions] != list(self.dimensions):
                return False
        except (TypeError, ValueError):
            return False
        if self.path is None:
            return True
        if identity is not None:
            return self.identity is not None and str(identity) == self.identity
        if written is None:
            return True
        changed = _changed_at(self.path)
        return changed is not None and changed <= written

    def made_grid(self, grid: TileGrid, written: float | None = None) -> bool:
        """``grid`` was made from this scan (a grid without recorded dimensions, ``(0, 0)``, is compared by mpp);
        ``written``: when its file was written (see :meth:`made`)."""
        return self.made(grid.slide_mpp, None if tuple(grid.slide_dimensions) == (0, 0) else grid.slide_dimensions,
                         grid.extra.get(IDENTITY_KEY), written=written)


def layout(out: str | os.PathLike, slide_id: str) -> dict[str, Path]:
    o = Path(out)
    return {
        "coords": o / "patches" / f"{slide_id}.h5",
        "tissue_png": o / "tissue" / f"{slide_id}.png",
        "tissue_geojson": o / "tissue" / f"{slide_id}.geojson",
        "grid_png": o / "grid" / f"{slide_id}.png",
        "features": o / "features" / f"{slide_id}.h5",
    }


def reusable_grid(coords: Path, params: TilingParams, scan: Callable[[], Scan | None]) -> TileGrid | None:
    """The tile grid in ``coords`` when it was made at ``params`` from the slide's scan as it is now (``scan()``,
    called only when there is a grid of these settings to compare); None when there is none, it cannot be read, or
    the settings or the scan differ (another slide file under the name: :meth:`Scan.made_grid`)."""
    if not coords.is_file():
        return None
    try:
        grid = load_grid(coords)
    except GigaslideError:
        return None
    if not params.matches(grid):
        return None
    now = scan()
    try:
        written = coords.stat().st_mtime
    except OSError:
        return None
    return grid if now is not None and now.made_grid(grid, written) else None


def tile_slide(path: str | os.PathLike | Slide, out: str | os.PathLike, params: TilingParams, *,
               slide_mpp: float | str | None = None, overlays: bool = True, reuse: bool = True) -> TileGrid:
    """Tile ``path`` into ``out`` (see :func:`layout`); reuses an existing coords file made with the same params from
    the same scan (the slide's level-0 mpp, after ``slide_mpp``, dimensions and file identity: see :class:`Scan`).

    ``path`` may be a slide that is already open (it stays open; ``slide_mpp`` is then ignored).
    A slide that does not look like bright-field H&E gets one :class:`StainWarning` (also stored in
    the coords file and ``grid.extra["stain_warning"]``)."""
    check_background(params.background)
    check_tolerance(params.outline_tolerance)
    opened = contextlib.nullcontext(path) if isinstance(path, Slide) else open_slide(path, mpp=slide_mpp)
    with opened as slide:
        paths = layout(out, slide.id)
        scan = functools.cache(lambda: Scan.of(slide))  # once, when needed (its identity: when first compared)
        grid = reusable_grid(paths["coords"], params, scan) if reuse else None
        if grid is None:  # tiled under the slide's lock: another process tiling it into `out` is waited for
            with exclusive_file(Path(out) / "locks" / "tile" / f"{slide.id}.lock"):
                grid = reusable_grid(paths["coords"], params, scan) if reuse else None  # it may have just finished
                if grid is None:
                    return _tile_locked(slide, paths, params, scan, overlays)
        if overlays:
            _refresh_outline(slide, params, paths, grid)
        _warn_stain(grid)
        return grid


def _tile_locked(slide: Slide, paths: dict[str, Path], params: TilingParams, scan: Callable[[], Scan],
                 overlays: bool) -> TileGrid:
    """:func:`tile_slide`'s work once no reusable grid is there, the slide's lock held: any temporary of this slide
    in ``out`` is a dead run's."""
    slide.check_target_mpp(params.mpp)  # no scan resolution, or one too coarse: the fix that applies
    # a killed run's temporary files, this slide only; a slide tiled before (its grid damaged or made for other
    # settings) is looked up afresh: its last run may have died after this process listed the folders
    again = paths["coords"].exists()
    for key in ("coords", "tissue_png", "tissue_geojson", "grid_png"):
        atomic.clean_stale_tmp_for(paths[key], cached=not again)
    atomic.clean_stale_tmp_for(_inner_tmp(paths["coords"]), cached=not again)  # see _inner_tmp
    tissue, thumb = _tissue(slide, params)
    grid = make_grid(slide, tissue, target_mpp=params.mpp, tile_size=params.tile_size, overlap=params.overlap,
                     min_tissue=params.min_tissue)
    if overlays:
        overlay_png(thumb, tissue.mask, paths["tissue_png"])
        save_geojson(tissue, paths["tissue_geojson"], tolerance=params.outline_tolerance)
        grid_overlay_png(thumb, tissue.downsample, grid, paths["grid_png"])
    if len(grid) == 0 and params.tissue_from is not None:
        where = "detected tissue within the tissue annotations" if params.tissue_detect else "tissue annotations"
        raise GigaslideError(
            f"no tile is at least {params.min_tissue:.0%} inside the {where} "
            f"({'it covers' if params.tissue_detect else 'they cover'} {100 * tissue.fraction:.1f}% of the thumbnail)",
            path=tissue.info["tissue_annotations"], fix="check the polygons are in level-0 pixels of this slide; "
            "lower --min-tissue or use a smaller --tile-size" + ("; or leave out --tissue-detect" if params.tissue_detect
                                                                 else ""))
    if len(grid) == 0 and tissue.fraction == 0 and params.tissue_from is None:
        _no_tissue_detected(slide, thumb, tissue)
    if len(grid) == 0:
        raise GigaslideError(
            f"no tissue tiles found (tissue covers {100 * tissue.fraction:.1f}% of the thumbnail; min tissue {params.min_tissue})",
            path=slide.path, fix="check the slide is not blank; lower --min-tissue or use a smaller --tile-size",
        )
    _warn_stain(grid, stacklevel=4)  # (at tile_slide's caller)
    if scan().identity is not None:
        grid.extra[IDENTITY_KEY] = scan().identity
    save_grid(grid, paths["coords"])  # the identity with it, in one atomic write
    return grid


def _inner_tmp(path: Path) -> Path:
    """The name a grid write nested in another atomic write took its temporary files after (``.tmp-.tmp-<name>.*``,
    left by a run killed inside it before ``save_grid`` recorded the slide identity itself): not ``path``'s own
    temporaries, so :func:`tile_slide` cleans them explicitly."""
    return path.with_name(atomic.TMP_PREFIX + path.name)


def _refresh_outline(slide: Slide, params: TilingParams, paths: dict[str, Path], grid: TileGrid) -> None:
    """A reused grid's tissue GeoJSON is written again when it is missing or was written at another outline tolerance
    (``--outline-tolerance`` changed on a re-run; a file recording none counts as exact, 0), and its overlay PNGs when
    they are missing (deleted since): the tissue is found again for them. Otherwise only the GeoJSON's first bytes are
    read."""
    path = paths["tissue_geojson"]
    outline = not (path.is_file() and (saved_tolerance(path) or 0.0) == params.outline_tolerance)
    pngs = [k for k in ("tissue_png", "grid_png") if not paths[k].is_file()]
    if not outline and not pngs:
        return
    for key in ["tissue_geojson"] * outline + pngs:
        atomic.clean_stale_tmp_for(paths[key], cached=True)
    tissue, thumb = _tissue(slide, params)
    if outline:
        save_geojson(tissue, path, tolerance=params.outline_tolerance)
    if "tissue_png" in pngs:
        overlay_png(thumb, tissue.mask, paths["tissue_png"])
    if "grid_png" in pngs:
        grid_overlay_png(thumb, tissue.downsample, grid, paths["grid_png"])


def _tissue(slide: Slide, params: TilingParams) -> tuple[TissueMask, np.ndarray]:
    """(tissue mask, thumbnail): from the slide's annotation file with ``params.tissue_from``, else detected."""
    if params.tissue_from is None:
        return segment_tissue(slide, background=params.background)
    p = params.annotation_file(slide.id, slide.path)
    if p is None:
        raise GigaslideError(f"no tissue annotation for slide {slide.id} (looked for {slide.id}.geojson, "
                             f"{slide.id}.json and {Path(slide.path).name}.geojson)",
                             path=params.tissue_from, fix=f"export the slide's tissue polygons as "
                             f"{Path(params.tissue_from) / (slide.id + '.geojson')}, or leave out --tissue-from to detect tissue")
    return annotation_tissue(slide, p, params.tissue_classes, background=params.background, detect=params.tissue_detect)


def _no_tissue_detected(slide: Slide, thumb: np.ndarray, tissue: TissueMask) -> None:
    """Say why detection left no tissue when it found pieces but dropped them all as too small (a resolution given
    too fine makes every piece look small); returns when it found nothing (the caller's blank-slide error)."""
    largest = largest_speck_um2(slide, thumb, tissue.downsample, tissue.info.get("background", "bright"))
    if largest is None:
        rgb = np.asarray(thumb)[..., :3].astype(np.int16)
        if rgb.size and int(np.abs(rgb - rgb[..., :1]).max()) <= 2 and int(rgb.max()) - int(rgb.min()) > 20:
            raise GigaslideError(  # (not blank: it has contrast; "check the slide is not blank" misled)
                "no tissue detected on a grayscale slide: tissue detection looks for stain colour (saturation), "
                "which a grayscale image has none of", path=slide.path,
                fix="draw the tissue (QuPath) and pass it with --tissue-from, or tile a colour (RGB) export")
        return
    least = min_area_px(slide, tissue.downsample) * (tissue.downsample * slide.mpp) ** 2
    raise GigaslideError(
        f"tissue was found but every piece is under the minimum area of {least:,.0f} µm² (the largest: "
        f"{largest:,.0f} µm² at {slide.mpp:.4g} µm/px, from {slide.mpp_info.source}), so none was kept",
        path=slide.path, fix="check the scan resolution (--slide-mpp: a value too fine makes tissue look small), "
                             "or draw the tissue and pass it with --tissue-from")


def _warn_stain(grid: TileGrid, stacklevel: int = 3) -> None:
    msg = grid.extra.get("stain_warning")
    if msg:
        warnings.warn(f"{grid.slide_id}: {msg}", StainWarning, stacklevel=stacklevel)

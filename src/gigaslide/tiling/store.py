"""Tile-coordinate files: ``<out>/patches/<slide_id>.h5`` in the CLAM/TRIDENT layout.

Dataset ``coords`` [N, 2] int64 level-0 (x, y), with attrs ``patch_size`` (target px),
``patch_size_level0``, ``patch_level`` (pyramid level read), ``target_mpp``, ``level0_mpp``, and TRIDENT's
``level0_magnification`` / ``target_magnification`` (its convention: 10 / mpp, kept unrounded), from which
TRIDENT's patcher reads ``patch_size * level0_magnification / target_magnification`` level-0 px: each tile's own
footprint at any ``--mpp`` (without them TRIDENT falls back to the CLAM reading). CLAM's reader reads
``patch_size`` px of level ``patch_level``: the same footprint when ``--mpp`` is that level's resolution; at
other resolutions (read from a finer level and reduced) use ``patch_size_level0``, as TRIDENT and TITAN do.
CLAM's level attrs mean what CLAM's ``create_patches_fp.py`` writes: ``level_dim`` and ``downsampled_level_dim`` the
(w, h) of pyramid level ``patch_level`` (not of level 0), ``downsample`` that level's (x, y) level-0 px per level px
(level-0 size / level size, as CLAM estimates it); level 0's (w, h) are TRIDENT's ``level0_width`` /
``level0_height``. (Files written before this held level 0's (w, h) in ``level_dim``: :func:`level0_dimensions`
reads both.) Plus
``tissue`` [N] (tissue fraction, outside the slide counted as glass), ``padding`` [N] (fraction of
the tile outside the slide, read as the background: white glass, black when ``background`` is dark) and
file-level provenance attrs, among them
``grid_rule``, ``background`` and ``stain`` (plus ``stain_warning`` when it is not H&E).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.provenance import check_format, decode_attrs, provenance
from gigaslide.errors import GigaslideError
from gigaslide.tiling.annotations import TISSUE_KEYS
from gigaslide.tiling.grid import LEVEL_DIM_KEY, TileGrid

#: ``TileGrid.extra`` keys written as file attrs (scalars / strings only); ``slide_identity``: the slide file's
#: identity (``gigaslide.tiling.job.slide_identity``), written in the same atomic write as the grid.
EXTRA_KEYS = ("grid_rule", "background", "background_option", "stain", "stain_warning", *TISSUE_KEYS, "slide_identity")


_STR = np.dtype(object)
_VSTR, _VSTR_ASCII = h5py.string_dtype(), h5py.string_dtype("ascii")
_MTYPES: dict[tuple, h5py.h5t.TypeID] = {}


def _mtype(dt: np.dtype) -> h5py.h5t.TypeID:
    """h5py's memory type of ``dt``, made once per dtype (metadata included: enum values, string encoding)."""
    key = (dt, repr(dt.metadata))
    m = _MTYPES.get(key)
    if m is None:
        m = _MTYPES[key] = h5py.h5t.py_create(dt)
    return m


def h5_attrs(obj: h5py.HLObject) -> dict:
    """``decode_attrs(obj.attrs)`` (the same dict), faster: scalar strings and numeric scalars and arrays -- every
    attr gigaslide writes -- are read through h5py's low-level calls (one open, type and space each) instead of
    ``attrs[name]`` (which makes each type twice and reads the space twice); any other attr (empty, compound,
    fixed-length strings or string arrays: other tools' files) is read as h5py reads it."""
    oid, out = obj.id, {}
    for name in obj.attrs:  # h5py's order and name decoding
        raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
        aid = h5py.h5a.open(oid, raw)
        ft = aid.get_type()
        cls = ft.get_class()
        space = aid.get_space()
        kind = space.get_simple_extent_type()
        if kind == h5py.h5s.SCALAR and cls == h5py.h5t.STRING and ft.is_variable_str():
            buf = np.empty((), _STR)
            aid.read(buf, mtype=_mtype(_VSTR_ASCII if ft.get_cset() == h5py.h5t.CSET_ASCII else _VSTR))
            v = buf[()]
            out[name] = v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
        elif kind in (h5py.h5s.SCALAR, h5py.h5s.SIMPLE) and cls in (h5py.h5t.INTEGER, h5py.h5t.FLOAT, h5py.h5t.ENUM):
            dt = ft.dtype
            buf = np.zeros(space.shape, dt)
            aid.read(buf, mtype=_mtype(dt))
            out[name] = buf.tolist()  # a Python scalar for a scalar, nested lists for an array (as decode_attrs)
        else:
            out.update(decode_attrs({name: obj.attrs[name]}))
    return out


def _checksummed(a: np.ndarray) -> dict:
    """Fletcher-32 checksums: a file damaged on disk is refused (and recomputed) instead of read wrong."""
    return {"fletcher32": True, "chunks": True} if np.asarray(a).size else {}


def _patch_level_dim(grid: TileGrid) -> tuple[int, int] | None:
    """The (w, h) of the grid's pyramid level ``read_level``: level 0's for level 0, else as the grid records it
    (:func:`~gigaslide.tiling.grid.make_grid`, or a coords file), else -- a grid loaded from a file written before it
    was recorded -- read from the slide (None when it cannot be opened: a slide moved since it was tiled)."""
    if grid.read_level == 0:
        return (int(grid.slide_dimensions[0]), int(grid.slide_dimensions[1]))
    known = grid.extra.get(LEVEL_DIM_KEY)
    if known is not None:
        return (int(known[0]), int(known[1]))
    from gigaslide.slides import open_slide

    try:
        with open_slide(grid.slide_path) as s:
            if tuple(s.dimensions) != tuple(grid.slide_dimensions) or grid.read_level >= s.level_count:
                return None  # another scan under the name: its levels are not this grid's
            dim = s.level_dimensions[grid.read_level]
    except Exception:  # noqa: BLE001 - a slide gone or unreadable: the level attrs are left out, never guessed
        return None
    return (int(dim[0]), int(dim[1]))


def coords_attrs(grid: TileGrid) -> dict:
    """The ``coords`` dataset's attrs (CLAM's and TRIDENT's, see the module docstring): in tile-coordinate files
    and in feature files alike. CLAM's ``level_dim`` / ``downsampled_level_dim`` / ``downsample`` describe level
    ``patch_level``; they are left out when that level's size cannot be known (its slide gone)."""
    W, H = (int(grid.slide_dimensions[0]), int(grid.slide_dimensions[1]))
    a = {"patch_size": grid.tile_size, "patch_size_level0": grid.tile_size_level0, "patch_level": grid.read_level,
         "target_mpp": grid.target_mpp, "level0_mpp": grid.slide_mpp, "overlap": grid.overlap,
         "level0_width": W, "level0_height": H, "name": grid.slide_id,
         "level0_magnification": 10.0 / grid.slide_mpp, "target_magnification": 10.0 / grid.target_mpp}
    dim = _patch_level_dim(grid)
    if dim is not None and min(dim) > 0:
        a.update(level_dim=list(dim), downsampled_level_dim=list(dim), downsample=[W / dim[0], H / dim[1]])
    return a


def level0_dimensions(attrs: dict) -> list[int] | None:
    """Level 0's [w, h] from ``coords`` attrs: TRIDENT's ``level0_width`` / ``level0_height``; in a gigaslide file
    written before them (no ``level0_width``), ``level_dim`` (then level 0's); None when neither is recorded."""
    if attrs.get("level0_width") is not None and attrs.get("level0_height") is not None:
        return [int(attrs["level0_width"]), int(attrs["level0_height"])]
    dims = attrs.get("level_dim")
    return None if dims is None else [int(dims[0]), int(dims[1])]


def save_grid(grid: TileGrid, path: str | os.PathLike, *, seed: int | None = None) -> Path:
    with atomic.h5_file(path) as f:
        d = f.create_dataset("coords", data=grid.coords.astype(np.int64), **_checksummed(grid.coords))
        d.attrs.update(coords_attrs(grid))
        f.create_dataset("tissue", data=grid.tissue.astype(np.float32), **_checksummed(grid.tissue))
        f.create_dataset("padding", data=np.asarray(grid.padding, np.float32), **_checksummed(grid.tissue))
        f.attrs.update(provenance(
            kind="tile_coords", slide_id=grid.slide_id, slide_path=grid.slide_path, mpp=grid.target_mpp,
            tile_size=grid.tile_size, overlap=grid.overlap, min_tissue=grid.min_tissue, slide_mpp=grid.slide_mpp,
            seed=seed, **{k: grid.extra[k] for k in EXTRA_KEYS if grid.extra.get(k) is not None},
        ))
    return Path(path)


def _positive(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f > 0 and f == f else None


def load_grid(path: str | os.PathLike) -> TileGrid:
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            coords = np.asarray(f["coords"][:], dtype=np.int64)
            ca = h5_attrs(f["coords"])
            fa = h5_attrs(f)
            tissue = np.asarray(f["tissue"][:], np.float32) if "tissue" in f else np.ones(len(coords), np.float32)
            padding = np.asarray(f["padding"][:], np.float32) if "padding" in f else None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:  # truncated / damaged / another tool's file
        raise GigaslideError(f"not a readable tile-coordinate file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})",
                             path=p, fix="delete it and re-run `gigaslide tile` (or encode)") from None
    check_format(fa, p)  # a newer gigaslide's layout: refused here, tiled again by `tile` / `encode`
    n = len(coords) if coords.ndim == 2 and coords.shape[1:] == (2,) else -1
    if n < 0 or len(tissue) != n or (padding is not None and len(padding) != n):
        raise GigaslideError(f"inconsistent tile-coordinate file (coords {coords.shape}, tissue {tissue.shape})", path=p,
                             fix="delete it and re-run `gigaslide tile` (or encode)")
    target_mpp = _positive(ca.get("target_mpp", fa.get("mpp")))
    slide_mpp = _positive(ca.get("level0_mpp", fa.get("slide_mpp")))
    if target_mpp is None or slide_mpp is None:  # a missing mpp is absent, never 0: refuse instead of guessing
        raise GigaslideError("tile-coordinate file has no mpp (target_mpp / level0_mpp attrs)", path=p,
                             fix="re-run `gigaslide tile` (or encode) so the coords carry their resolution")
    dims = level0_dimensions(ca) or [0, 0]
    if "level0_width" in ca and ca.get("level_dim") is not None:  # CLAM's level_dim: level patch_level's (w, h)
        fa = {**fa, LEVEL_DIM_KEY: [int(d) for d in ca["level_dim"]]}
    return TileGrid(
        coords=coords, tissue=tissue, slide_id=str(fa.get("slide_id", ca.get("name", p.stem))),
        slide_path=str(fa.get("slide_path", "")), target_mpp=target_mpp, tile_size=int(ca.get("patch_size", 0)),
        overlap=int(ca.get("overlap", 0)), slide_mpp=slide_mpp, slide_dimensions=(int(dims[0]), int(dims[1])),
        read_level=int(ca.get("patch_level", 0)), min_tissue=float(fa.get("min_tissue", 0.0)), extra=fa,
        padding=padding,
    )

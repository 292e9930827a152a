"""Feature files: one HDF5 per slide, in the layout CLAM and TRIDENT tools read.

``features`` [N, D] float32 (or float16), ``coords`` [N, 2] int64 level-0 (x, y) with the tile
attrs (``patch_size``, ``patch_size_level0``, ``patch_level``, ``target_mpp``, ``level0_mpp``; CLAM's and TRIDENT's
level attrs as :func:`gigaslide.tiling.store.coords_attrs` writes them: ``level_dim`` is level ``patch_level``'s size),
optional ``labels`` [N] (tile folders) and file attrs: ``encoder``, ``encoder_weights_sha256``,
``mpp``, ``tile_size``, ``slide_id``, ``gigaslide_version``, ``format_version``, ``seed``.
:func:`load` also reads files written by CLAM / TRIDENT (``features`` may be [1, N, D]).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.provenance import COMPAT_KEYS, Provenance, check_format, check_same, provenance
from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import is_safe_slide_id
from gigaslide.tiling.store import h5_attrs


@dataclass
class FeatureFile:
    features: np.ndarray  # [N, D] (a LazyFeatures from ``load(arrays=False)``)
    coords: np.ndarray  # [N, 2] level-0 px (zeros for tile folders)
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None  # [N] int, tile-level labels when known
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        """The ``slide_id`` attr, unless it is unsafe as a file name (``../x``: another tool's metadata): then the file's stem."""
        sid = str(self.attrs.get("slide_id") or "")
        return sid if sid and is_safe_slide_id(sid) else (self.path.stem if self.path else "")

    @property
    def encoder(self) -> str | None:
        return self.attrs.get("encoder")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def mpp(self) -> float | None:
        v = self.attrs.get("mpp", self.coords_attrs.get("target_mpp"))
        return None if v is None or not float(v) > 0 else float(v)  # old files wrote a missing mpp as 0

    @property
    def tile_size_level0(self) -> float | None:
        """Tile side in level-0 px: the ``patch_size_level0`` attr, else ``tile_size * mpp / level0_mpp``,
        else the smallest step between tile coordinates; None when none of these can tell."""
        v = self.coords_attrs.get("patch_size_level0")
        if v is not None:
            return float(v)
        ts = self.attrs.get("tile_size", self.coords_attrs.get("patch_size"))
        l0 = self.coords_attrs.get("level0_mpp", self.attrs.get("slide_mpp"))
        if self.mpp is not None and ts is not None and l0:
            return float(ts) * self.mpp / float(l0)
        if len(self.coords) > 1:
            steps = np.concatenate([np.diff(np.unique(self.coords[:, i])) for i in (0, 1)])
            steps = steps[steps > 0]
            if len(steps):
                return float(steps.min())
        return None

    @property
    def tile_step_level0(self) -> float | None:
        """Distance between neighbouring tiles of the grid in level-0 px: the tile side, less the overlap where the
        tiles overlap (``overlap`` px of ``tile_size`` at the target mpp); None when the tile side is unknown."""
        size0 = self.tile_size_level0
        ts = int(self.attrs.get("tile_size", self.coords_attrs.get("patch_size", 0)) or 0)
        ov = int(self.attrs.get("overlap", self.coords_attrs.get("overlap", 0)) or 0)  # TRIDENT: coords attrs only
        return size0 * (ts - ov) / ts if size0 and ts and 0 < ov < ts else size0

    def grid_cells(self, coords: np.ndarray | None = None) -> np.ndarray | None:
        """``[..., 2]`` int64 (column, row) cells of level-0 ``coords`` (default: this file's tiles) on the slide's
        tiling grid, the file's top-left tile at cell 0: ``(coords - min) /`` :attr:`tile_step_level0`, rounded
        (gigaslide's tilings floor fractional strides to whole pixels; overlapping tiles step by less than their
        side). None for a file without tile positions (several tiles, every coordinate 0: a tile folder)."""
        own = np.asarray(self.coords, np.int64).reshape(-1, 2)
        c = own if coords is None else np.asarray(coords, np.int64)
        if c.size == 0 or len(own) == 0:
            return np.zeros(c.shape, np.int64)
        if len(own) > 1 and not own.any():
            return None
        step = self.tile_step_level0
        if not step:  # one tile
            return np.zeros(c.shape, np.int64)
        return np.rint((c - own.min(0)) / float(step)).astype(np.int64)

    def require_tile_size_level0(self) -> float:
        """:attr:`tile_size_level0`, or a one-line error naming the file."""
        v = self.tile_size_level0
        if v is None:
            raise GigaslideError("cannot tell the tile size in level-0 px (no patch_size_level0 attr, one tile)",
                                 path=self.path, fix="re-encode with `gigaslide encode` (it stores patch_size_level0)")
        return v

    @property
    def provenance(self) -> Provenance:
        """The file's provenance record; a field of the wrong type (``tile_size = "abc"``: another tool's or a
        hand-edited file) is a one-line error naming the file (:meth:`Provenance.from_dict`)."""
        return Provenance.from_dict(self.attrs, self.path)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def loaded(self) -> FeatureFile:
        """This file with its features in memory (itself when they already are; see ``load(arrays=False)``)."""
        return self if isinstance(self.features, np.ndarray) else replace(self, features=np.asarray(self.features))


def save(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray | None = None, *,
         attrs: dict[str, Any] | None = None, coords_attrs: dict[str, Any] | None = None,
         labels: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write one feature file atomically. ``attrs`` are added to the standard provenance."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got {features.shape}")
    n = features.shape[0]
    coords = np.zeros((n, 2), np.int64) if coords is None else np.asarray(coords, dtype=np.int64)
    if coords.shape != (n, 2):
        raise ValueError(f"coords must be [{n}, 2], got {coords.shape}")
    with atomic.h5_file(path) as f:
        f.create_dataset("features", data=features, **_checksummed(features))
        c = f.create_dataset("coords", data=coords, **_checksummed(coords))
        c.attrs.update({k: v for k, v in (coords_attrs or {}).items() if v is not None})
        if labels is not None:
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        for k, v in (extra or {}).items():
            f.create_dataset(k, data=v)
        f.attrs.update(provenance(kind="features", **(attrs or {})))
    return Path(path)


def _checksummed(a: np.ndarray) -> dict[str, Any]:
    """Fletcher-32 checksums (a standard HDF5 filter: CLAM / TRIDENT / h5py read it) so that a file damaged
    on disk fails to load instead of giving other numbers; needs chunks, so not for empty arrays."""
    return {"fletcher32": True, "chunks": True} if a.size else {}


class LazyFeatures:
    """The ``features`` of a feature file, read from disk each time they are asked for
    (``np.asarray(ff.features)``); ``shape`` / ``dtype`` / ``len`` without reading. From ``load(arrays=False)``."""

    ndim = 2

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype):
        self.path, self.shape, self.dtype = path, (int(shape[0]), int(shape[1])), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, *, own_mapping: bool = False) -> np.ndarray:
        """The array, checked against the shape seen at open (a file replaced since then is refused).

        ``own_mapping``: in memory of its own (an anonymous ``mmap``, returned to the OS when the array is dropped)
        instead of the C heap, for arrays kept long while short-lived ones come and go around them."""
        p = self.path
        try:
            with h5py.File(p, "r") as f:
                d = f["features"]
                if own_mapping and d.size:
                    buf = mmap.mmap(-1, d.size * d.dtype.itemsize)
                    raw = np.frombuffer(buf, dtype=d.dtype, count=d.size).reshape(d.shape)
                    d.read_direct(raw)
                else:
                    raw = np.asarray(d[:])
                feats = raw.reshape(_shape_2d(raw.shape))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise _damaged(p, e) from None
        if feats.shape != self.shape:
            raise GigaslideError(f"features changed on disk: {feats.shape} now, {self.shape} when the folder was read",
                                 path=p, fix="do not re-encode a folder while a job reads it; re-run the job")
        return feats

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.read()[idx]


def _shape_2d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """CLAM / TRIDENT layouts ([1, N, D], [D]) as [N, D]."""
    if len(shape) == 3 and shape[0] == 1:
        return tuple(shape[1:])
    if len(shape) == 1:
        return (1, shape[0])
    return tuple(shape)


def _damaged(p: Path, e: BaseException) -> GigaslideError:
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return GigaslideError(f"cannot read HDF5 ({first})", path=p,
                          fix="the file is truncated or not HDF5; delete it and re-run encode")


def load(path: str | os.PathLike, *, arrays: bool = True) -> FeatureFile:
    """Read a gigaslide, CLAM or TRIDENT feature file.

    ``arrays=False``: everything but the feature array, which is read when used (:class:`LazyFeatures`), so a
    cohort's files can be opened and checked without holding every slide's features in memory."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("feature file not found", path=p, fix="run `gigaslide encode` first or check the path")
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise GigaslideError("HDF5 file has no 'features' dataset", path=p,
                                     fix="pass a feature file written by gigaslide encode, CLAM or TRIDENT")
            fd = f["features"]
            if arrays:
                raw = np.asarray(fd[:])
                feats = raw.reshape(_shape_2d(raw.shape))
            else:
                feats = LazyFeatures(p, _shape_2d(fd.shape), fd.dtype)
            cd = f.get("coords")
            if cd is not None:
                coords = np.asarray(cd[:])
                if coords.ndim == 3 and coords.shape[0] == 1:
                    coords = coords[0]
                coords_attrs = h5_attrs(cd)
            else:
                coords, coords_attrs = np.zeros((len(feats), 2), np.int64), {}
            labels = np.asarray(f["labels"][:]) if "labels" in f else None
            attrs = h5_attrs(f)
    except GigaslideError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:  # damaged file
        raise _damaged(p, e) from None
    check_format(attrs, p)
    if len(coords) != len(feats):
        raise GigaslideError(f"{len(feats)} features but {len(coords)} coords", path=p, fix="re-run encode for this slide")
    return FeatureFile(feats, coords.astype(np.int64), attrs, coords_attrs, labels, p)


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """A feature file's attributes alone (no arrays read): for checks that need only its provenance."""
    return read_all_attrs(path)[0]


def read_all_attrs(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A feature file's attributes and its ``coords`` dataset's (no arrays read)."""
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f or "coords" not in f or len(f["features"]) != len(f["coords"]):
                raise GigaslideError("not a complete gigaslide feature file (features / coords)", path=p,
                                     fix="delete it and re-run encode")
            return h5_attrs(f), h5_attrs(f["coords"])
    except GigaslideError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise _damaged(p, e) from None


def list_feature_files(directory: str | os.PathLike) -> list[Path]:
    """All ``*.h5`` under ``directory`` (its ``features/`` subfolder when present, gigaslide's layout; else CLAM's
    ``h5_files/``: CLAM's extract_features writes FEAT_DIR/h5_files/ and FEAT_DIR/pt_files/)."""
    d = Path(directory)
    if d.is_file():
        return [d]
    d = next((d / sub for sub in ("features", "h5_files") if (d / sub).is_dir()), d)
    files = sorted(f for f in d.glob("*.h5") if not f.name.startswith(atomic.TMP_PREFIX))
    if not files:
        raise GigaslideError("no feature files (*.h5) here", path=d, fix="run `gigaslide encode ... --out DIR` and "
                             "pass DIR (or a CLAM / TRIDENT folder of .h5)")
    return files


def load_dir(directory: str | os.PathLike, *, arrays: bool = True) -> dict[str, FeatureFile]:
    """Load every feature file of a folder keyed by slide id; refuses files whose encoder, weights, mpp,
    tile size or dimension differ (naming two of them). ``arrays=False``: see :func:`load`."""
    out: dict[str, FeatureFile] = {}
    bad: list[tuple[Path, GigaslideError]] = []
    for f in list_feature_files(directory):
        try:
            ff = load(f, arrays=arrays)
        except GigaslideError as e:  # every unreadable file is named, not one per run (a cohort of 1,000 slides)
            bad.append((f, e))
            continue
        sid = ff.slide_id or f.stem
        if sid in out:  # two files of one slide (a renamed copy): one of them would be dropped without a word
            raise GigaslideError(f"{_name(out[sid])} and {f.name} both hold slide '{sid}' (their slide_id attr)",
                                 path=directory, fix="keep one feature file per slide in the folder")
        out[sid] = ff
    if len(bad) == 1:
        raise bad[0][1]
    if bad:
        listed = "; ".join(f"{f.name}: {e.what}" for f, e in bad[:5])
        raise GigaslideError(f"{len(bad)} feature files cannot be read: {listed}"
                             + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""), path=directory,
                             fix="re-encode those slides (`gigaslide encode` redoes damaged files) or remove their "
                                 "files from the folder")
    check_consistent(out.values(), where=directory)
    return out


def check_consistent(files, where: str | os.PathLike | None = None) -> None:  # noqa: ANN001
    """Refuse feature files that cannot be used together: other encoder, weights, mpp, tile size or dimension."""
    files = list(files)
    check_same([(ff.path or ff.slide_id, ff.provenance) for ff in files], COMPAT_KEYS, where=where)
    dims = {ff.dim for ff in files}
    if len(dims) > 1:
        a = next(ff for ff in files if ff.dim == min(dims))
        b = next(ff for ff in files if ff.dim == max(dims))
        raise GigaslideError(f"{_name(a)} and {_name(b)} differ in feature dimension ({a.dim} vs {b.dim}): "
                             "they cannot be used together", path=where,
                             fix="keep one encoder's features per folder (encode each encoder into its own --out)")


def _name(ff: FeatureFile) -> str:
    return ff.path.name if ff.path else ff.slide_id

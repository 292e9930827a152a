"""Feature files: one HDF5 per slide, in the layout CLAM and TRIDENT tools read.

``features`` [N, D] float32 (or float16), ``coords`` [N, 2] int64 level-0 (x, y) with the tile
attrs (``patch_size``, ``patch_size_level0``, ``patch_level``, ``target_mpp``, ``level0_mpp``),
optional ``labels`` [N] (tile folders) and file attrs: ``encoder``, ``encoder_weights_sha256``,
``mpp``, ``tile_size``, ``slide_id``, ``gigaslide_version``, ``format_version``, ``seed``.
:func:`load` also reads files written by CLAM / TRIDENT (``features`` may be [1, N, D]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.artifacts import decode_attrs, provenance
from gigaslide.errors import GigaslideError


@dataclass
class FeatureFile:
    features: np.ndarray  # [N, D]
    coords: np.ndarray  # [N, 2] level-0 px (zeros for tile folders)
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = None  # [N] int, tile-level labels when known
    path: Path | None = None

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or (self.path.stem if self.path else ""))

    @property
    def encoder(self) -> str | None:
        return self.attrs.get("encoder")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def mpp(self) -> float | None:
        v = self.attrs.get("mpp", self.coords_attrs.get("target_mpp"))
        return None if v is None else float(v)

    @property
    def tile_size_level0(self) -> float | None:
        v = self.coords_attrs.get("patch_size_level0")
        return None if v is None else float(v)

    def __len__(self) -> int:
        return int(self.features.shape[0])


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
    with atomic.atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            c = f.create_dataset("coords", data=coords)
            c.attrs.update({k: v for k, v in (coords_attrs or {}).items() if v is not None})
            if labels is not None:
                f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            for k, v in (extra or {}).items():
                f.create_dataset(k, data=v)
            f.attrs.update(provenance(kind="features", **(attrs or {})))
    return Path(path)


def load(path: str | os.PathLike) -> FeatureFile:
    """Read a gigaslide, CLAM or TRIDENT feature file."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("feature file not found", path=p, fix="run `gigaslide encode` first or check the path")
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise GigaslideError("HDF5 file has no 'features' dataset", path=p,
                                     fix="pass a feature file written by gigaslide encode, CLAM or TRIDENT")
            feats = np.asarray(f["features"][:])
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]
            if feats.ndim == 1:
                feats = feats[None, :]
            if "coords" in f:
                coords = np.asarray(f["coords"][:])
                if coords.ndim == 3 and coords.shape[0] == 1:
                    coords = coords[0]
                coords_attrs = decode_attrs(f["coords"].attrs)
            else:
                coords, coords_attrs = np.zeros((len(feats), 2), np.int64), {}
            labels = np.asarray(f["labels"][:]) if "labels" in f else None
            attrs = decode_attrs(f.attrs)
    except OSError as e:
        raise GigaslideError(f"cannot read HDF5 ({str(e).splitlines()[0]})", path=p,
                             fix="the file is truncated or not HDF5; delete it and re-run encode") from None
    if len(coords) != len(feats):
        raise GigaslideError(f"{len(feats)} features but {len(coords)} coords", path=p, fix="re-run encode for this slide")
    return FeatureFile(feats, coords.astype(np.int64), attrs, coords_attrs, labels, p)


def list_feature_files(directory: str | os.PathLike) -> list[Path]:
    """All ``*.h5`` under ``directory`` (a ``features/`` subfolder is used when present)."""
    d = Path(directory)
    if d.is_file():
        return [d]
    if (d / "features").is_dir():
        d = d / "features"
    files = sorted(f for f in d.glob("*.h5") if not f.name.startswith(atomic.TMP_PREFIX))
    if not files:
        raise GigaslideError("no feature files (*.h5) here", path=d, fix="run `gigaslide encode ... --out DIR` and pass DIR")
    return files


def load_dir(directory: str | os.PathLike) -> dict[str, FeatureFile]:
    """Load every feature file of a folder keyed by slide id; refuses mixed encoders or dimensions."""
    out: dict[str, FeatureFile] = {}
    for f in list_feature_files(directory):
        ff = load(f)
        out[ff.slide_id or f.stem] = ff
    check_consistent(out.values(), where=directory)
    return out


def check_consistent(files, where: str | os.PathLike | None = None) -> None:  # noqa: ANN001
    encs = {(ff.encoder, ff.dim) for ff in files}
    if len(encs) > 1:
        desc = ", ".join(sorted(f"{e or 'unknown'}:{d}" for e, d in encs))
        raise GigaslideError(f"feature files mix encoders/dimensions ({desc})", path=where,
                             fix="keep one encoder's features per folder (encode each encoder into its own --out)")

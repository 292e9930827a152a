"""Reading an augmented-view cache back for pre-training (all views in memory, fp16).

The cache is read through :func:`gigaslide.features.store.load_dir`, which refuses a folder whose
files differ in encoder, weights, mpp, tile size or dimension; a plain feature folder (no
``views``) is refused with a message saying how to build a cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.stats import nonfinite_rows
from gigaslide.provenance import Provenance


#: The fix of tile features holding NaN / inf.
NONFINITE_FIX = "re-encode those slides (the encoder overflowed: try fp32) or remove their files"


def refuse_nonfinite(bad: list[tuple[Path | str | None, int]], where: str | os.PathLike | None, what: str = "tile(s)",
                     fix: str = NONFINITE_FIX) -> None:
    """One line naming the feature files in ``bad`` (path, rows with NaN / inf): they would make a slide embedding, or
    the loss and then every weight, NaN (a NaN embedding written without a word, or a run stopped at "loss became nan"
    with the advice to lower --lr)."""
    if not bad:
        return
    if len(bad) == 1:
        path, n = bad[0]
        raise GigaslideError(f"{n} {what} have NaN/inf features", path=path or where, fix=fix)
    listed = "; ".join(f"{Path(p).name if p else '?'}: {n} {what}" for p, n in bad[:5])
    more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    raise GigaslideError(f"{len(bad)} feature files have NaN/inf features: {listed}{more}", path=where, fix=fix)


def tile_cells(ff: store.FeatureFile, coords: np.ndarray | None = None) -> np.ndarray:
    """Grid cells of a slide's tiles for the sparse slide encoders (:meth:`~gigaslide.features.store.FeatureFile.grid_cells`
    of ``coords``, default the file's tiles: overlap and fractional strides undone), or a one-line error for
    features without tile positions."""
    cells = ff.grid_cells(coords)
    if cells is None:
        raise GigaslideError("features have no tile positions (every coordinate is 0, as from a tile folder)",
                             path=ff.path, fix="encode whole slides with `gigaslide encode` (a slide encoder needs the layout)")
    return cells


@dataclass
class ViewCache:
    slide_ids: list[str]
    views: list[np.ndarray]  # per slide [V, T, D] float16 (cached augmented versions)
    pos: list[np.ndarray]  # per slide [V, T, 2] int64 grid positions
    provenance: Provenance  # of the first file (all agree: load_dir checks encoder/weights/mpp/tile size)
    dim: int
    few_tiles: list[str]  # slides whose cached views were drawn with replacement

    def __len__(self) -> int:
        return len(self.slide_ids)


def load_cache(directory: str | os.PathLike) -> ViewCache:
    """All ``features/*.h5`` of a cache with their ``views``; refuses empty caches, mixed encoders and views holding
    NaN / inf (naming the files). Only the views are read: the plain features (a cohort's can be 100s of GB; the
    views a few MB per slide) are not loaded."""
    d = Path(directory)
    if not d.exists():
        raise GigaslideError("cache folder not found", path=d, fix="build it with `gigaslide augment-cache SLIDES --out CACHE`")
    try:
        files = store.load_dir(d, arrays=False)
    except GigaslideError as e:
        if "no feature files" not in e.what:
            raise
        raise GigaslideError("empty cache: no slide files (features/*.h5)", path=d,
                             fix="build it with `gigaslide augment-cache SLIDES --out CACHE` (or check the path)") from None
    ids, views, pos, few, bad = [], [], [], [], []
    for sid, ff in files.items():
        try:
            with h5py.File(ff.path, "r") as h:
                if "views" not in h:
                    raise GigaslideError("not an augmented-view cache file (no 'views' dataset)", path=ff.path,
                                         fix="pass a folder written by `gigaslide augment-cache`, not plain features")
                v = np.asarray(h["views"][:], dtype=np.float16)
                vc = np.asarray(h["view_coords"][:])
        except OSError as e:
            raise GigaslideError(f"cannot read cache file ({str(e).splitlines()[0]})", path=ff.path,
                                 fix="delete this file and re-run augment-cache (it resumes)") from None
        n_bad = nonfinite_rows(v)
        if n_bad:
            bad.append((ff.path, n_bad))
        ids.append(sid)
        views.append(v)
        pos.append(tile_cells(ff, vc))
        if int(ff.attrs.get("with_replacement", 0)):
            few.append(sid)
    refuse_nonfinite(bad, d, "cached view tile(s)",
                     fix="delete those files and re-run augment-cache (it resumes; with --precision fp32 if the "
                         "encoder overflowed in half precision)")
    first = next(iter(files.values()))
    return ViewCache(ids, views, pos, first.provenance, int(views[0].shape[-1]), few)

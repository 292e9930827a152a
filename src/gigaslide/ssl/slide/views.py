"""Reading an augmented-view cache back for pre-training (all views in memory, fp16)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from gigaslide.artifacts import decode_attrs
from gigaslide.errors import GigaslideError
from gigaslide.features import store


@dataclass
class ViewCache:
    slide_ids: list[str]
    views: list[torch.Tensor]  # per slide [V, T, D] float16
    pos: list[torch.Tensor]  # per slide [V, T, 2] long grid positions
    attrs: dict
    dim: int

    def __len__(self) -> int:
        return len(self.slide_ids)


def tile_size_level0(coords_attrs: dict, attrs: dict, where: str | os.PathLike) -> float:
    v = coords_attrs.get("patch_size_level0")
    if v is None:
        mpp, ts, l0 = attrs.get("mpp"), attrs.get("tile_size"), coords_attrs.get("level0_mpp", attrs.get("slide_mpp"))
        if mpp is None or ts is None or l0 is None:
            raise GigaslideError("feature file has no tile size in level-0 px (coords attr patch_size_level0)", path=where,
                                 fix="re-encode with gigaslide encode (it stores patch_size_level0)")
        v = float(ts) * float(mpp) / float(l0)
    return float(v)


def load_cache(directory: str | os.PathLike) -> ViewCache:
    """All ``features/*.h5`` of a cache with their ``views``; refuses empty caches and mixed encoders."""
    d = Path(directory)
    if not d.exists():
        raise GigaslideError("cache folder not found", path=d, fix="build it with `gigaslide augment-cache SLIDES --out CACHE`")
    try:
        files = store.list_feature_files(d)
    except GigaslideError:
        raise GigaslideError("empty cache: no slide files (features/*.h5)", path=d,
                             fix="build it with `gigaslide augment-cache SLIDES --out CACHE` (or check the path)") from None
    ids, views, pos, seen = [], [], [], {}
    attrs0: dict = {}
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if "views" not in h:
                    raise GigaslideError("not an augmented-view cache file (no 'views' dataset)", path=f,
                                         fix="pass a folder written by `gigaslide augment-cache`, not plain features")
                v = np.asarray(h["views"][:])
                vc = np.asarray(h["view_coords"][:])
                attrs = decode_attrs(h.attrs)
                cattrs = decode_attrs(h["coords"].attrs)
        except OSError as e:
            raise GigaslideError(f"cannot read cache file ({str(e).splitlines()[0]})", path=f,
                                 fix="delete this file and re-run augment-cache (it resumes)") from None
        key = (attrs.get("encoder"), attrs.get("encoder_weights_sha256"), v.shape[-1], attrs.get("tile_size"))
        seen.setdefault(key, f.name)
        if len(seen) > 1:
            desc = "; ".join(f"{k[0]} ({k[2]}-d, tile {k[3]}) e.g. {n}" for k, n in seen.items())
            raise GigaslideError(f"cache mixes encoders or tile sizes: {desc}", path=d,
                                 fix="keep one encoder per cache folder (augment-cache each encoder into its own --out)")
        ts0 = tile_size_level0(cattrs, attrs, f)
        ids.append(str(attrs.get("slide_id") or f.stem))
        views.append(torch.from_numpy(v.astype(np.float16)))
        pos.append(torch.from_numpy(np.round(vc / ts0).astype(np.int64)))
        attrs0 = attrs0 or attrs
    return ViewCache(ids, views, pos, attrs0, int(views[0].shape[-1]))

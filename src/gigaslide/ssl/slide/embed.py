"""``embed-slides``: one vector per slide from a pre-trained slide-SSL run.

Output HDF5: ``slide_ids`` [N] (UTF-8 strings), ``embeddings`` [N, D] float32 (or float16 with
``fp16``), attrs: provenance + method, run, tile encoder, ensemble, ``bytes_per_slide`` (D x item size).
Giga-SSL: mean over ``ensemble`` random views of ``tiles_per_view`` plain tiles; SLPD: mean of the
region embeddings (see :mod:`gigaslide.ssl.slide.slpd`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.artifacts import provenance
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.ssl.slide import run as runs
from gigaslide.ssl.slide.views import tile_size_level0


@dataclass
class Embeddings:
    slide_ids: list[str]
    embeddings: np.ndarray
    attrs: dict


def embed_slides(model: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike, *, ensemble: int = 20,
                 tiles_per_view: int | None = None, fp16: bool = False, seed: int = 0, device: str = "auto") -> Embeddings:
    """Embed every feature file under ``features`` with the run ``model``; writes ``out`` atomically."""
    import zlib

    cfg = runs.read_config(model)
    method = cfg.get("method")
    dev = runs.device_of(device)
    files = store.load_dir(features)
    data = cfg["data"]
    for sid, ff in files.items():
        if ff.dim != data["dim"] or (data.get("tile_encoder") and ff.encoder and ff.encoder != data["tile_encoder"]):
            raise GigaslideError(f"features of {sid} are {ff.encoder}:{ff.dim}, the run was trained on "
                                 f"{data.get('tile_encoder')}:{data['dim']}", path=ff.path,
                                 fix="embed features made with the tile encoder the run was trained on")
        break
    if ensemble < 1:
        raise GigaslideError(f"--ensemble {ensemble} must be >= 1", fix="use e.g. --ensemble 20")
    ids, vecs = [], []
    if method == "gigassl":
        from gigaslide.ssl.slide.gigassl import embed_views, load_encoder

        enc, _ = load_encoder(model)
        enc = enc.to(dev)
        t = int(tiles_per_view or data["tiles_per_view"])
        for sid, ff in files.items():
            pos = np.round(ff.coords / tile_size_level0(ff.coords_attrs, ff.attrs, ff.path or "")).astype(np.int64)
            rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])
            vecs.append(embed_views(enc, ff.features, pos, ensemble=ensemble, tiles_per_view=t, rng=rng, device=dev))
            ids.append(sid)
    elif method == "slpd":
        from gigaslide.ssl.slide.slpd import embed_regions, load_encoder

        enc, _ = load_encoder(model)
        enc = enc.to(dev)
        for sid, ff in files.items():
            vecs.append(embed_regions(enc, ff, cfg, dev))
            ids.append(sid)
    else:
        raise GigaslideError(f"unknown method '{method}' in the run config", path=model, fix="re-run pretrain-slides")
    emb = np.stack(vecs).astype(np.float16 if fp16 else np.float32)
    attrs = provenance(kind="slide_embeddings", method=method, run=str(model), tile_encoder=data.get("tile_encoder"),
                       ensemble=ensemble if method == "gigassl" else None, dim=int(emb.shape[1]),
                       dtype=str(emb.dtype), bytes_per_slide=int(emb.shape[1] * emb.itemsize), seed=seed)
    with atomic.atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("slide_ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embeddings", data=emb)
            f.attrs.update(attrs)
    return Embeddings(ids, emb, attrs)


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read an ``embed-slides`` output."""
    from gigaslide.artifacts import decode_attrs

    p = Path(path)
    if not p.is_file():
        raise GigaslideError("embeddings file not found", path=p, fix="run `gigaslide embed-slides` first")
    try:
        with h5py.File(p, "r") as f:
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["slide_ids"][:]]
            return Embeddings(ids, np.asarray(f["embeddings"][:]), decode_attrs(f.attrs))
    except (OSError, KeyError) as e:
        raise GigaslideError(f"not a slide-embeddings file ({e})", path=p, fix="pass the output of embed-slides") from None

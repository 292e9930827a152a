"""``embed-slides``: one vector per slide (and, for SLPD, per region) from a pre-trained slide-SSL run.

Output HDF5: ``slide_ids`` [N] (UTF-8 strings), ``embeddings`` [N, D] float32 (or float16 with
``fp16``), attrs: the full provenance (tile encoder, its weights sha256, tile mpp, tile size, the views' seed
(Giga-SSL), run) + the slide encoder's sha256 (``slide_encoder_sha256``: its ``model.safetensors``), the run's
``train_seed``, the ``features`` folder, method, ensemble, ``bytes_per_slide`` (D x item size), and the run's collapse
verdict.
Giga-SSL: mean over ``ensemble`` random views of ``tiles_per_view`` plain tiles; SLPD: mean of the
region embeddings. ``regions_out`` (SLPD): a feature folder with one file per slide whose rows are
its region embeddings and whose coords are the regions' level-0 corners (``patch_size_level0`` =
the region side), so ``gigaslide train-mil --features REGIONS`` runs MIL over regions.

Features made by another tile encoder / weights / mpp / tile size than the run's are refused.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from gigaslide import atomic, runs
from gigaslide.devices import pick_device
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.stats import nonfinite_rows
from gigaslide.provenance import file_sha256, provenance
from gigaslide.ssl.slide.export import MODEL, check_features, read_config
from gigaslide.ssl.slide.views import NONFINITE_FIX, refuse_nonfinite, tile_cells

#: Most views embed-slides averages per slide (Giga-SSL; their outputs are kept until averaged).
MAX_ENSEMBLE = 100_000


@dataclass
class Embeddings:
    slide_ids: list[str]
    embeddings: np.ndarray
    attrs: dict


@runs.keeps_caller_rng
def embed_slides(model: str | os.PathLike, features: str | os.PathLike, out: str | os.PathLike, *, ensemble: int = 20,
                 tiles_per_view: int | None = None, fp16: bool = False, seed: int = 0, device: str = "auto",
                 regions_out: str | os.PathLike | None = None) -> Embeddings:
    """Embed every feature file under ``features`` with the run ``model``; writes ``out`` atomically. The outputs record
    the run by its absolute path (``--model .`` recorded ``run: .`` and named the region encoder ``slpd:``)."""
    model = Path(model).resolve()
    cfg = read_config(model)
    method = cfg["method"]
    dev = pick_device(device)
    if not 1 <= ensemble <= MAX_ENSEMBLE:
        raise GigaslideError(f"--ensemble {ensemble} must be in [1, {MAX_ENSEMBLE}]", fix="use e.g. --ensemble 20")
    if tiles_per_view is not None and tiles_per_view < 1:  # 0 meant the default, a negative failed inside numpy
        raise GigaslideError(f"--tiles-per-view {tiles_per_view} must be >= 1",
                             fix="use e.g. --tiles-per-view 16, or omit it (the run's --tiles-per-step)")
    if regions_out is not None and method != "slpd":
        raise GigaslideError("--regions-out needs an SLPD run (Giga-SSL embeds whole slides)", path=model,
                             fix="drop --regions-out, or pass an SLPD run")
    # one encoder / weights / mpp / tile size in the folder; each slide's features read when it is embedded, so a
    # cohort of any size is embedded in the memory of one slide
    files = store.load_dir(features, arrays=False)
    slides = ((sid, ff.loaded()) for sid, ff in files.items())
    data = cfg["data"]
    ff0 = next(iter(files.values()))
    check_features(model, data, ff0.provenance, ff0.path or features, ff0.dim)
    empty = next((ff for ff in files.values() if len(ff) == 0), None)  # before any work: a slide of no tiles
    if empty is not None:  # has no embedding (and would fail deep inside the encoder)
        raise GigaslideError("feature file has no tiles: a slide without tiles has no embedding",
                             path=empty.path or empty.slide_id,
                             fix="remove it from the features folder (or re-encode that slide with tissue found)")
    ids, vecs, bad = [], [], []
    slides = _finite(slides, bad)  # a NaN tile made that slide's embedding NaN, written without a word
    if method == "gigassl":
        from gigaslide.ssl.slide.gigassl import embed_views, load_encoder

        enc, _ = load_encoder(model)
        enc = enc.to(dev)
        t = int(tiles_per_view or cfg["train"].get("tiles_per_step") or data["tiles_per_view"])
        for sid, ff in slides:
            pos = tile_cells(ff)
            rng = np.random.default_rng([seed, zlib.crc32(sid.encode())])
            vecs.append(embed_views(enc, ff.features, pos, ensemble=ensemble, tiles_per_view=t, rng=rng, device=dev))
            ids.append(sid)
    else:
        from gigaslide.ssl.slide.slpd import embed_regions, load_encoder

        enc, _ = load_encoder(model)
        enc = enc.to(dev)
        for sid, ff in slides:
            emb, regs = embed_regions(enc, ff, cfg, dev, per_region=True)
            _check_model_output(emb, sid, model)  # before a region file of NaN is written
            vecs.append(emb.mean(0))
            ids.append(sid)
            if regions_out is not None:
                _write_regions(Path(regions_out), sid, ff, emb, regs, cfg, model)
    refuse_nonfinite(bad, features, fix=f"{NONFINITE_FIX}; {out} was not written")
    emb = np.stack(vecs).astype(np.float32)
    for sid, row in zip(ids, emb):
        _check_model_output(row, sid, model)
    if fp16:
        with np.errstate(over="ignore"):  # said in one line below, not as a numpy warning
            emb = emb.astype(np.float16)
        for sid, row in zip(ids, emb):
            _check_model_output(row, sid, model, fp16=True)
    collapse = (cfg.get("collapse") or {}).get("kind")
    # the slide encoder itself (a run re-trained in the same folder embeds otherwise), its training seed and the
    # features; ``seed`` is the views' (Giga-SSL); SLPD embeds without drawing, so it records none
    attrs = provenance("slide_embeddings", method=method, run=str(model), encoder=data.get("tile_encoder"),
                       encoder_weights_sha256=data.get("encoder_weights_sha256"), mpp=data.get("mpp"),
                       tile_size=data.get("tile_size"), tile_encoder=data.get("tile_encoder"),
                       slide_encoder_sha256=file_sha256(model / MODEL), train_seed=(cfg.get("train") or {}).get("seed"),
                       features=str(Path(features).resolve()),
                       ensemble=ensemble if method == "gigassl" else None, dim=int(emb.shape[1]), dtype=str(emb.dtype),
                       bytes_per_slide=int(emb.shape[1] * emb.itemsize), seed=seed if method == "gigassl" else None,
                       collapsed=None if method != "slpd" else int(collapse is not None), collapse_kind=collapse)
    with atomic.atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("slide_ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("embeddings", data=emb)
            f.attrs.update(attrs)
    return Embeddings(ids, emb, attrs)


def _check_model_output(emb: np.ndarray, sid: str, model: Path, fp16: bool = False) -> None:
    """One line for a NaN / inf embedding of a slide whose features are finite: the model's weights are NaN, or the
    value is beyond float16's range (``--fp16``)."""
    if np.isfinite(emb).all():
        return
    if fp16:
        raise GigaslideError(f"slide '{sid}': its embedding exceeds float16's range (65504)", path=model,
                             fix="embed without --fp16; nothing was written")
    raise GigaslideError(f"slide '{sid}': the model embeds finite features as NaN/inf (its weights are not finite?)",
                         path=model, fix="re-train the model (or re-export it from a good checkpoint); "
                                         "nothing was written")


def _finite(slides, bad: list):  # noqa: ANN001, ANN202
    """The (slide id, file) pairs of ``slides`` whose features are all finite; the others go to ``bad`` as (path, rows
    with NaN / inf), so that one error names every such file (after one pass, not one re-run per file)."""
    for sid, ff in slides:
        n = nonfinite_rows(ff.features)
        if n:
            bad.append((ff.path or sid, n))
        else:
            yield sid, ff


def _write_regions(folder: Path, sid: str, ff, emb: np.ndarray, regs, cfg: dict, model) -> None:  # noqa: ANN001
    """One region feature file: its encoder is the SLPD run (``encoder_weights_sha256``: the sha256 of the run's
    ``model.safetensors``, so region folders of two runs are not mixed), ``tile_encoder`` and
    ``tile_encoder_weights_sha256`` the tile encoder's, ``seed`` the run's."""
    from gigaslide.ssl.slide.regions import level0_mpp

    data = cfg["data"]

    side0 = float(data["region_size"]) * float(data["region_mpp"]) / level0_mpp(ff)
    store.save(folder / "features" / f"{sid}.h5", emb.astype(np.float32), regs.origins,
               attrs={"slide_id": sid, "encoder": f"slpd:{Path(model).name}", "mpp": data["region_mpp"],
                      "tile_size": int(data["region_size"]), "tile_encoder": data.get("tile_encoder"),
                      "encoder_weights_sha256": file_sha256(Path(model) / MODEL),
                      "tile_encoder_weights_sha256": data.get("encoder_weights_sha256"), "run": str(model),
                      "seed": (cfg.get("train") or {}).get("seed"),
                      "unit": "region", "region_mpp": data["region_mpp"]},
               coords_attrs={"patch_size_level0": side0, "level0_mpp": level0_mpp(ff)})


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read an ``embed-slides`` output."""
    from gigaslide.provenance import decode_attrs

    p = Path(path)
    if not p.is_file():
        raise GigaslideError("embeddings file not found", path=p, fix="run `gigaslide embed-slides` first")
    try:
        with h5py.File(p, "r") as f:
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["slide_ids"][:]]
            return Embeddings(ids, np.asarray(f["embeddings"][:]), decode_attrs(f.attrs))
    except (OSError, KeyError) as e:
        raise GigaslideError(f"not a slide-embeddings file ({e})", path=p, fix="pass the output of embed-slides") from None

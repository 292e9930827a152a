"""Tile features as an AnnData ``.h5ad`` for scverse (scanpy, squidpy).

One observation per tile: ``X`` = features [N, D] float32; ``obs`` = ``slide_id`` (categorical),
``tile`` (row in the slide's feature file), ``x``/``y`` (level-0 px), ``tissue``, ``tile_label``
(when the feature file has tile labels) and, per run, the slide's label, held-out fold and
probabilities and the tile's attention / percentile / probability (see :mod:`gigaslide.export.tables`);
``obsm["spatial"]`` = tile top-left corners in level-0 px (as every gigaslide coordinate);
``uns["gigaslide"]`` = provenance (encoder, weights, mpp, tile size, sources, runs, per-slide slide mpp).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.export.catalog import scan
from gigaslide.export.runs import TileScorer, load_runs
from gigaslide.export.tables import encoded_slides, run_columns, tissue_fraction
from gigaslide.provenance import provenance


def _clean(obj: Any) -> Any:
    """Drop None (h5ad cannot store it) and make everything plain."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        if any(isinstance(v, dict) for v in obj):  # h5ad stores no lists of mappings
            return {str(i): _clean(v) for i, v in enumerate(obj) if v is not None}
        return [_clean(v) for v in obj if v is not None]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def build_anndata(out_dirs: list[str | os.PathLike], runs: list[str | os.PathLike] = (),
                  tile_probability: bool = False) -> tuple[Any, list[str]]:
    """The AnnData of every encoded slide in ``out_dirs`` (+ problems: slides left out and why)."""
    import anndata as ad  # heavy (pandas): only when exporting
    import pandas as pd

    entries, problems = scan(list(out_dirs))
    run_list = load_runs(list(runs))
    scorer = TileScorer()
    X, obs_parts, spatial, slides_uns, files = [], [], [], {}, []
    for e, ff in encoded_slides(entries.values(), problems):
        files.append(ff)
        cols, probs = run_columns(e, ff, run_list, scorer, tile_probability)
        problems += probs
        df = pd.DataFrame({"slide_id": e.key, "tile": np.arange(len(ff)), "x": ff.coords[:, 0], "y": ff.coords[:, 1],
                           "tissue": tissue_fraction(e, ff.coords)})
        if ff.labels is not None:
            df["tile_label"] = np.asarray(ff.labels, np.int64)
        for k, v in cols.items():
            df[k] = v
        obs_parts.append(df)
        X.append(np.asarray(ff.features, np.float32))
        spatial.append(ff.coords.astype(np.float64))
        slides_uns[e.key] = {"slide_path": e.slide_path, "features": e.features, "slide_mpp": e.slide_mpp,
                             "tile_size_level0": ff.tile_size_level0, "n_tiles": len(ff)}
    if not X:
        raise GigaslideError("no encoded slides to export", path=", ".join(map(str, out_dirs)),
                             fix="run `gigaslide encode SLIDES --out OUT_DIR` and pass OUT_DIR")
    store.check_consistent(files, where=", ".join(map(str, out_dirs)))
    obs = pd.concat(obs_parts, ignore_index=True)
    obs["slide_id"] = obs["slide_id"].astype("category")
    obs.index = [f"{s}:{t}" for s, t in zip(obs["slide_id"].astype(str), obs["tile"])]
    adata = ad.AnnData(X=np.concatenate(X), obs=obs)
    adata.obsm["spatial"] = np.concatenate(spatial)
    first = files[0]
    adata.uns["gigaslide"] = _clean(provenance(
        "anndata_export", encoder=first.encoder, encoder_weights_sha256=first.attrs.get("encoder_weights_sha256"),
        mpp=first.mpp, tile_size=first.attrs.get("tile_size"), sources=[str(d) for d in out_dirs],
        runs={r.name: {"path": str(r.path), "kind": r.kind, "model": r.model} for r in run_list},
        coordinates="obsm['spatial'] = tile top-left corner, level-0 px", slides=slides_uns, problems=problems))
    return adata, problems


def export_anndata(out_dirs: list[str | os.PathLike], out: str | os.PathLike, runs: list[str | os.PathLike] = (),
                   tile_probability: bool = False) -> tuple[Path, Any, list[str]]:
    """Write the AnnData atomically to ``out`` (.h5ad); returns (path, adata, problems)."""
    adata, problems = build_anndata(out_dirs, runs, tile_probability)
    with atomic.atomic_path(out, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(out), adata, problems

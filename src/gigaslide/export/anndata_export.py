"""Tile features as an AnnData ``.h5ad`` for scverse (scanpy, squidpy).

One observation per tile: ``X`` = features [N, D] float32; ``obs`` = ``slide_id`` (categorical),
``tile`` (row in the slide's feature file), ``x``/``y`` (level-0 px), ``tissue``, ``tile_label``
(when the feature file has tile labels) and, per run, the slide's label, held-out fold and
probabilities and the tile's attention / percentile / probability (see :mod:`gigaslide.export.tables`; a run's
slide label and fold are categorical; a run name's ``/`` is stored as ``:``, which HDF5 would take for a group);
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
from gigaslide.export.catalog import list_slides, text
from gigaslide.export.guard import clean_stale_tmp, exclusive, stops_on_signals
from gigaslide.export.runs import TileScorer, load_runs
from gigaslide.export.tables import encoded_slides, nothing_to_export, run_columns, tissue_fraction
from gigaslide.provenance import provenance


def _clean(obj: Any) -> Any:
    """Drop None (h5ad cannot store it) and make everything plain (strings valid UTF-8)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        if any(isinstance(v, dict) for v in obj):  # h5ad stores no lists of mappings
            return {str(i): _clean(v) for i, v in enumerate(obj) if v is not None}
        return [_clean(v) for v in obj if v is not None]
    if isinstance(obj, (str, Path)):  # a file name that is not UTF-8: HDF5 stores text only
        return text(str(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _h5_name(name: str) -> str:
    """A column / key name h5ad can store: a ``/`` (runs of the same folder name are called ``a/abmil``,
    ``b/abmil``) would make HDF5 groups (read back as nested ``{"a": {"abmil": ...}}``; refused by newer anndata)."""
    return name.replace("/", ":")


def _int_categories(col: Any) -> Any:
    """A float column of whole numbers (NaN where unknown) as a categorical of int64 categories (a slide's label or
    held-out fold: groups for ``scanpy`` / discrete colours, not a continuous scale)."""
    import pandas as pd

    v = np.asarray(col, np.float64)
    known = np.isfinite(v)
    cats = np.unique(v[known]).astype(np.int64)
    codes = np.full(len(v), -1, np.int64)
    codes[known] = np.searchsorted(cats, v[known].astype(np.int64))
    return pd.Categorical.from_codes(codes, categories=cats)


def build_anndata(out_dirs: list[str | os.PathLike], runs: list[str | os.PathLike] = (),
                  tile_probability: bool = False) -> tuple[Any, list[str]]:
    """The AnnData of every encoded slide in ``out_dirs`` (+ problems: slides left out and why).

    Two passes, so that the features are held once: every file's coords and attributes first (the files are checked
    for compatibility before any features are read), then each slide's features read straight into ``X``."""
    import anndata as ad  # heavy (pandas): only when exporting
    import pandas as pd

    where = ", ".join(map(str, out_dirs))
    entries, problems = list_slides(list(out_dirs))
    run_list = load_runs(list(runs))
    slides = list(encoded_slides(entries.values(), problems, arrays=False))  # features not read yet
    if slides:
        store.check_consistent([ff for _, ff in slides], where=where)
    X = np.empty((sum(len(ff) for _, ff in slides), slides[0][1].dim if slides else 0), np.float32)
    spatial = np.empty((len(X), 2), np.float64)
    scorer = TileScorer()
    obs_parts, slides_uns, n, first = [], {}, 0, None
    for e, lazy in slides:
        try:
            ff = lazy.loaded()
        except GigaslideError as err:  # damaged inside (a checksum), seen only when the features are read
            problems.append(f"{e.slide_id}: {err.one_line()} -- left out")
            continue
        first = lazy if first is None else first
        rows = slice(n, n + len(ff))
        X[rows] = ff.features
        bad = int((~np.isfinite(X[rows]).all(1)).sum())
        if bad:  # kept as they are (X is what the files hold), but said: scanpy's PCA / neighbours stop on them
            problems.append(f"{e.slide_id}: {bad} of {len(ff)} tile(s) have NaN/inf features ({e.features}) -- kept "
                            "in X; drop them with adata[np.isfinite(adata.X).all(1)] or re-encode the slide (fp32)")
        spatial[rows] = ff.coords
        n += len(ff)
        cols, probs = run_columns(e, ff, run_list, scorer, tile_probability)
        problems += probs
        df = pd.DataFrame({"slide_id": e.key, "tile": np.arange(len(ff)), "x": ff.coords[:, 0], "y": ff.coords[:, 1],
                           "tissue": tissue_fraction(e, ff.coords)})
        if ff.labels is not None:
            df["tile_label"] = np.asarray(ff.labels, np.int64)
        for k, v in cols.items():
            df[_h5_name(k)] = v
        obs_parts.append(df)
        slides_uns[e.key] = {"slide_path": e.slide_path, "features": e.features, "slide_mpp": e.slide_mpp,
                             "tile_size_level0": ff.tile_size_level0, "n_tiles": len(ff)}
        del ff
    if not obs_parts:
        raise nothing_to_export(out_dirs, len(entries), problems)
    obs = pd.concat(obs_parts, ignore_index=True)
    obs["slide_id"] = obs["slide_id"].astype("category")
    for r in run_list:
        for c in (f"{r.name} label", f"{r.name} fold"):
            if _h5_name(c) in obs:
                obs[_h5_name(c)] = _int_categories(obs[_h5_name(c)])
    obs.index = [f"{s}:{t}" for s, t in zip(obs["slide_id"].astype(str), obs["tile"])]
    adata = ad.AnnData(X=X[:n], obs=obs)  # a view of X: no copy when a damaged slide left rows unused
    adata.obsm["spatial"] = spatial[:n]
    adata.uns["gigaslide"] = _clean(provenance(
        "anndata_export", encoder=first.encoder, encoder_weights_sha256=first.attrs.get("encoder_weights_sha256"),
        mpp=first.mpp, tile_size=first.attrs.get("tile_size"), sources=[str(d) for d in out_dirs],
        runs={_h5_name(r.name): {"name": r.name, "path": str(r.path), "kind": r.kind, "model": r.model}
              for r in run_list},
        coordinates="obsm['spatial'] = tile top-left corner, level-0 px", slides=slides_uns, problems=problems))
    return adata, problems


def export_anndata(out_dirs: list[str | os.PathLike], out: str | os.PathLike, runs: list[str | os.PathLike] = (),
                   tile_probability: bool = False) -> tuple[Path, Any, list[str]]:
    """Write the AnnData atomically to ``out`` (.h5ad); returns (path, adata, problems). One export at a time writes
    ``out`` (a second one is refused: :func:`~gigaslide.export.guard.exclusive`), which removes the temporary file a
    killed one left for it; Ctrl-C / SIGTERM stop it without a file
    (:func:`~gigaslide.export.guard.stops_on_signals`)."""
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):  # the rename failed with a traceback after the work
        raise GigaslideError("is a folder: --out names the .h5ad file to write", path=out,
                             fix=f"pass a file name, e.g. --out {Path(out) / 'features.h5ad'}")
    out = Path(out)
    folder = atomic.ensure_writable_dir(out.parent)  # before the work: an unwritable --out is said at once
    with stops_on_signals() as stop, exclusive(folder / f".{out.name}.lock", out) as held:
        if held:
            clean_stale_tmp(folder, [out.name], suffix=".h5ad")
        adata, problems = build_anndata(out_dirs, runs, tile_probability)
        stop.check()
        with atomic.atomic_path(out, suffix=".h5ad") as tmp, stop.deferred():  # stopped after it, before the rename
            write_h5ad(adata, tmp)
    return out, adata, problems


def write_h5ad(adata: Any, path: Path) -> None:
    """``adata.write_h5ad(path)``, the same file, written through a Python file object: a full disk (or quota) is then
    the OSError of that write (one line naming the file, :func:`gigaslide.atomic.atomic_path`). Written by HDF5 itself,
    a full disk surfaced as a RuntimeError from h5py's close (not seen as a storage fault: a traceback), dozens of
    "Exception ignored" tracebacks, and a segmentation fault when the interpreter exited."""
    import h5py
    from anndata.io import write_elem

    adata.strings_to_categoricals()  # as write_h5ad does
    with open(path, "w+b") as fh, h5py.File(fh, "w") as f:  # the fileobj driver reads back what it wrote: w+
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        for key, elem in (("X", adata.X), ("obs", adata.obs), ("var", adata.var), ("obsm", dict(adata.obsm)),
                          ("varm", dict(adata.varm)), ("obsp", dict(adata.obsp)), ("varp", dict(adata.varp)),
                          ("layers", dict(adata.layers)), ("uns", dict(adata.uns))):
            write_elem(f, key, elem)

"""Per-tile columns shared by the exports: tissue fraction and, per run, the held-out fold's scores."""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.export.catalog import SlideEntry, complete_entry
from gigaslide.features import store
from gigaslide.export.runs import Run, TileScorer


def encoded_slides(entries: Any, problems: list[str], *, arrays: bool = True):  # noqa: ANN201
    """``(entry, FeatureFile)`` of every slide with tiles, the entry completed from the file's attributes
    (:func:`~gigaslide.export.catalog.complete_entry`); the others (no features file, no tiles, a damaged file) are
    noted in ``problems`` (one line each) and left out, so one bad file among thousands does not stop an export.
    ``arrays=False``: the features are read when used (``ff.loaded()``, which may still find the file damaged)."""
    for e in entries:
        if e.features is None:
            problems.append(f"{e.slide_id}: no features/{e.slide_id}.h5 ({e.error or 'not encoded'}) -- left out")
            continue
        try:
            ff = store.load(e.features, arrays=arrays)
        except GigaslideError as err:
            problems.append(f"{e.slide_id}: {err.one_line()} -- left out")
            continue
        complete_entry(e, (ff.attrs, ff.coords_attrs))
        if len(ff) == 0:
            problems.append(f"{e.slide_id}: no tiles -- left out")
            continue
        yield e, ff


def nothing_to_export(out_dirs: Any, n_listed: int, problems: list[str]) -> GigaslideError:
    """The error of an export that found no slide to write: the folders hold none, or every slide was left out (then
    the first reason: the notes saying each are not printed when the export stops)."""
    where = ", ".join(map(str, out_dirs))
    left = [p for p in problems if p.endswith("-- left out")]
    if not n_listed or not left:
        return GigaslideError("no encoded slides to export", path=where,
                              fix="run `gigaslide encode SLIDES --out OUT_DIR` and pass OUT_DIR")
    first = left[0].removesuffix(" -- left out")
    return GigaslideError(f"no encoded slides to export: all {n_listed} slide(s) left out, e.g. {first}", path=where,
                          fix="re-run `gigaslide encode` for them (its manifest.json says why each failed)")


def tissue_fraction(entry: SlideEntry, coords: np.ndarray) -> np.ndarray:
    """Tissue fraction of each tile from ``patches/<id>.h5`` (matched by coordinates; NaN where unknown). NaN too when
    the coords file holds tiles of another size than the features (the slide was tiled again into the folder at other
    settings): a tile of another size at the same corner has another tissue fraction."""
    out = np.full(len(coords), np.nan, np.float32)
    if entry.patches is None:
        return out
    try:
        with h5py.File(entry.patches, "r") as f:
            pc = np.asarray(f["coords"][:], np.int64)
            pt = np.asarray(f["tissue"][:], np.float32) if "tissue" in f else None
            size0 = f["coords"].attrs.get("patch_size_level0")
    except (OSError, KeyError):
        return out
    feature_size0 = (entry.feature_attrs.get("coords") or {}).get("patch_size_level0")
    if pt is None or (size0 is not None and feature_size0 is not None
                      and not np.isclose(float(size0), float(feature_size0), rtol=1e-6)):
        return out
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(pc)}
    for i, (x, y) in enumerate(np.asarray(coords, np.int64)):
        j = index.get((int(x), int(y)))
        if j is not None:
            out[i] = pt[j]
    return out


def fold_for(run: Run, slide_id: str) -> str | None:
    """The held-out fold of a slide, else the first fold (the slide was not in this run's CV)."""
    return run.held_out_fold(slide_id) or (run.folds[0] if run.folds else None)


def run_columns(entry: SlideEntry, ff: Any, runs: list[Run], scorer: TileScorer,
                tile_probability: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-tile columns ``<run> attention``, ``<run> attention percentile``, ``<run> tile P(class c)`` and the
    slide-level ``<run> P(class c)`` / ``<run> fold`` (held-out prediction) broadcast to every tile; a run trained
    on class names names them instead (``<run> P(tumor)``)."""
    cols: dict[str, np.ndarray] = {}
    problems: list[str] = []
    n = len(ff)
    for run in runs:
        pred = run.predictions.get(entry.slide_id)
        if pred is not None:
            for c, p in enumerate(pred["probs"]):
                cols[f"{run.name} P({run.class_label(c)})"] = np.full(n, p, np.float32)
            cols[f"{run.name} label"] = np.full(n, pred["label"], np.float32)
            cols[f"{run.name} fold"] = np.full(n, pred["fold"], np.float32)
        fold = fold_for(run, entry.slide_id)
        if run.kind != "mil" or fold is None:
            continue
        try:
            cols[f"{run.name} attention"] = scorer.scores(run, fold, ff, "attention").astype(np.float32)
            cols[f"{run.name} attention percentile"] = scorer.scores(run, fold, ff, "attention_pct").astype(np.float32)
            if tile_probability:
                probs = scorer.scores(run, fold, ff, "probability")
                for c in range(probs.shape[1]):
                    cols[f"{run.name} tile P({run.class_label(c)})"] = probs[:, c].astype(np.float32)
        except GigaslideError as e:
            problems.append(f"{entry.slide_id}, run {run.name}: {e.one_line()}")
    scorer.forget(ff)  # an export reads each slide once: its scores need not stay
    return cols, problems

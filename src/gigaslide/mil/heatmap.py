"""Attention / prediction heatmaps over the slide thumbnail, and attention-localisation AUC.

Per-tile scores are the model's ``instance_scores`` (attention for attention models, the tile's
logit margin for the shown class -- the positive one, with more classes the predicted one -- for
mean/max pooling), shown as percentiles (CLAM-style, so a few
tiles with huge attention do not wash out the map) over the thumbnail with a colour bar. When
tile ground truth exists (mosaic slides: ``ground_truth/{slide}.csv``), the tumour tiles are
outlined and the localisation AUC -- ROC AUC of the raw tile scores against tumour / normal --
is reported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.metrics import auc, bootstrap_replicates, percentile_ci
from gigaslide.features.store import FeatureFile
from gigaslide.mil.mosaic import read_ground_truth, tumor_labels_for_coords
from gigaslide.mil.train import check_features_fit, load_model


def localisation_auc(scores: np.ndarray, coords: np.ndarray, gt: np.ndarray, tile_size0: float) -> float:
    """AUC of tile scores against tumour ground truth (NaN when the slide has no tumour tiles)."""
    y = tumor_labels_for_coords(gt, coords, tile_size0)
    return auc(y, np.asarray(scores, dtype=np.float64)) if 0 < y.sum() < len(y) else float("nan")


def tile_size_of(ff: Any) -> float:
    """Level-0 tile side of a feature file (see :attr:`gigaslide.features.store.FeatureFile.tile_size_level0`)."""
    return ff.require_tile_size_level0()


def find_ground_truth(slide: str | os.PathLike) -> Path | None:
    """``MOSAIC/ground_truth/{id}.csv`` next to ``MOSAIC/slides/{id}.tiff``, if present."""
    p = Path(slide)
    cand = p.parent.parent / "ground_truth" / f"{p.stem}.csv"
    return cand if cand.is_file() else None


def percentile(s: np.ndarray) -> np.ndarray:
    """Scores as percentiles in [0, 1] (ties share their mean rank, so equal scores -- and a bag of one tile --
    are 0.5); a NaN score stays NaN (left unpainted) instead of turning every percentile into NaN."""
    from scipy.stats import rankdata

    s = np.asarray(s, np.float64).ravel()
    out = np.full(s.shape, np.nan)
    ok = ~np.isnan(s)
    n = int(ok.sum())
    if n:
        out[ok] = (rankdata(s[ok]) - 1) / (n - 1) if n > 1 else 0.5
    return out


def paint_tiles(shape: tuple[int, int], coords: np.ndarray, values: np.ndarray, tile_size0: float,
                downsample: float | tuple[float, float]) -> np.ndarray:
    """[h, w] thumbnail-pixel grid with each tile's value over its square (NaN elsewhere): a tile spans the thumb
    pixels from its rounded left / top edge to its neighbour's, so a lattice of tiles leaves no seam (a fixed side
    from the truncated corner left 1 px stripes of bare thumbnail wherever the fractions added up). Where tiles
    overlap (tiling with overlap, or several tiles per thumb pixel) a pixel shows the mean of the tiles covering it,
    as CLAM's overlap heatmaps do (the last tile drawn used to hide its neighbours' right / bottom parts).
    ``downsample``: level-0 px per thumb px, or (x, y) when the thumbnail's two axes were rounded apart."""
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else (float(downsample[0]), float(downsample[1]))
    total, count = np.zeros(shape), np.zeros(shape)
    for (x, y), v in zip(np.asarray(coords, np.float64), np.asarray(values, np.float64)):
        if np.isnan(v):
            continue
        x0, y0 = round(x / dx), round(y / dy)
        x1, y1 = round((x + tile_size0) / dx), round((y + tile_size0) / dy)
        sl = (slice(max(y0, 0), max(y1, y0 + 1)), slice(max(x0, 0), max(x1, x0 + 1)))
        total[sl] += v
        count[sl] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def draw_heatmap(thumb: np.ndarray, downsample: float | tuple[float, float], coords: np.ndarray, values: np.ndarray,
                 tile_size0: float, out: str | os.PathLike, *, title: str = "", label: str = "attention (percentile)",
                 tumor_coords: np.ndarray | None = None, alpha: float = 0.5, tumor_size0: float | None = None) -> Path:
    """Paint per-tile ``values`` in [0, 1] over ``thumb`` (``downsample`` level-0 px per thumb px, or (x, y)) with a
    colour bar, in the format ``out``'s extension names (.png, .jpg, .pdf, .svg, ...: the PNG bytes were written
    whatever the name); ``tumor_coords`` (level-0 top-left corners of ground-truth cells of side ``tumor_size0``,
    default the tiles') are outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = Path(out).suffix.lower().lstrip(".") or "png"
    if fmt not in FigureCanvasAgg(Figure()).get_supported_filetypes():
        raise GigaslideError(f"cannot write a heatmap as .{fmt}", path=out, fix="name it .png, .jpg, .pdf or .svg")

    h, w = thumb.shape[:2]
    grid = paint_tiles((h, w), coords, values, tile_size0, downsample)
    # a Figure of its own, not pyplot's: the caller's matplotlib backend (a notebook's inline one) and open figures
    # stay as they were (matplotlib.use("Agg") switched a notebook's plots off for the rest of its session)
    fig = Figure(figsize=(7, 7 * h / max(w, 1) + 0.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    if tumor_coords is not None and len(tumor_coords):
        t = paint_tiles((h, w), tumor_coords, np.ones(len(tumor_coords)), tumor_size0 or tile_size0, downsample)
        ax.contour(np.nan_to_num(t), levels=[0.5], colors="lime", linewidths=1.2)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)
    fig.tight_layout()
    with atomic.atomic_path(out, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return Path(out)


def heatmap(slide: str | os.PathLike, features: str | os.PathLike, model_dir: str | os.PathLike,
            out: str | os.PathLike, *, ground_truth: str | os.PathLike | None = None, thumb_size: int = 1024,
            slide_mpp: float | None = None) -> dict[str, Any]:
    """Draw a slide's MIL attention heatmap; returns probabilities, n tiles and localisation AUC (if known)."""
    from gigaslide.features import store
    from gigaslide.slides import open_slide

    model, meta = load_model(model_dir)
    ff = store.load(features)
    check_features_fit(meta, ff, features)
    cells = ff.grid_cells()
    x = np.asarray(ff.features, np.float32)
    bad = int((~np.isfinite(x)).any(-1).sum()) if x.ndim == 2 else 0
    if bad:  # (was a heatmap of NaN with probabilities [nan, nan])
        raise GigaslideError(f"{bad} tile(s) have NaN/inf features", path=features,
                             fix="re-encode that slide (the encoder overflowed: try fp32)")
    with torch.no_grad():
        res = model(torch.from_numpy(x), cells=None if cells is None else torch.from_numpy(cells))
    probs = torch.softmax(res["logits"].float(), -1).numpy()
    scores = res["instance_scores"].float().numpy()
    tile0 = tile_size_of(ff)
    s = open_slide(slide, mpp=slide_mpp)
    made_from = str(ff.attrs.get("slide_id") or "")  # absent in other tools' files
    if made_from and made_from != s.id:
        raise GigaslideError(f"features of slide {made_from} ({ff.attrs.get('slide_path', '?')}), not of "
                             f"{Path(slide).name}", path=features,
                             fix="pass the slide with its own features (OUT/features/<slide_id>.h5)")
    thumb, ds = s.thumbnail(thumb_size)
    ds = (ds, s.dimensions[1] / thumb.shape[0])  # the thumbnail's sides are rounded apart: each axis its own scale
    gt_path = Path(ground_truth) if ground_truth else find_ground_truth(slide)
    out_info: dict[str, Any] = {"slide": str(slide), "probs": probs.tolist(), "n_tiles": len(scores),
                                "model": meta["model"], "out": str(out), "localisation_auc": None}
    tumor_xy, gt_size0 = None, None
    # binary: the positive class; more classes: the predicted one (whose attention branch CLAM-MB shows), not the last
    shown = len(probs) - 1 if len(probs) == 2 else int(np.argmax(probs))
    names = meta.get("class_names")  # a run on a labels.csv of class names (label c = class_names[c])
    cls = names[shown] if names and len(names) == len(probs) else f"class {shown}"
    title = f"{Path(slide).stem}  {meta['model']}  " + (f"P({cls}) = {probs[shown]:.3f}" if len(probs) == 2 else
                                                        f"predicted {cls} (P = {probs[shown]:.3f})")
    if gt_path is not None:
        gt = read_ground_truth(gt_path)
        la = localisation_auc(scores, ff.coords, gt, tile0)
        out_info["localisation_auc"] = None if np.isnan(la) else la
        tumor_xy = gt[gt[:, 3] == 1][:, :2]
        gt_size0 = float(gt[0, 2]) if len(gt) else None  # the ground truth's cells, not the features' tiles
        if not np.isnan(la):
            title += f"  attention AUC vs tumour = {la:.3f}"
    kind = "attention" if res["attention"] is not None else "tile score"
    draw_heatmap(thumb, ds, ff.coords, percentile(scores), tile0, out, title=title, label=f"{kind} (percentile)",
                 tumor_coords=tumor_xy, tumor_size0=gt_size0)
    return out_info


def run_localisation(run_dir: str | os.PathLike, ground_truth_dir: str | os.PathLike, *, n_bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Mean attention-localisation AUC over the positive test slides of a run (``fold*/attention.h5``),
    with a percentile bootstrap 95 % CI over slides. Only repeat 0 of each fold is used."""
    import h5py

    run, gtd = Path(run_dir), Path(ground_truth_dir)
    meta = {}
    vals: list[float] = []
    for fd in sorted(run.glob("fold*")):
        if "_r" in fd.name or not (fd / "attention.h5").is_file():
            continue
        if not meta:
            import json

            meta = json.loads((fd / "config.json").read_text())
        tile0 = float(meta.get("tile_size_level0") or 0)
        with h5py.File(fd / "attention.h5", "r") as f:
            for sid in f:
                gp = gtd / f"{sid}.csv"
                if not gp.is_file():
                    continue
                coords = f[sid]["coords"][:]
                # the slide's own level-0 tile side (the config's is the first slide's: a slide scanned at another
                # resolution has another); runs written before it was recorded fall back to the config's
                size0 = float(f[sid].attrs.get("tile_size_level0", 0) or 0) or tile0 or \
                    FeatureFile(np.zeros((len(coords), 0)), coords).require_tile_size_level0()
                v = localisation_auc(f[sid]["scores"][:], coords, read_ground_truth(gp), size0)
                if not np.isnan(v):
                    vals.append(v)
    if not vals:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_slides": 0}
    a = np.asarray(vals)
    lo, hi = percentile_ci(bootstrap_replicates(lambda i: a[i].mean(), len(a), n_bootstrap=n_bootstrap, seed=seed))
    return {"value": float(a.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_slides": len(a)}

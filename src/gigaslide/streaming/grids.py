"""StreamingCLAM attention grids on disk: what ``heatmap-streaming`` computed, for the viewer.

``RUN/heatmaps/fold<k>/<slide_id>.npz`` holds, for every (pooled) feature-map position over slide
content: ``coords`` [n, 2] (level-0 top-left, row-major), ``attention`` [n] (raw head attention),
``box_level0_px`` (side of one position in level-0 px), ``fmap_size`` (h, w), ``probs`` [C] (slide
prediction), ``slide_size`` (level-0 width, height), ``checkpoint_sha256`` (the ``fold<k>/best.safetensors`` it was
computed with: a grid of a fold trained further or again since is refused when read) and, for heads with per-instance
logits (mean / max), ``instance_probs`` [n, C].
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gigaslide import atomic
from gigaslide.errors import GigaslideError

FOLDER = "heatmaps"


@dataclass
class AttentionGrid:
    slide_id: str
    fold: int
    coords: np.ndarray
    attention: np.ndarray
    box_level0_px: float
    fmap_size: tuple[int, int]
    probs: np.ndarray
    slide_size: tuple[int, int]
    instance_probs: np.ndarray | None = None
    checkpoint_sha256: str | None = None  # of the fold's best.safetensors the grid was computed with


def checkpoint_path(run: str | os.PathLike, fold: int) -> Path:
    return Path(run) / f"fold{int(fold)}" / "best.safetensors"


def grid_path(run: str | os.PathLike, slide_id: str, fold: int) -> Path:
    return Path(run) / FOLDER / f"fold{int(fold)}" / f"{slide_id}.npz"


def grid_folds(run: str | os.PathLike, slide_id: str) -> list[int]:
    """Folds of ``run`` with a saved grid of ``slide_id``, ascending."""
    d = Path(run) / FOLDER
    found = [p.parent.name[4:] for p in d.glob(f"fold*/{glob.escape(slide_id)}.npz")] if d.is_dir() else []
    return sorted(int(f) for f in found if f.isdigit())


def save_grid(run: str | os.PathLike, g: AttentionGrid) -> Path:
    """Write ``g`` atomically to :func:`grid_path`."""
    out = grid_path(run, g.slide_id, g.fold)
    arrays = {"coords": np.asarray(g.coords, np.int64).reshape(-1, 2), "attention": np.asarray(g.attention, np.float32).ravel(),
              "box_level0_px": np.float64(g.box_level0_px), "fmap_size": np.asarray(g.fmap_size, np.int64),
              "probs": np.asarray(g.probs, np.float32), "slide_size": np.asarray(g.slide_size, np.int64),
              "slide_id": np.array(g.slide_id), "fold": np.int64(g.fold)}
    if g.instance_probs is not None:
        arrays["instance_probs"] = np.asarray(g.instance_probs, np.float32)
    if g.checkpoint_sha256 is not None:
        arrays["checkpoint_sha256"] = np.array(g.checkpoint_sha256)
    if len(arrays["coords"]) != len(arrays["attention"]):
        raise ValueError("coords and attention differ in length")
    atomic.clean_stale_tmp_for(out)  # this grid's temporary file left by a killed heatmap-streaming (no run lock)
    with atomic.atomic_path(out, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return out


def load_grid(run: str | os.PathLike, slide_id: str, fold: int) -> AttentionGrid:
    """The saved grid; refused (one line) when unreadable, or when the fold's checkpoint is no longer the one the grid
    was computed with (a grid saved while the fold trained, then trained further on resume: the viewer showed the
    old model's attention as the run's)."""
    p = grid_path(run, slide_id, fold)
    fix = f"re-run `gigaslide heatmap-streaming SLIDE --run {run} --fold {fold} --out PNG`"
    try:
        with np.load(p, allow_pickle=False) as z:
            g = AttentionGrid(str(z["slide_id"]), int(z["fold"]), z["coords"], z["attention"].astype(np.float64),
                              float(z["box_level0_px"]), tuple(int(v) for v in z["fmap_size"]), z["probs"],
                              tuple(int(v) for v in z["slide_size"]),
                              z["instance_probs"] if "instance_probs" in z.files else None,
                              str(z["checkpoint_sha256"]) if "checkpoint_sha256" in z.files else None)
    except (OSError, ValueError, KeyError) as e:
        raise GigaslideError(f"unreadable attention grid ({type(e).__name__})", path=p, fix=fix) from None
    ckpt = checkpoint_path(run, fold)
    if g.checkpoint_sha256 is not None and ckpt.is_file():  # grids saved before it was recorded: not checked
        from gigaslide.provenance import file_sha256

        if file_sha256(ckpt) != g.checkpoint_sha256:
            raise GigaslideError(f"attention grid computed with another fold{int(fold)}/best.safetensors than the "
                                 "run's now (the fold was trained further or again since)", path=p, fix=fix)
    return g

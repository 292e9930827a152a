"""Attention heatmaps of a trained StreamingCLAM model: the head's attention over the (pooled) feature map.

Each position of the map the head sees covers ``out_stride = stride * pool_kernel`` canvas px, i.e.
``out_stride * read_mpp / slide_mpp`` level-0 px from the canvas origin (``read_mpp``: the resolution the canvas
was read at, within 1 % of ``--mpp``, :attr:`Canvas.level0_per_px`); the attention (as percentiles) is
painted on the slide thumbnail at those level-0 boxes, and the grid is saved as
``RUN/heatmaps/fold<k>/<slide_id>.npz`` (:mod:`gigaslide.streaming.grids`) for ``gigaslide view``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import runs
from gigaslide.devices import autocast_dtype, pick_device
from gigaslide.encoders.model import EXPORT_SPEC
from gigaslide.errors import GigaslideError
from gigaslide.streaming.data import Normalize, read_canvas
from gigaslide.streaming.grids import AttentionGrid, save_grid
from gigaslide.streaming.train import TrainConfig, build_model, load_weights
from gigaslide.tiling.tissue import check_background


def load_run_model(run: str | os.PathLike, fold: int = 0, device: str = "auto") -> tuple[Any, TrainConfig, int]:
    """The best checkpoint of ``fold`` in a ``train-streaming`` run -> (model, config, n_classes)."""
    run_dir = Path(run)
    rec, ckpt = runs.read_run(run_dir), run_dir / f"fold{fold}" / "best.safetensors"
    have = sorted(int(p.parent.name[4:]) for p in run_dir.glob("fold*/best.safetensors") if p.parent.name[4:].isdigit())
    if rec is not None and rec.get("run_kind") == "streaming" and not ckpt.is_file() and have:
        raise GigaslideError(f"this run has no trained fold {fold} (trained folds: {', '.join(map(str, have))})",
                             path=run_dir, fix=f"pass --fold {have[0]} (or another of them)")
    if rec is None or rec.get("run_kind") != "streaming" or not ckpt.is_file():
        raise GigaslideError(f"no trained fold {fold} here (run.json of a streaming run / fold{fold}/best.safetensors missing)",
                             path=run_dir, fix="pass the --out folder of a finished `gigaslide train-streaming` run")
    known = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in rec["config"].items() if k in known})
    # the checkpoint holds every trunk weight: build without loading weights again (an export folder is still
    # read, for its own spec: mean/std)
    weights = cfg.weights if (Path(cfg.weights) / EXPORT_SPEC).is_file() else "random"
    from safetensors.torch import safe_open

    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
        n_classes = int(f.get_tensor("head.classifier.weight").shape[0]) if "head.classifier.weight" in keys else 2
    dev = pick_device(device)
    model = build_model(dataclasses.replace(cfg, weights=weights), n_classes, dev)
    load_weights(model, ckpt)
    model.eval()
    return model, cfg, n_classes


def _check_finite(model: Any, probs: np.ndarray, att: torch.Tensor, slide: str | os.PathLike, ckpt: Path,
                  dtype: torch.dtype | None) -> None:
    """Refuse a prediction or attention that is NaN/inf (it was printed as 'P = [nan, nan]' and saved in the grid)."""
    if np.isfinite(probs).all() and bool(torch.isfinite(att.float()).all()):
        return
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise GigaslideError("the checkpoint holds NaN/inf weights (a diverged or damaged model)", path=ckpt,
                             fix="train the run again (a lower --lr), or pass another --fold")
    fix = ("predict in fp32: --device cpu (this run trains in fp16, whose activations overflowed on this slide)"
           if dtype is torch.float16 else "check the slide (its canvas gave a NaN/inf prediction)")
    raise GigaslideError(f"the model's prediction is NaN/inf on this slide ({ckpt.parent.name})", path=slide, fix=fix)


def streaming_heatmap(slide: str | os.PathLike, run: str | os.PathLike, out: str | os.PathLike, *, fold: int = 0,
                      thumb_size: int = 1024, device: str = "auto",
                      slide_mpp: float | str | None = None, background: str | None = None) -> dict[str, Any]:
    """Predict ``slide`` with a trained run, draw the attention over the feature map on its thumbnail and save
    the grid in the run folder (``grid``: its path, or None with ``grid_error`` when it cannot be written).
    ``slide_mpp``: the slide's level-0 µm/px or a CSV slide_id,mpp (default: the run's ``--slide-mpp``, if any);
    ``background``: ``auto`` (detected), ``bright`` or ``dark`` (default: the run's ``--background``, ``auto`` for a
    run made before the option)."""
    from gigaslide.mil.heatmap import draw_heatmap, percentile
    from gigaslide.slides import open_slide

    if background is not None:
        check_background(background)  # before the run's model is built
    model, cfg, _ = load_run_model(run, fold, device)
    dev = pick_device(device)
    smpp = cfg.slide_mpp if slide_mpp is None else slide_mpp
    rec = runs.read_run(run) or {}
    bg = background if background is not None else (rec.get("config") or {}).get("background", "auto")
    canvas = read_canvas(slide, cfg.mpp, cfg.image_size, model.stream.stride, slide_mpp=smpp, background=bg)
    model.stream.transform = Normalize(model.spec.mean, model.spec.std)
    dtype = autocast_dtype(dev, (rec.get("precision") or {}).get("resolved", cfg.precision))
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        res = model(canvas.pixels()[None])
    probs = torch.softmax(res["logits"].float().reshape(-1), 0).cpu().numpy()
    h, w = res["fmap_size"]
    att = res["attention"] if res.get("attention") is not None else res["instance_scores"]  # mean / max: logit margin
    _check_finite(model, probs, att, slide, Path(run) / f"fold{fold}" / "best.safetensors", dtype)
    if res.get("attention") is None and res.get("instance_logits") is not None and len(probs) > 2:
        il = res["instance_logits"].float().cpu().numpy()  # the predicted class's margin, not any class's top logit
        k = int(probs.argmax())
        att = torch.from_numpy(il[:, k] - np.delete(il, k, 1).max(1))
    att = att.float().cpu().numpy().reshape(h, w)
    # positions wholly over padding (beyond the slide content) are not drawn
    s = model.stream.out_stride
    ch, cw = canvas.content_size
    att = att[: -(-ch // s), : -(-cw // s)]
    coords = canvas.position_coords(att.shape, s)
    inst = res.get("instance_logits")
    if inst is not None:  # mean / max heads: a class probability per position
        inst = torch.softmax(inst.float(), -1).cpu().numpy().reshape(h, w, -1)[: att.shape[0], : att.shape[1]]
        inst = inst.reshape(att.size, -1)
    with open_slide(slide, mpp=smpp) as sl:
        thumb, ds = sl.thumbnail(thumb_size)
        size = tuple(int(v) for v in sl.dimensions)
    ds = (ds, size[1] / thumb.shape[0])  # the thumbnail's sides are rounded apart: each axis its own scale
    # binary: the positive class; more classes: the predicted one, whose attention branch CLAM-MB heads return
    shown = len(probs) - 1 if len(probs) == 2 else int(probs.argmax())
    title = f"{Path(slide).stem}  StreamingCLAM  " + (f"P(class {shown}) = {float(probs[shown]):.3f}" if len(probs) == 2
                                                      else f"predicted class {shown} (P = {float(probs[shown]):.3f})")
    draw_heatmap(thumb, ds, coords, percentile(att.ravel()), s * canvas.level0_per_px, out, title=title)
    grid, err = None, None
    try:
        grid = str(save_grid(run, AttentionGrid(canvas.slide_id, fold, coords, att.ravel(), s * canvas.level0_per_px,
                                                att.shape, probs, size, inst)))
    except GigaslideError as e:  # a read-only run folder: the PNG is still made
        err = e.one_line()
    return {"probs": probs.tolist(), "fmap_size": [h, w], "out": str(out), "coords": coords.tolist(),
            "box_level0_px": s * canvas.level0_per_px, "grid": grid, "grid_error": err, "tissue": canvas.tissue}

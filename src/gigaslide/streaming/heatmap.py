"""Attention heatmaps of a trained StreamingCLAM model: the head's attention over the (pooled) feature map.

Each position of the map the head sees covers ``out_stride = stride * pool_kernel`` canvas px, i.e.
``out_stride * read_mpp / slide_mpp`` level-0 px from the canvas origin (``read_mpp``: the resolution the canvas
was read at, within 1 % of ``--mpp``, :attr:`Canvas.level0_per_px`); the attention (as percentiles) is
painted on the slide thumbnail at those level-0 boxes, and the grid is saved as
``RUN/heatmaps/fold<k>/<slide_id>.npz`` (:mod:`gigaslide.streaming.grids`) for ``gigaslide view``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import runs
from gigaslide.devices import autocast_dtype, pick_device
from gigaslide.encoders.model import EXPORT_SPEC
from gigaslide.errors import GigaslideError, nonfinite_weights
from gigaslide.provenance import file_sha256
from gigaslide.streaming.data import Normalize, read_canvas
from gigaslide.streaming.grids import AttentionGrid, checkpoint_path, save_grid
from gigaslide.streaming.train import TrainConfig, build_model, load_weights
from gigaslide.tiling.tissue import check_background


#: Most classes a checkpoint's head may have: a shared checkpoint whose classifier claims more (a tensor of shape
#: [10^8, 0] holds no bytes) built a head with as many instance classifiers -- a hang, then out of memory.
MAX_CLASSES = 1024


def load_run_model(run: str | os.PathLike, fold: int = 0, device: str = "auto") -> tuple[Any, TrainConfig, int]:
    """The best checkpoint of ``fold`` in a ``train-streaming`` run -> (model, config, n_classes).

    The model normalises with the mean/std the run trained with (run.json's provenance), not those of the encoder
    folder as it is now (moved, deleted or re-exported since); the caller's global RNG streams are kept."""
    with runs.isolated_rng():
        return _load_run_model(Path(run), fold, device)


def _load_run_model(run_dir: Path, fold: int, device: str) -> tuple[Any, TrainConfig, int]:
    rec, ckpt = runs.read_run(run_dir), run_dir / f"fold{fold}" / "best.safetensors"
    have = sorted(int(p.parent.name[4:]) for p in run_dir.glob("fold*/best.safetensors") if p.parent.name[4:].isdigit())
    if rec is not None and rec.get("run_kind") == "streaming" and not ckpt.is_file() and have:
        raise GigaslideError(f"this run has no trained fold {fold} (trained folds: {', '.join(map(str, have))})",
                             path=run_dir, fix=f"pass --fold {have[0]} (or another of them)")
    if rec is None or rec.get("run_kind") != "streaming" or not ckpt.is_file():
        raise GigaslideError(f"no trained fold {fold} here (run.json of a streaming run / fold{fold}/best.safetensors missing)",
                             path=run_dir, fix="pass the --out folder of a finished `gigaslide train-streaming` run")
    cfg = _resolve_run_paths(rec, _run_config(rec, run_dir))
    # the checkpoint holds every trunk weight: build without loading weights again (an export folder is still
    # read, for its architecture)
    weights = cfg.weights if (Path(cfg.weights) / EXPORT_SPEC).is_file() else "random"
    n_classes = _checkpoint_classes(rec, ckpt)
    dev = pick_device(device)
    model = build_model(dataclasses.replace(cfg, weights=weights), n_classes, dev)
    norm = _recorded_normalisation(rec)
    if norm is not None:  # what the run trained with: an export folder moved or re-exported since had other values
        model.spec = dataclasses.replace(model.spec, mean=norm[0], std=norm[1])
    load_weights(model, ckpt)
    model.eval()
    return model, cfg, n_classes


def _run_config(rec: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The run's :class:`TrainConfig` from run.json, each value of its option's type (a run.json edited or from
    elsewhere with ``"tile_size": "abc"`` was a ValueError traceback deep inside the model's construction)."""
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in config:
            continue
        v, default = config[f.name], f.default
        kind = type(default) if default is not None else None
        ok = (kind is None or (isinstance(v, bool) if kind is bool else
                               isinstance(v, int) and not isinstance(v, bool) if kind is int else
                               isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               if kind is float else isinstance(v, kind)))
        if not ok:
            want = "a finite number" if kind is float else f"of type {kind.__name__}"  # type: ignore[union-attr]
            raise GigaslideError(f"run.json's config has {f.name} = {v!r}, not {want}", path=run_dir / "run.json",
                                 fix="pass the --out folder of a `gigaslide train-streaming` run, as it wrote it")
        values[f.name] = v
    return TrainConfig(**values)


def _resolve_run_paths(rec: dict[str, Any], cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the relative paths the run was given (a ``--slide-mpp`` CSV, an ``--encoder`` export folder) read
    where training found them -- run.json's ``inputs`` record them resolved: from another working directory they were
    'mpp table not found' / 'unknown encoder'."""
    inputs = rec.get("inputs") if isinstance(rec.get("inputs"), dict) else {}

    def recorded(name: str) -> Path | None:
        fp = inputs.get(name)
        path = fp.get("path") if isinstance(fp, dict) else None
        return Path(path) if isinstance(path, str) and Path(path).exists() else None

    changes: dict[str, Any] = {}
    smpp = recorded("slide_mpp")
    if isinstance(cfg.slide_mpp, str) and not Path(cfg.slide_mpp).is_absolute() and smpp is not None:
        changes["slide_mpp"] = str(smpp)
    weights = recorded("weights")  # an export's weights file: its folder (see cv.weights_input)
    if (cfg.weights in ("default", "random") and not Path(cfg.encoder).is_absolute() and weights is not None
            and (weights.parent / EXPORT_SPEC).is_file()):  # the weights recorded are the --encoder export's
        changes["encoder"] = str(weights.parent)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _checkpoint_classes(rec: dict[str, Any], ckpt: Path) -> int:
    """The number of classes of the checkpoint's head, checked against the run's (run.json ``n_classes`` /
    ``class_names``) and :data:`MAX_CLASSES` from the tensor's shape alone (no data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(ckpt), "pt") as f:
            shape = list(f.get_slice("head.classifier.weight").get_shape()) if "head.classifier.weight" in f.keys() \
                else None
    except (SafetensorError, OSError) as e:
        raise GigaslideError(f"unreadable checkpoint ({str(e).splitlines()[0][:120]})", path=ckpt,
                             fix="pass another --fold, or train the run again into a new --out") from None
    names = rec.get("class_names")
    recorded = rec.get("n_classes") or (len(names) if isinstance(names, list) else None)
    if shape is None:
        return int(recorded) if isinstance(recorded, int) and 2 <= recorded <= MAX_CLASSES else 2
    n = shape[0] if len(shape) == 2 and shape[1] >= 1 else None
    if n is None or not 2 <= n <= MAX_CLASSES or (isinstance(recorded, int) and n != recorded):
        want = (f"[{recorded}, D]: the run has {recorded} classes" if isinstance(recorded, int)
                else f"[C, D] with 2 <= C <= {MAX_CLASSES}")
        raise GigaslideError(f"the checkpoint's classifier (head.classifier.weight) has shape {shape}, not {want}",
                             path=ckpt,
                             fix="use the best.safetensors the run's train-streaming wrote, or pass another --fold")
    return int(n)


def _recorded_normalisation(rec: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the run trained with, from run.json's provenance (``encoder_mean`` / ``encoder_std``); None for a
    run made before they were recorded, or values that are not 3 finite numbers (std > 0)."""
    prov = rec.get("provenance") or {}
    vals = [prov.get("encoder_mean"), prov.get("encoder_std")]
    if not all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             and math.isfinite(x) for x in v) for v in vals):
        return None
    if not all(x > 0 for x in vals[1]):
        return None
    return tuple(float(x) for x in vals[0]), tuple(float(x) for x in vals[1])


def _check_finite(model: Any, probs: np.ndarray, att: torch.Tensor, slide: str | os.PathLike, ckpt: Path,
                  dtype: torch.dtype | None) -> None:
    """Refuse a prediction or attention that is NaN/inf (it was printed as 'P = [nan, nan]' and saved in the grid)."""
    if np.isfinite(probs).all() and bool(torch.isfinite(att.float()).all()):
        return
    bad = nonfinite_weights(model)
    if bad:
        raise GigaslideError(f"the checkpoint holds NaN/inf weights (a diverged or damaged model; {len(bad)} "
                             f"tensor(s), the first: {bad[0]})", path=ckpt,
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
    with runs.isolated_rng():  # the caller's global RNG streams are kept (building the model seeds them)
        return _streaming_heatmap(slide, run, out, fold=fold, thumb_size=thumb_size, device=device,
                                  slide_mpp=slide_mpp, background=background)


def _streaming_heatmap(slide: str | os.PathLike, run: str | os.PathLike, out: str | os.PathLike, *, fold: int,
                       thumb_size: int, device: str, slide_mpp: float | str | None,
                       background: str | None) -> dict[str, Any]:
    from gigaslide.mil.heatmap import draw_heatmap, percentile
    from gigaslide.slides import open_slide

    if background is not None:
        check_background(background)  # before the run's model is built
    model, cfg, _ = load_run_model(run, fold, device)
    ckpt_sha = file_sha256(checkpoint_path(run, fold))  # recorded in the grid: the viewer refuses it once retrained
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
                                                att.shape, probs, size, inst, ckpt_sha)))
    except GigaslideError as e:  # a read-only run folder: the PNG is still made
        err = e.one_line()
    return {"probs": probs.tolist(), "fmap_size": [h, w], "out": str(out), "coords": coords.tolist(),
            "box_level0_px": s * canvas.level0_per_px, "grid": grid, "grid_error": err, "tissue": canvas.tissue}

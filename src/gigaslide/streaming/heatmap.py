"""Attention heatmaps of a trained StreamingCLAM model: the head's attention over feature-map positions.

Each feature-map position covers ``stride`` canvas px = ``stride * mpp / slide_mpp`` level-0 px from
the canvas origin; the attention (as percentiles) is painted on the slide thumbnail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gigaslide.devices import autocast_dtype, pick_device
from gigaslide.errors import GigaslideError
from gigaslide.streaming.data import Normalize, read_canvas
from gigaslide.streaming.train import TrainConfig, _load, build_model


def load_run_model(run: str | os.PathLike, fold: int = 0, device: str = "auto") -> tuple[Any, TrainConfig, int]:
    """The best checkpoint of ``fold`` in a ``train-streaming`` run -> (model, config, n_classes)."""
    run_dir = Path(run)
    cfg_file, ckpt = run_dir / "config.json", run_dir / f"fold{fold}" / "best.safetensors"
    if not cfg_file.is_file() or not ckpt.is_file():
        raise GigaslideError(f"no trained fold {fold} here (config.json / fold{fold}/best.safetensors missing)", path=run_dir,
                             fix="pass the --out folder of a finished `gigaslide train-streaming` run")
    cfg = TrainConfig(**json.loads(cfg_file.read_text())["config"])
    from safetensors.torch import load_file

    sd = load_file(str(ckpt))
    n_classes = int(sd["head.classifier.weight"].shape[0]) if "head.classifier.weight" in sd else 2
    dev = pick_device(device)
    model = build_model(cfg, n_classes, dev)
    _load(model, ckpt)
    model.eval()
    return model, cfg, n_classes


def streaming_heatmap(slide: str | os.PathLike, run: str | os.PathLike, out: str | os.PathLike, *, fold: int = 0,
                      thumb_size: int = 1024, device: str = "auto") -> dict[str, Any]:
    """Predict ``slide`` with a trained run and draw the attention over the feature map on its thumbnail."""
    from scipy.stats import rankdata

    from gigaslide.mil.heatmap import draw_heatmap
    from gigaslide.slides import open_slide

    model, cfg, _ = load_run_model(run, fold, device)
    dev = pick_device(device)
    canvas = read_canvas(slide, cfg.mpp, cfg.image_size, model.stream.stride, slide_mpp=cfg.slide_mpp)
    model.stream.transform = Normalize()
    dtype = autocast_dtype(dev, cfg.precision)
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        res = model(canvas.tensor()[None])
    probs = torch.softmax(res["logits"].float().reshape(-1), 0).cpu().numpy()
    h, w = res["fmap_size"]
    att = res["attention"].float().cpu().numpy().reshape(h, w)
    # positions over padding (beyond the slide content) are not drawn
    s = model.stream.stride
    ch, cw = canvas.content_size
    att = att[: -(-ch // s), : -(-cw // s)]
    coords = canvas.position_coords(att.shape, s)
    with open_slide(slide, mpp=cfg.slide_mpp) as sl:
        thumb, ds = sl.thumbnail(thumb_size)
    title = f"{Path(slide).stem}  StreamingCLAM  P(class {len(probs) - 1}) = {float(probs[-1]):.3f}"
    draw_heatmap(thumb, ds, coords, (rankdata(att.ravel()) - 1) / max(1, att.size - 1), s * canvas.level0_per_px, out, title=title)
    return {"probs": probs.tolist(), "fmap_size": [h, w], "out": str(out)}

"""Running a trained nuclei model: load the exported model, predict NP / HV / NC maps tile by tile
(overlapping windows, only each window's centre kept), and turn them into instances."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from gigaslide import runs
from gigaslide.devices import autocast_ctx
from gigaslide.errors import GigaslideError
from gigaslide.nuclei.model import MODEL_FORMAT, HoVerNet, ModelSpec, ViTPyramid
from gigaslide.nuclei.postprocess import PostParams, instance_types, instances

MODEL_DIR = "model"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / MODEL_JSON).is_file():
        return p
    if (p / MODEL_DIR / MODEL_JSON).is_file():
        return p / MODEL_DIR
    raise GigaslideError("not a nuclei model (no model/model.json)", path=p,
                         fix="pass the --out folder of a finished `gigaslide nuclei-train` run")


def read_spec(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    d = model_dir(path)
    try:
        rec = json.loads((d / MODEL_JSON).read_text())
        if rec.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {rec.get('format')!r}")
        spec = ModelSpec.from_dict(rec["spec"])
        spec.check()
        return spec, rec
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GigaslideError(f"bad nuclei model record ({e})", path=d / MODEL_JSON,
                             fix="re-run `gigaslide nuclei-train` to export the model again") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> HoVerNet:
    """The exported model of a nuclei run (``NUC_RUN`` or ``NUC_RUN/model``), in eval mode. Building the network
    draws its (then overwritten) initial weights from a stream of its own: the caller's torch random stream is left
    as it was."""
    from safetensors.torch import load_file

    spec, _ = read_spec(path)
    d = model_dir(path)
    with runs.isolated_rng():
        model = HoVerNet(spec)
    try:
        sd = load_file(str(d / MODEL_WEIGHTS), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise GigaslideError(f"cannot read model weights ({str(e)[:120]})", path=d / MODEL_WEIGHTS,
                             fix="re-run `gigaslide nuclei-train` to export the model again") from None
    runs.load_module_state(model, sd, d / MODEL_WEIGHTS,
                           fix=f"the weights were trained on another backbone than model.json's "
                               f"'{spec.encoder_spec.name}'; keep model.json and model.safetensors of one run together")
    return model.to(device).eval()


def fixed_window(model: HoVerNet) -> int | None:
    """The window side (px) ``model`` must be run on, or None where any multiple of 32 does: a ViT backbone resizes
    each window to its input size, so it sees nuclei at the size it trained on only in windows of its training crop
    (``spec.crop``; unknown for a model exported before it was recorded)."""
    crop = getattr(model.spec, "crop", None)
    return int(crop) if crop and isinstance(model.encoder, ViTPyramid) else None


def _pad_amounts(n: int, step: int, margin: int) -> tuple[int, int]:
    tiles = max(1, -(-n // step))
    return margin, tiles * step + margin - n


@torch.inference_mode()
def predict_maps(model: HoVerNet, image: np.ndarray, *, tile: int = 512, margin: int = 32, batch_size: int = 4,
                 precision: str = "fp32", pad_mode: str = "reflect",
                 fill: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(NP probability [H, W], HV [2, H, W], NC probabilities [T+1, H, W] or None) of an RGB uint8 image.

    ``pad_mode="constant"`` pads the windows past the image's edge with ``fill`` (255: bright-field glass; a
    fluorescence slide's reader passes 0, its black background). A ViT-backed model runs on windows of its training
    crop whatever ``tile`` is (:func:`fixed_window`; the margin then at most a quarter of it)."""
    h, w = image.shape[:2]
    fixed = fixed_window(model)
    if fixed:
        tile, margin = fixed, min(margin, fixed // 4)
    else:
        tile = min(tile, 32 * -(-(max(h, w) + 2 * margin) // 32))  # a small image needs no larger window
    if tile % 32 or tile <= 2 * margin:
        raise GigaslideError(f"window {tile} px must be a multiple of 32 and larger than twice the margin {margin}")
    dev = next(model.parameters()).device
    step = tile - 2 * margin
    (t, b), (lft, r) = _pad_amounts(h, step, margin), _pad_amounts(w, step, margin)
    kw = {"mode": pad_mode} if pad_mode != "constant" else {"mode": "constant", "constant_values": fill}
    img = np.pad(image, ((t, b), (lft, r), (0, 0)), **kw)
    ny, nx = (img.shape[0] - 2 * margin) // step, (img.shape[1] - 2 * margin) // step
    n_types = model.spec.n_types
    np_out = np.zeros((ny * step, nx * step), np.float32)
    hv_out = np.zeros((2, ny * step, nx * step), np.float32)
    nc_out = np.zeros((n_types + 1, ny * step, nx * step), np.float32) if n_types else None
    pos = [(iy, ix) for iy in range(ny) for ix in range(nx)]
    for s in range(0, len(pos), batch_size):
        chunk = pos[s:s + batch_size]
        x = np.stack([img[iy * step: iy * step + tile, ix * step: ix * step + tile] for iy, ix in chunk])
        xt = torch.from_numpy(x).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        with autocast_ctx(dev, precision):
            out = model(xt)
        c = slice(margin, margin + step)
        npb = out["np"].float().softmax(1)[:, 1, c, c].cpu().numpy()
        hvb = out["hv"].float()[:, :, c, c].cpu().numpy()
        ncb = out["nc"].float().softmax(1)[:, :, c, c].cpu().numpy() if nc_out is not None else None
        if not (np.isfinite(npb).all() and np.isfinite(hvb).all()):  # NaN probabilities are below every threshold:
            # the windows would read as having no nucleus at all, and a whole slide came out empty without a word
            raise GigaslideError(f"the nuclei model's output is not finite (NaN / inf) at precision {precision}",
                                 path=getattr(model, "source", None) or None,
                                 fix="run with --precision fp32; if that fails too the model's weights are broken: "
                                     "train or export it again with `gigaslide nuclei-train`")
        for k, (iy, ix) in enumerate(chunk):
            ys, xs = slice(iy * step, (iy + 1) * step), slice(ix * step, (ix + 1) * step)
            np_out[ys, xs] = npb[k]
            hv_out[:, ys, xs] = hvb[k]
            if nc_out is not None:
                nc_out[:, ys, xs] = ncb[k]
    return np_out[:h, :w], hv_out[:, :h, :w], (nc_out[:, :h, :w] if nc_out is not None else None)


def segment(model: HoVerNet, image: np.ndarray, *, precision: str = "fp32", **kw) -> tuple[np.ndarray, dict, np.ndarray]:
    """(instance map, ``id -> (type, prob)``, NP probability) of an RGB image at the model's mpp."""
    npp, hv, nc = predict_maps(model, image, precision=precision, **kw)
    params = PostParams.from_dict(model.spec.postprocess)
    inst = instances(npp, hv, params)
    return inst, instance_types(inst, nc), npp


__all__ = ["MODEL_DIR", "MODEL_JSON", "MODEL_WEIGHTS", "fixed_window", "load_model", "model_dir", "predict_maps",
           "read_spec", "segment"]

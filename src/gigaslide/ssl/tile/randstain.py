"""RandStainNA-style stain augmentation (Shen et al. 2022): per-image Lab statistics re-drawn from the
training set's own distribution of them.

:func:`lab_statistics` measures, over a sample of training tiles, each tile's mean and standard
deviation of L*, a*, b*, and fits a normal distribution to each of those six numbers across tiles.
:func:`random_lab_transfer` draws a target mean and std per channel from that fit and moves the
image there (Reinhard transfer in Lab), so augmented tiles look like *other tiles of the same
data set* rather than arbitrary colour changes. Only the Lab space of the paper's three is used.
Randomness comes from the ``torch.Generator`` passed in (resume is exact).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch

#: Floor on a channel's std (Lab units) so flat tiles (glass) do not blow up.
_MIN_STD = 1.0


def _lab(img_chw: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.clip(np.moveaxis(img_chw, 0, -1), 0.0, 1.0))


def image_lab_stats(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """[mean L, mean a, mean b, std L, std a, std b] of one image (uint8 HWC, or float CHW in [0, 1])."""
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.dtype == np.uint8:
        a = np.moveaxis(a.astype(np.float64) / 255.0, -1, 0)
    lab = _lab(a.astype(np.float64)).reshape(-1, 3)
    return np.concatenate([lab.mean(0), lab.std(0)])


def lab_statistics(images: Iterable[np.ndarray | torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) across images of the six per-image statistics of :func:`image_lab_stats`."""
    rows = np.stack([image_lab_stats(im) for im in images])
    if len(rows) < 2:
        from gigaslide.errors import GigaslideError

        raise GigaslideError(f"RandStainNA needs the statistics of at least 2 training tiles, got {len(rows)}",
                             fix="use --augment without stain_mode=randstainna, or more tiles")
    return tuple(float(v) for v in rows.mean(0)), tuple(float(v) for v in rows.std(0))


def random_lab_transfer(img: torch.Tensor, g: torch.Generator, stats: tuple[tuple[float, ...], tuple[float, ...]],
                        spread: float = 1.0) -> torch.Tensor:
    """Reinhard transfer of ``img`` (float [3, H, W] in [0, 1]) to Lab mean/std drawn from ``stats``.

    ``spread`` scales the fitted distribution's width (RandStainNA's ``std_hyper``; 0: every image
    goes to the data set's average look, i.e. plain stain normalisation).
    """
    from skimage.color import lab2rgb

    mu, sd = np.asarray(stats[0]), np.asarray(stats[1])
    z = torch.randn(6, generator=g, dtype=torch.float64).numpy()
    target = mu + spread * sd * z
    t_mean, t_std = target[:3], np.maximum(target[3:], _MIN_STD)
    x = img.detach().cpu().double().numpy()
    lab = _lab(x)
    m, s = lab.reshape(-1, 3).mean(0), np.maximum(lab.reshape(-1, 3).std(0), _MIN_STD)
    out = (lab - m) / s * t_std + t_mean
    out[..., 0] = np.clip(out[..., 0], 0.0, 100.0)
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore")
        rgb = lab2rgb(out)
    return torch.from_numpy(np.moveaxis(rgb, -1, 0).copy()).to(img.dtype).clamp(0.0, 1.0)

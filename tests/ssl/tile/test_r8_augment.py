"""Round 8 (mutation testing): the pathology augmentations against independent references -- scikit-image's
Ruifrok & Johnston colour deconvolution for the stain jitter, and the dihedral group's eight elements for the flips
and 90-degree rotations (each drawn with probability 1/8)."""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.color import rgb2hed

from gigaslide.ssl.tile import augment as A

#: skimage's stains are optical density / -ln(1e-6) (its ``separate_stains``); ours are optical density itself
SKIMAGE_SCALE = -math.log(1e-6)


def _hed(img: torch.Tensor) -> np.ndarray:
    """Stain concentrations [H, W, 3] (hematoxylin, eosin, DAB) by scikit-image, in optical-density units."""
    return rgb2hed(img.double().permute(1, 2, 0).numpy()) * SKIMAGE_SCALE


def _pixels(rgb: list[tuple[float, float, float]]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).T.reshape(3, 1, len(rgb))


def test_stain_jitter_scales_and_shifts_skimages_stain_concentrations_of_tissue():
    """Tellez et al.'s HED jitter: for a stained pixel, hed' = alpha * hed + beta in Ruifrok & Johnston's H, E, D
    (skimage.color.rgb2hed), channel by channel -- H in the first channel, not E."""
    tissue = _pixels([(0.45, 0.25, 0.60), (0.80, 0.45, 0.65), (0.70, 0.55, 0.72), (0.55, 0.30, 0.55)])
    h0 = _hed(tissue)
    assert (h0[..., :2] > 0.05).all() and (A.stain_weight(-torch.log(tissue).sum(0)) == 1).all()
    alpha, beta = [1.25, 0.8, 1.0], [0.04, -0.03, 0.0]
    y = A.stain_jitter(tissue, alpha, beta)
    assert ((y > 0.01) & (y < 0.99)).all()  # nothing clipped
    np.testing.assert_allclose(_hed(y), h0 * np.array(alpha) + np.array(beta), atol=2e-4)
    only_h = _hed(A.stain_jitter(tissue, [1.0, 1.0, 1.0], [0.05, 0.0, 0.0])) - h0
    np.testing.assert_allclose(only_h, np.broadcast_to([0.05, 0.0, 0.0], only_h.shape), atol=2e-4)


def test_the_stain_change_fades_from_tissue_to_glass():
    """The change is weighted by the pixel's total optical density: none below 0.2 (glass lighter than 239 grey:
    255 * exp(-0.2 / 3) = 238.6), all of it from 0.6 on, linearly in between (half at 0.4)."""
    def grey(od_sum: float) -> tuple[float, float, float]:
        return (math.exp(-od_sum / 3),) * 3

    px = _pixels([(245 / 255,) * 3, grey(0.19), grey(0.4), grey(0.6)])
    y = A.stain_jitter(px, [1.0, 1.0, 1.0], [0.05, 0.0, 0.0])
    assert torch.equal(y[:, :, :2], px[:, :, :2])  # glass: exactly as it was
    shift = _hed(y) - _hed(px)
    np.testing.assert_allclose(shift[0, 2], [0.025, 0.0, 0.0], atol=2e-4)  # halfway: half the shift
    np.testing.assert_allclose(shift[0, 3], [0.05, 0.0, 0.0], atol=2e-4)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of ``x`` under the square's symmetries: 4 rotations, each with and without a mirror."""
    return [torch.rot90(m, k, dims=(-2, -1)) for m in (x, x.flip(-1)) for k in range(4)]


def _counts(hflip: float, vflip: float, rot90: bool, n: int = 4000) -> list[int]:
    x = torch.arange(9.0).view(1, 3, 3)
    group = _dihedral(x)
    g = torch.Generator().manual_seed(0)
    counts = [0] * 8
    for _ in range(n):
        y = A.random_flip_rotate(x, g, hflip, vflip, rot90)
        counts[next(i for i, t in enumerate(group) if torch.equal(y, t))] += 1
    return counts


def test_flips_and_rotations_draw_each_of_the_eight_orientations_equally_often():
    """Tissue has no 'up' (Kang et al.): the pathology recipe's flips and 90-degree rotations reach each element of the
    dihedral group with probability 1/8 (4000 draws: 500 each, binomial sd 21; +-100 is ~5 sd)."""
    p = A.PRESETS["pathology"]
    counts = _counts(p.hflip, p.vflip, p.rot90)
    assert all(abs(c - 500) < 100 for c in counts), counts


def test_without_rotations_the_vertical_flip_flips_rows():
    """rot90=0: identity, horizontal flip, vertical flip and both (= rotation by 180), a quarter each."""
    counts = _counts(0.5, 0.5, False)
    # group order: rot0, rot90, rot180, rot270, mirror, mirror+rot90, mirror+rot180 (= vertical flip), mirror+rot270
    assert counts[1] == counts[3] == counts[5] == counts[7] == 0
    assert all(abs(counts[i] - 1000) < 120 for i in (0, 2, 4, 6)), counts
    assert _counts(0.0, 1.0, False, n=10)[6] == 10  # always the vertical flip: rows reversed

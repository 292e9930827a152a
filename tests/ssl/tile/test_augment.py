"""Pathology augmentations: stain jitter changes only stain, geometry keeps pixels, recipes match the papers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.ssl.tile import augment as A


def _he_tile(seed: int = 0, size: int = 32) -> torch.Tensor:
    """Synthetic H&E-like tile: pink stroma, purple nuclei, white glass in one corner."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.array([0.92, 0.60, 0.78])  # eosin-ish
    nuclei = rng.random((size, size)) < 0.25
    img[nuclei] = np.array([0.45, 0.25, 0.60])  # hematoxylin-ish
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    img[: size // 4, : size // 4] = 1.0  # glass
    return torch.from_numpy(img.clip(0.01, 1.0)).permute(2, 0, 1).contiguous()


def test_hed_round_trip_is_identity():
    x = _he_tile()
    assert torch.allclose(A.hed_to_rgb(A.rgb_to_hed(x)), x, atol=1e-5)
    assert torch.allclose(A.stain_jitter(x, [1, 1, 1], [0, 0, 0]), x, atol=1e-5)


def test_stain_jitter_keeps_range_and_background():
    x = _he_tile()
    y = A.stain_jitter(x, [1.3, 0.7, 1.2], [0.05, -0.05, 0.05])
    assert y.min() >= 0 and y.max() <= 1 and y.shape == x.shape
    # white glass stays white; a light-grey background pixel moves by < 2 grey levels
    assert torch.allclose(y[:, :8, :8], x[:, :8, :8], atol=1e-6)
    grey = torch.full((3, 4, 4), 240 / 255)
    assert (A.stain_jitter(grey, [1.1, 0.9, 1.1], [0.02, -0.02, 0.02]) - grey).abs().max() < 2 / 255
    # tissue changes
    assert (y[:, 8:, 8:] - x[:, 8:, 8:]).abs().mean() > 0.01


def test_stain_jitter_changes_only_stain_amounts():
    """Optical-density structure is kept: each stain channel is an affine map of the original one."""
    x = _he_tile(1)
    alpha, beta = torch.tensor([1.2, 0.8, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    h0 = A.rgb_to_hed(x.double())
    y = A.stain_jitter(x, alpha, beta)
    h1 = A.rgb_to_hed(y.double())
    # tissue pixels whose jittered colour was not clipped at white
    tissue = (A.stain_weight(-torch.log(x.clamp(min=1e-3)).sum(0)) >= 1) & (y < 1).all(0)
    assert tissue.float().mean() > 0.5
    for c in range(2):  # H and E
        assert torch.allclose(h1[c][tissue], h0[c][tissue] * alpha[c].double(), atol=1e-3)
        r = np.corrcoef(h0[c].flatten(), h1[c].flatten())[0, 1]
        assert r > 0.999
    # hue jitter, by contrast, does not preserve the stain layout as well
    hue = A.TF.adjust_hue(x, 0.1)
    r_hue = np.corrcoef(h0[0].flatten(), A.rgb_to_hed(hue.double())[0].flatten())[0, 1]
    assert r_hue < 0.999


def test_random_stain_jitter_is_seeded():
    x = _he_tile()
    a = A.random_stain_jitter(x, torch.Generator().manual_seed(3))
    b = A.random_stain_jitter(x, torch.Generator().manual_seed(3))
    c = A.random_stain_jitter(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flips_and_rotations_keep_pixels():
    x = _he_tile()
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        y = A.random_flip_rotate(x, g, 0.5, 0.5, True)
        assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
        seen.add(y.numpy().tobytes())
    assert len(seen) >= 5  # the dihedral group has 8 elements


def test_presets_follow_kang_et_al():
    p, i = A.PRESETS["pathology"], A.PRESETS["imagenet"]
    assert p.vflip > 0 and p.rot90 and p.stain > 0 and p.solarize == 0
    assert i.vflip == 0 and not i.rot90 and i.stain == 0
    assert max(p.color_strength) < max(i.color_strength)
    two = A.view_recipes("two", "imagenet", 64)
    assert len(two) == 2 and two[1].solarize > 0
    assert all(v.solarize == 0 for v in A.view_recipes("multicrop", "pathology", 96, n_local=4))


def test_multicrop_views_sizes_and_range():
    recipes = A.view_recipes("multicrop", "pathology", 96, n_local=3, multiple=16)
    views = A.MultiView(recipes)(torch.randint(0, 256, (96, 96, 3), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert len(views) == 5
    assert [tuple(v.shape) for v in views[:2]] == [(3, 96, 96)] * 2
    assert all(v.shape[-1] == 48 and v.shape[-1] % 16 == 0 for v in views[2:])  # ~96/224 of 96, patch multiple
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in views)


def test_unknown_preset_is_a_clear_error():
    from gigaslide.errors import GigaslideError

    with pytest.raises(GigaslideError, match="preset"):
        A.view_recipes("two", "cifar", 64)

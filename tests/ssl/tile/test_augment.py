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


# -- crop sizes that work (Roth et al. / DINOv2 views) -------------------------------------------
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from timm.layers import PatchEmbed  # noqa: E402

from gigaslide.errors import GigaslideError  # noqa: E402


def test_dinov2_views_follow_roth_et_al():
    r = A.view_recipes("dinov2", "pathology", 224, 8, patch=14)
    assert [v.size for v in r] == [224, 224] + [98] * 8
    assert r[0].scale == (0.32, 1.0) and r[2].scale == (0.05, 0.32)
    r = A.view_recipes("dinov2", "imagenet", 112, 2, patch=14, local_size=28, global_scale=(0.5, 1.0))
    assert [v.size for v in r] == [112, 112, 28, 28] and r[0].scale == (0.5, 1.0)
    assert r[0].blur == 1.0 and r[1].solarize == 0.2  # DINOv2's asymmetric global views


def _numbers_after(text: str, marker: str) -> list[int]:
    tail = text.split(marker, 1)[1] if marker in text else ""
    return [int(x) for x in re.findall(r"\d+", tail.split("(")[-1] if "multiples of" in tail else tail)][:6]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patch=st.sampled_from([8, 14, 16]), tile=st.integers(1, 260), local=st.one_of(st.none(), st.integers(1, 260)),
       n_local=st.integers(0, 3), lo=st.floats(-0.2, 1.2), hi=st.floats(-0.2, 1.2))
def test_crop_plan_either_works_for_the_vit_or_says_which_sizes_would(patch, tile, local, n_local, lo, hi):
    """Property over (patch, tile size, local size, crop scales): the views a ViT with that patch gets are
    whole patches (its patch embedding takes them), or the refusal is one line whose proposed sizes work."""
    try:
        recipes = A.view_recipes("dinov2", "pathology", tile, n_local, patch=patch, local_size=local,
                                 global_scale=(lo, 1.0), local_scale=(min(lo, hi), hi))
    except GigaslideError as e:
        msg = e.one_line()
        assert "\n" not in msg and " -- fix: " in msg
        if "--tile-size" in e.fix:
            for t in _numbers_after(e.fix, "use --tile-size"):
                A.plan_crops(t, patch)  # each proposed tile size works
        elif "local size" in e.fix:
            for s in _numbers_after(e.fix, "local size of"):
                A.plan_crops(tile, patch, s, n_local=n_local)
        else:
            assert "0 < min <= max <= 1" in e.what
        return
    pe = PatchEmbed(img_size=tile, patch_size=patch, in_chans=3, embed_dim=4, strict_img_size=False, output_fmt="NHWC")
    assert len(recipes) == 2 + n_local
    for r in recipes:
        assert r.size % patch == 0 and 2 * patch <= r.size <= tile
        assert pe(torch.zeros(1, 3, r.size, r.size)).shape[1:3] == (r.size // patch,) * 2
    assert 0 < lo <= 1 and 0 < min(lo, hi) <= hi <= 1


def test_tiles_smaller_than_the_smallest_crop_are_refused():
    with pytest.raises(GigaslideError, match=r"tiles are 20x30 px, smaller than the smallest crop a patch-14 ViT .* 28 px"):
        A.check_tile_pixels((20, 30, 3), 14, "tiles/")
    A.check_tile_pixels((28, 28, 3), 14)
    A.check_tile_pixels((16, 16, 3), None)


# -- --augment overrides and RandStainNA ---------------------------------------------------------
def test_augment_overrides_switch_single_factors():
    name, ov = A.parse_augment("pathology,stain=0,vflip=0,rot90=false,solarize=0.2,stain_mode=randstainna")
    assert name == "pathology" and ov == {"stain": 0.0, "vflip": 0.0, "rot90": False, "solarize": 0.2, "stain_mode": "randstainna"}
    r = A.view_recipes("two", "pathology,vflip=0,rot90=0", 64)
    assert all(v.vflip == 0 and not v.rot90 and v.stain == A.PRESETS["pathology"].stain for v in r)
    for bad in ("pathology,spin=1", "pathology,stain_mode=macenko", "pathology,vflip=x", "pathology,size=3"):
        with pytest.raises(GigaslideError):
            A.parse_augment(bad)


class _ListSource:
    def __init__(self, imgs):  # noqa: ANN001
        self.imgs = imgs

    def __len__(self) -> int:
        return len(self.imgs)

    def load(self, i, g):  # noqa: ANN001, ANN201
        return self.imgs[i]


def _uint8(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_randstainna_moves_tiles_to_the_training_sets_lab_statistics():
    from gigaslide.ssl.tile.randstain import image_lab_stats

    pale = [_uint8(A.stain_jitter(_he_tile(i), [0.5, 0.5, 1], [0, 0, 0])) for i in range(6)]
    dark = [_uint8(A.stain_jitter(_he_tile(i + 10), [1.6, 1.6, 1], [0, 0, 0])) for i in range(6)]
    views = A.MultiView(A.view_recipes("two", "pathology,stain=1,stain_mode=randstainna,color=0,gray=0,blur=0", 32))
    assert views.needs_fit()
    views.prepare(_ListSource(dark))
    mu, sd = views.recipes[0].lab_stats
    x = A.to_float(torch.from_numpy(pale[0]))
    before = image_lab_stats(x)
    g = torch.Generator().manual_seed(0)
    after = np.mean([image_lab_stats(A.random_lab_transfer(x, g, (mu, sd))) for _ in range(8)], axis=0)
    # lightness mean moves most of the way from the pale tile to the dark training set's
    assert abs(after[0] - mu[0]) < 0.35 * abs(before[0] - mu[0])
    a = A.MultiView(views.recipes)(torch.from_numpy(pale[0]), torch.Generator().manual_seed(1))
    b = A.MultiView(views.recipes)(torch.from_numpy(pale[0]), torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # seeded: resume draws the same views
    with pytest.raises(GigaslideError, match="at least 2"):
        A.MultiView(A.view_recipes("two", "pathology,stain_mode=randstainna", 32)).prepare(_ListSource(dark[:1]))


def test_two_view_recipes_take_the_global_scale_flag():
    default = A.view_recipes("two", "pathology", 96)
    assert [v.scale for v in default] == [A.PRESETS["pathology"].scale] * 2
    wide = A.view_recipes("two", "pathology", 96, global_scale=(0.5, 1.0))
    assert [v.scale for v in wide] == [(0.5, 1.0)] * 2  # both views, not only the multi-crop ones
    with pytest.raises(GigaslideError):
        A.view_recipes("two", "pathology", 96, global_scale=(0.9, 0.5))

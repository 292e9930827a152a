"""Whole-image augmentation under streaming, the streamed trunk + MIL head (gradients vs dense), the
registry-built trunk with its own normalisation, and the streamed max-pool."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaslide.encoders import ENCODERS
from gigaslide.encoders.model import export_encoder
from gigaslide.errors import GigaslideError
from gigaslide.streaming import StreamingCNN
from gigaslide.streaming.data import Augment, AugmentedImage, Normalize
from gigaslide.streaming.head import StreamingMIL, build_trunk

from .conftest import narrow_resnet
from .test_stream_exact import rel

IMAGENET = ENCODERS.get("resnet18")


def test_augment_and_normalize_are_exact_under_streaming() -> None:
    trunk = narrow_resnet("resnet18", seed=2)
    aug = Augment.draw(np.random.default_rng(3))
    img = torch.randint(0, 256, (3, 590, 530), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = aug.geometric(img)[None]
    norm = Normalize(IMAGENET.mean, IMAGENET.std, aug)
    stream = StreamingCNN(trunk, 512, transform=norm)
    with torch.no_grad():
        ref = trunk(norm(x))
        assert rel(stream(x), ref) <= 1e-4
        assert rel(stream(AugmentedImage(img, aug)), ref) <= 1e-4  # per-crop augmentation: same map


@pytest.mark.parametrize(("flip", "rot"), list(itertools.product([False, True], range(4))))
def test_augmented_image_crops_equal_crops_of_the_augmented_image(flip: bool, rot: int) -> None:
    img = torch.arange(2 * 7 * 11, dtype=torch.int32).view(1, 2, 7, 11)
    aug = Augment(flip=flip, rot90=rot)
    full, src = aug.geometric(img), AugmentedImage(img, aug)
    assert tuple(src.shape) == tuple(full.shape)
    for rows, cols in [(slice(0, 3), slice(1, 5)), (slice(2, full.shape[-2]), slice(0, full.shape[-1])), (slice(4, 5), slice(3, 4))]:
        assert torch.equal(src.crop(rows, cols), full[..., rows, cols])


def test_streaming_mil_head_gradients_match_dense() -> None:
    trunk = narrow_resnet("resnet18", seed=4, width=8)
    model = StreamingMIL(StreamingCNN(trunk, 512), "clam_sb", 2).eval()
    x = torch.randn(1, 3, 620, 560, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out["logits"][1].backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("stream.trunk.") for n in g)
    model.zero_grad(set_to_none=True)
    fmap = trunk(x)
    ref = model.head(fmap[0].flatten(1).T)
    ref["logits"][1].backward()
    assert out["fmap_size"] == (20, 18) and out["attention"].shape == (360,)
    assert torch.allclose(out["logits"], ref["logits"], atol=1e-5)
    # (the attention's output bias has an exactly-zero gradient: softmax ignores it; only noise is compared there)
    worst = max(float((g[n] - p.grad).abs().max() / p.grad.abs().max())
                for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6)
    assert worst <= 1e-4


@pytest.mark.parametrize(("k", "size"), [(4, (29 * 32, 23 * 32)), (3, (700, 650)), (8, (300, 200))])
def test_pooled_streaming_equals_dense_max_pool_and_its_gradients(k: int, size: tuple[int, int]) -> None:
    """Pool each tile's output as produced == max_pool2d(trunk(x), k, ceil_mode=True) of the whole map, in
    output and gradients; (k=3: the map (22x21) is not divisible by k -- the last window pools what exists;
    k=8 on a 300x200 image: smaller than one tile, a single dense pass)."""
    trunk = narrow_resnet("resnet18", seed=6)
    tile = StreamingCNN(trunk, 4096, pool_kernel=k).min_tile_size + 32
    stream = StreamingCNN(trunk, tile, pool_kernel=k)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(5))
    dense = trunk(x)
    ref = F.max_pool2d(dense, k, k, ceil_mode=True)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
    (ref * w).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad(set_to_none=True)
    out = stream(x)
    (out * w).sum().backward()
    assert out.shape == ref.shape == (1, dense.shape[1], -(-dense.shape[2] // k), -(-dense.shape[3] // k))
    if size[0] > tile:
        assert len(stream.tiles(size)) >= 4
        assert all(t.rows.out_start % k == 0 and t.cols.out_start % k == 0 for t in stream.tiles(size))
    assert rel(out, ref) <= 1e-5
    assert max(rel(p.grad, g_ref[n]) for n, p in trunk.named_parameters()) <= 1e-4
    assert stream.out_stride == 32 * k


def test_pool_kernel_must_be_a_positive_integer() -> None:
    for bad in (0, -2, 2.5, True):
        with pytest.raises(GigaslideError, match="pool kernel"):
            StreamingCNN(narrow_resnet("resnet18"), 1024, pool_kernel=bad)
    with pytest.raises(GigaslideError, match=r"minimum 704 px.*pool kernel 8"):
        StreamingCNN(narrow_resnet("resnet18"), 512, pool_kernel=8)


def test_trunk_from_the_registry_and_export_with_its_own_normalisation(tmp_path) -> None:  # noqa: ANN001
    src, spec, _ = build_trunk("resnet18", "random")
    assert spec.mean == IMAGENET.mean
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    mine = dataclasses.replace(ENCODERS.get("resnet18"), name="resnet18_mine", mean=(0.7, 0.5, 0.6), std=(0.2, 0.25, 0.2))
    export_encoder(tmp_path / "encoder", src, mine)
    for loaded, lspec, wid in (build_trunk(str(tmp_path / "encoder")), build_trunk("resnet18", str(tmp_path / "encoder"))):
        assert lspec.mean == (0.7, 0.5, 0.6) and lspec.std == (0.2, 0.25, 0.2) and wid.startswith("sha256:")
        for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
        assert loaded(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)  # a feature map: no global pool
    with pytest.raises(GigaslideError, match="is a resnet18, not a resnet34"):
        build_trunk("resnet34", str(tmp_path / "encoder"))
    # the normalisation really is the export's: the same crop normalises differently
    crop = torch.full((1, 3, 4, 4), 200, dtype=torch.uint8)
    assert not torch.allclose(Normalize(mine.mean, mine.std)(crop), Normalize(IMAGENET.mean, IMAGENET.std)(crop))
    assert float(Normalize(mine.mean, mine.std)(crop)[0, 0, 0, 0]) == pytest.approx((200 / 255 - 0.7) / 0.2, rel=1e-5)


def test_trunk_refuses_an_encoder_that_cannot_be_streamed() -> None:
    with pytest.raises(GigaslideError, match="unknown encoder 'no_such_net'"):
        build_trunk("no_such_net", "random")
    trunk, _, _ = build_trunk("resnet50_trunc", "random")
    with pytest.raises(GigaslideError, match=r"trunk layer 'mean' \(tensor.mean\(\)\) cannot be streamed"):
        StreamingCNN(trunk, 1024)


def test_the_bag_stays_in_the_trunks_dtype_under_autocast() -> None:
    """bf16 autocast: the head gets the (pooled) map as a bf16 view, not a float32 copy."""
    trunk = narrow_resnet("resnet18", seed=1)
    model = StreamingMIL(StreamingCNN(trunk, 512, pool_kernel=2), "abmil", 2).eval()
    seen = []
    model.head.fc[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 600, 600))
    assert seen == [torch.bfloat16] and out["fmap_size"] == (10, 10)


def test_grid_folds_take_a_slide_id_literally_not_as_a_glob_pattern(tmp_path):
    from gigaslide.streaming.grids import AttentionGrid, grid_folds, save_grid

    save_grid(tmp_path, AttentionGrid("case[1]", 0, np.zeros((1, 2)), [1.0], 100, (1, 1), [.5, .5], (10, 10)))
    save_grid(tmp_path, AttentionGrid("case2", 3, np.zeros((1, 2)), [1.0], 100, (1, 1), [.5, .5], (10, 10)))
    assert grid_folds(tmp_path, "case[1]") == [0]
    assert grid_folds(tmp_path, "case[12]") == []


class _ConcatTrunk(torch.nn.Module):
    """DenseNet-like: the feature map concatenates channels, so it is wider than the last convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 6, 3, 2, 1)
        self.b = torch.nn.Conv2d(6, 4, 3, 2, 1)
        self.pool = torch.nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.a(x)))
        return torch.cat([self.pool(h), self.b(h)], 1)


def test_head_input_is_the_feature_maps_width_for_a_concatenating_trunk() -> None:
    torch.manual_seed(0)
    trunk = _ConcatTrunk().eval()
    model = StreamingMIL(StreamingCNN(trunk, 64), "clam_sb", 2).eval()
    x = torch.randn(1, 3, 160, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        ref = model.head(trunk(x)[0].flatten(1).T)
    assert trunk(x).shape[1] == 10 and out["fmap_size"] == (20, 16)
    assert torch.allclose(out["logits"], ref["logits"], atol=1e-6)

"""Receptive-field geometry and clear refusals for what cannot be streamed exactly."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.streaming import StreamingCNN, trace
from gigaslide.streaming.tiles import plan_axis

from .conftest import narrow_resnet


@pytest.mark.parametrize("name,field", [("resnet18", 435), ("resnet34", 899), ("resnet50", 427)])
def test_resnet_receptive_fields(name: str, field: int) -> None:
    g = trace(narrow_resnet(name))
    assert g.stride == (32, 32)
    assert g.field == (field, field)
    assert g.axes[0].lo == -(field // 2)
    assert g.output_size((225, 224)) == (8, 7)


def test_full_timm_model_traces_and_matches_output_size() -> None:
    m = timm.create_model("resnet34", pretrained=False, num_classes=0, global_pool="").eval()
    g = trace(m)
    with torch.no_grad():
        out = m(torch.zeros(1, 3, 97, 131))
    assert g.output_size((97, 131)) == tuple(out.shape[-2:])


def test_plan_covers_every_output_once() -> None:
    g = trace(narrow_resnet("resnet18"))
    for n in (480, 481, 999, 2050):
        n_out = g.output_size((n, n))[0]
        spans = plan_axis(n, 512, g.axes[0], n_out)
        covered = [j for s in spans for j in range(s.out_start, s.out_stop)]
        assert covered == list(range(n_out))
        assert all(s.start % 32 == 0 and s.stop - s.start <= 512 for s in spans)


def test_refuses_batchnorm_in_train_mode() -> None:
    trunk = narrow_resnet("resnet18").train()
    with pytest.raises(GigaslideError, match=r"'bn1'.*train mode.*fix: call trunk.eval\(\)"):
        StreamingCNN(trunk, tile_size=512)


def test_refuses_batchnorm_switched_to_train_later() -> None:
    trunk = narrow_resnet("resnet18")
    stream = StreamingCNN(trunk, tile_size=512)
    stream.train()  # wrapper train mode keeps the trunk frozen
    assert not trunk.bn1.training
    trunk.layer1[0].bn2.train()
    with pytest.raises(GigaslideError, match=r"layer1\.0\.bn2"):
        stream(torch.zeros(1, 3, 600, 600))


def test_refuses_global_pooling_inside_trunk() -> None:
    m = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()  # keeps global_pool
    with pytest.raises(GigaslideError, match=r"'global_pool.pool' \(AdaptiveAvgPool2d\)"):
        StreamingCNN(m, tile_size=1024)


def test_refuses_linear_and_flatten() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(GigaslideError, match=r"'1' \(Flatten\)"):
        StreamingCNN(trunk, tile_size=64)


def test_refuses_tile_below_minimum() -> None:
    with pytest.raises(GigaslideError, match=r"tile size 256 px is smaller than this trunk's minimum 960 px.*receptive field 899"):
        StreamingCNN(narrow_resnet("resnet34"), tile_size=256)


def test_refuses_image_too_small_and_single_tile_when_asked() -> None:
    valid_conv = StreamingCNN(nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU()).eval(), tile_size=64)
    with pytest.raises(GigaslideError, match="image 3x200 px is too small for this trunk"):
        valid_conv(torch.zeros(1, 3, 3, 200))
    stream = StreamingCNN(narrow_resnet("resnet18"), tile_size=512, small_image="error")
    with pytest.raises(GigaslideError, match="fits in one tile"):
        stream(torch.zeros(1, 3, 300, 300))
    with pytest.raises(GigaslideError, match=r"\[B, C, H, W\]"):
        stream(torch.zeros(3, 300, 300))


def test_refuses_circular_padding_and_streams_reflect_padding_exactly() -> None:
    """Circular padding wraps the opposite image edge in (no crop sees it): refused, not streamed wrongly.
    Reflect / replicate padding only looks inward from the image edge: streamed exactly."""
    x = torch.randn(1, 3, 77, 53, generator=torch.Generator().manual_seed(0))
    for mode in ("circular", "reflect", "replicate"):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 2, padding_mode=mode), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, 2, 1, padding_mode=mode), nn.Conv2d(4, 4, 3, 2, 1)).eval()
        if mode == "circular":
            with pytest.raises(GigaslideError, match=r"layer '0' \(Conv2d\) uses padding_mode='circular'.*fix:"):
                StreamingCNN(trunk, tile_size=24)
            continue
        stream = StreamingCNN(trunk, tile_size=24)
        assert len(stream.tiles((77, 53))) >= 9
        with torch.no_grad():
            ref = trunk(x)
            assert float((stream(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_refuses_functional_pooling_naming_the_module_to_use() -> None:
    """F.max_pool2d / F.conv2d / F.pad have no module to read the window from: the fix names the module, not
    'remove global pooling'."""

    class FunctionalPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.max_pool2d(self.conv(x), 2)

    with pytest.raises(GigaslideError, match=r"'max_pool2d' calls max_pool2d\(\) as a function.*"
                                             r"fix: use an nn\.MaxPool2d module in the trunk instead$"):
        StreamingCNN(FunctionalPool().eval(), tile_size=64)


def test_refuses_timm_drop_path_in_train_mode() -> None:
    """timm's DropPath draws a new mask per call: per crop, and again in the backward re-computation."""
    from timm.layers import DropPath

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.drop = nn.Conv2d(4, 4, 3, 1, 1), DropPath(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.conv(x))

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), Block(), nn.Conv2d(4, 4, 3, 2, 1)).eval()
    stream = StreamingCNN(trunk, tile_size=24)
    trunk.train()
    with pytest.raises(GigaslideError, match=r"'1\.drop' \(DropPath\) is active dropout.*fix: call trunk.eval\(\)"):
        stream(torch.zeros(1, 3, 77, 53))
    trunk.eval()
    assert stream(torch.zeros(1, 3, 77, 53)).shape == (1, 4, 20, 14)

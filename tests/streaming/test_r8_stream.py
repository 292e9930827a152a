"""Review round 8 (mutation testing): the streamed trunk's geometry, precision and refusals where a slip would pass the
exactness tests' sizes -- each against torch itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.streaming import StreamingCNN, trace

from .conftest import narrow_resnet


@pytest.mark.parametrize("k,s,p", [(3, 3, 1), (2, 2, 1), (3, 2, 1), (5, 3, 2), (4, 4, 2)])
def test_output_size_equals_torchs_for_ceil_mode_pools_at_every_size(k: int, s: int, p: int) -> None:
    """ceil_mode drops a last window that would start in the right padding: (out - 1) * s >= n + p (torch's rule;
    e.g. k=3, s=3, p=1, n=5: 2 positions, not 3). Checked against torch's own output for n = 1 .. 60."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 1, 1), nn.MaxPool2d(k, s, p, ceil_mode=True), nn.Conv2d(1, 1, 1),
                          nn.AvgPool2d(k, s, p, ceil_mode=True)).eval()
    g = trace(trunk)
    sizes = [n for n in range(1, 61) if n + 2 * p >= k]
    with torch.no_grad():
        for n in sizes:
            want = tuple(trunk(torch.zeros(1, 1, n, 7 + n % 3 + 2 * p)).shape[-2:])
            assert g.output_size((n, 7 + n % 3 + 2 * p)) == want, n
    if (k, s, p) == (3, 3, 1):  # by hand: 5 -> max-pool windows at -1, 2 (one at 5 starts in the padding) -> 2
        assert g.output_size((5, 5)) == (1, 1)  # -> avg-pool windows at -1 (one at 2 starts in the padding) -> 1


def test_backward_recomputes_each_crop_in_the_forwards_autocast_precision() -> None:
    """Under bf16 autocast the forward runs the trunk in bf16; the backward re-runs each crop -- in bf16 too, so the
    gradient is that of the function computed (an fp32 re-run differentiates another function)."""
    trunk = narrow_resnet("resnet18", width=2)
    tile = StreamingCNN(trunk, tile_size=4096).min_tile_size + 32
    stream = StreamingCNN(trunk, tile_size=tile)
    x = torch.randn(1, 3, tile + 64, tile, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[bool, torch.dtype]] = []
    hook = trunk.conv1.register_forward_hook(lambda _m, _i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stream(x)
        out.float().square().sum().backward()
    finally:
        hook.remove()
    n = len(stream.tiles(tuple(x.shape[-2:])))
    assert n >= 2 and len(seen) == 2 * n
    assert seen == [(False, torch.bfloat16)] * n + [(True, torch.bfloat16)] * n
    assert trunk.conv1.weight.grad is not None


def test_refuses_batchnorm_without_running_statistics() -> None:
    """BatchNorm with track_running_stats=False normalises with the batch's (here: the crop's) statistics even in eval
    mode: each tile would be normalised differently from the whole image -- refused, naming the layer."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, 2, 1)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # why: the statistics of a crop are not the whole image's
        assert not torch.allclose(trunk(x)[..., :4, :4], trunk(x[..., :32, :32])[..., :4, :4], atol=1e-3)
    with pytest.raises(GigaslideError, match=r"trunk layer '1' \(BatchNorm2d\).*batch statistics.*fix: "):
        StreamingCNN(trunk, tile_size=32)


def test_pooled_tile_plan_keeps_every_whole_window_a_crop_computes_exactly() -> None:
    """One 3x3 convolution (stride 1, field 3), crops of 8 px, pool kernel 2, a 20 px axis -- by hand: crop [0, 8)
    computes outputs 0..6 exactly (output 0 at the image edge pads as the image does; 7 needs px 8), cut to whole
    windows 0..5; crop [5, 13) outputs 6..11 (11 needs px 12; 12 would need px 13); [11, 19) 12..17; [17, 20) the
    image end, 18..19. A plan that dropped a window it could keep (6..9) needs more crops for the same map."""
    from gigaslide.streaming.tiles import Span, plan_axis

    g = trace(nn.Sequential(nn.Conv2d(1, 1, 3, 1, 1)).eval())
    assert plan_axis(20, 8, g.axes[0], 20, align=2) == [Span(0, 8, 0, 6), Span(5, 13, 6, 12), Span(11, 19, 12, 18),
                                                        Span(17, 20, 18, 20)]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_the_minimum_tile_size_streams_a_pooled_map_exactly(k: int) -> None:
    """--tile-size at the minimum the error message names works (with the pool kernel): the pooled map equals
    max_pool2d(trunk(x), k, ceil_mode=True) on a canvas of several tiles."""
    import torch.nn.functional as F

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, 2, 1)).eval()
    torch.manual_seed(k)
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight)
    tile = StreamingCNN(trunk, 4096, pool_kernel=k).min_tile_size
    stream = StreamingCNN(trunk, tile, pool_kernel=k)
    x = torch.randn(1, 3, 5 * tile + 7, 3 * tile + 5, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        ref = F.max_pool2d(trunk(x), k, k, ceil_mode=True)
        out = stream(x)
    assert len(stream.tiles(tuple(x.shape[-2:]))) >= 12
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())

"""StreamingCNN output and gradients equal the whole-image pass (fp32, max relative error <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from gigaslide.streaming import StreamingCNN

from .conftest import narrow_resnet

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def dense_and_streamed(trunk: torch.nn.Module, x: torch.Tensor, tile: int, input_grad: bool = False):
    x = x.clone().requires_grad_(input_grad)
    ref = trunk(x)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    (ref * w).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    xg_ref = x.grad.clone() if input_grad else None
    trunk.zero_grad(set_to_none=True)
    x.grad = None
    stream = StreamingCNN(trunk, tile_size=tile)
    out = stream(x)
    (out * w).sum().backward()
    g = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad(set_to_none=True)
    return stream, out, ref, g, g_ref, (x.grad if input_grad else None), xg_ref


@pytest.mark.parametrize("name,extra_h,extra_w", [("resnet18", 37, 161), ("resnet34", 61, 29), ("resnet50", 13, 139)])
def test_output_and_gradients_match_dense(name: str, extra_h: int, extra_w: int) -> None:
    trunk = narrow_resnet(name, width=2 if name == "resnet34" else 4)
    probe = StreamingCNN(trunk, tile_size=4096)
    tile = probe.min_tile_size + (45 if name == "resnet50" else 64)  # few exact outputs per tile: many seams
    # (45: a tile that is not a multiple of the stride)
    size = (tile + extra_h, tile + extra_w)  # odd sizes, not divisible by the tile or the stride
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    stream, out, ref, g, g_ref, _, _ = dense_and_streamed(trunk, x, tile)
    assert len(stream.tiles(size)) >= 4
    assert out.shape == ref.shape
    assert rel(out, ref) <= TOL
    worst = max(rel(g[n], g_ref[n]) for n in g_ref)
    assert worst <= TOL, worst


def test_checkpointed_blocks_give_the_same_gradients() -> None:
    """Activation checkpointing per block (lower memory) changes neither output nor gradients."""
    trunk = narrow_resnet("resnet18", width=4)
    tile = StreamingCNN(trunk, tile_size=4096).min_tile_size + 64
    x = torch.randn(1, 3, tile + 40, tile + 90, generator=torch.Generator().manual_seed(2))
    _, out_a, _, g_a, _, _, _ = dense_and_streamed(trunk, x, tile)
    stream = StreamingCNN(trunk, tile_size=tile, checkpoint_blocks=True)
    w = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(7))
    out_b = stream(x)
    (out_b * w).sum().backward()
    assert sum(getattr(m, "_gigaslide_ckpt", False) for m in trunk.modules()) == 8  # 4 stages x 2 basic blocks
    assert rel(out_b, out_a) <= TOL
    assert max(rel(p.grad, g_a[n]) for n, p in trunk.named_parameters()) <= TOL
    assert {n for n, _ in trunk.named_parameters()} == set(g_a)  # parameter names unchanged
    # the stem (conv1 -> bn1 -> act1 -> maxpool) runs as one checkpointed segment of the same modules
    assert [type(m).__name__ for m in stream._runner._gigaslide_stem.chain] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert set(stream.state_dict()) == {f"trunk.{k}" for k in trunk.state_dict()}  # listed once, trunk names


def test_stem_checkpoint_skips_trunks_without_a_stem() -> None:
    from gigaslide.streaming.stream import _checkpoint_stem

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    assert _checkpoint_stem(plain) is None  # the trunk is itself one Sequential: nothing before a stage


def test_trim_memory_returns_freed_buffers_to_the_os() -> None:
    """In a fresh process (the allocator setting is process-wide): glibc accepts the setting, and
    buffers of 16 MB freed under small long-lived tensors go back to the OS at once. (The effect on a
    whole streamed backward pass, -1.1 GB peak RSS at 4096², is measured in benchmarks/.)"""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = """
import torch
from gigaslide.streaming.stream import trim_freed_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
assert trim_freed_memory()
big, pins = [], []
for _ in range(4):
    big.append(torch.ones(16 * 2**20 // 4))
    pins.append(torch.ones(256))
before = rss()
del big
print(before - rss())
"""
    freed = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert freed > 60e6, freed  # all 64 MB returned


def test_trim_memory_keeps_results() -> None:
    trunk = narrow_resnet("resnet18", width=4)
    tile = StreamingCNN(trunk, tile_size=4096).min_tile_size + 64
    x = torch.randn(1, 3, tile + 40, tile + 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = trunk(x)
        out = StreamingCNN(trunk, tile_size=tile, checkpoint_blocks=True, trim_memory=True)(x)
    assert rel(out, ref) <= TOL


def test_stem_checkpoint_of_a_sequential_wrapped_torchvision_resnet() -> None:
    """The usual `nn.Sequential(*list(resnet.children())[:-2])` trunk also gets its stem checkpointed."""
    import torchvision

    from gigaslide.streaming.stream import _checkpoint_stem

    rn = torchvision.models.resnet18(weights=None).eval()
    trunk = torch.nn.Sequential(*list(rn.children())[:-2])
    runner = _checkpoint_stem(trunk)
    assert runner is not None and len(runner._gigaslide_stem.chain) == 4
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert rel(runner(x), trunk(x)) <= TOL


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_no_whole_image_activation_is_ever_held(checkpoint_blocks: bool) -> None:
    """Structural memory check (no timing): in forward and backward every trunk call sees one crop, and
    nothing saved for backward is larger than one crop's largest activation (only the input image itself)."""
    trunk = narrow_resnet("resnet18", width=2)
    tile = StreamingCNN(trunk, tile_size=4096, pool_kernel=2).min_tile_size + 32
    stream = StreamingCNN(trunk, tile_size=tile, pool_kernel=2, checkpoint_blocks=checkpoint_blocks)
    x = torch.randn(1, 3, 2 * tile + 17, tile + 45, generator=torch.Generator().manual_seed(4), requires_grad=True)
    conv1_out: list[tuple[int, ...]] = []
    hook = trunk.conv1.register_forward_hook(lambda _m, _i, o: conv1_out.append(tuple(o.shape[-2:])))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is not x:
            saved.append(t.numel())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = stream(x)
            out.square().sum().backward()
    finally:
        hook.remove()
    n_tiles = len(stream.tiles(tuple(x.shape[-2:])))
    # each crop once in forward, once in backward (and once more for the checkpointed stem's recomputation)
    assert len(conv1_out) == (3 if checkpoint_blocks else 2) * n_tiles
    crop_conv1 = trunk.conv1.out_channels * (tile // 2) ** 2  # the largest activation of one crop
    assert max(h * w for h, w in conv1_out) <= (tile // 2) ** 2
    assert saved and max(saved) <= crop_conv1 < trunk.conv1.out_channels * (x.shape[-2] // 2) * (x.shape[-1] // 2) // 2
    assert x.grad is not None and out.shape[-2:] == stream.output_size(tuple(x.shape[-2:]))


def _odd_trunk(kind: str) -> torch.nn.Module:
    nn = torch.nn
    torch.manual_seed(0)
    layers = {
        "dilated": [nn.Conv2d(3, 4, 3, 1, 2, dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1),
                    nn.Conv2d(4, 4, 3, 1, 3, dilation=3)],
        "even_kernel_asym": [nn.Conv2d(3, 4, (4, 3), (2, 1), (1, 0)), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3, 2, 1)],
        "ceil_pools": [nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(4, 4, 3, 1, 1),
                       nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.Conv2d(4, 4, 1)],
        "stride3_pad_gt_kernel": [nn.Conv2d(3, 4, 3, 3, 0), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 4)],
    }[kind]
    m = nn.Sequential(*layers)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("kind", ["dilated", "even_kernel_asym", "ceil_pools", "stride3_pad_gt_kernel"])
@pytest.mark.parametrize("size", [(77, 53), (33, 100)])
def test_strides_paddings_dilations_and_ceil_mode_stream_exactly(kind: str, size: tuple[int, int]) -> None:
    """Small trunks with the window options of the supported layers, canvases that are multiples of neither
    the tile nor the stride: output, parameter and input gradients equal the whole-image pass."""
    trunk = _odd_trunk(kind)
    tile = StreamingCNN(trunk, tile_size=4096).min_tile_size + 3  # not a multiple of the stride
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    stream, out, ref, g, g_ref, xg, xg_ref = dense_and_streamed(trunk, x, tile, input_grad=True)
    assert len(stream.tiles(size)) >= 6
    assert out.shape == ref.shape and rel(out, ref) <= 1e-5
    assert max(rel(g[n], g_ref[n]) for n in g_ref) <= 1e-5
    assert xg is not None and rel(xg, xg_ref) <= 1e-5

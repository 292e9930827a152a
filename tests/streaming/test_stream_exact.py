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

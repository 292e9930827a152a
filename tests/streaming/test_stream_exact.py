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

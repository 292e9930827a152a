"""StreamingCNN API: input gradients, batches, torchvision trunks, frozen layers, transforms, small images."""

from __future__ import annotations

import pytest
import torch

from gigaslide.streaming import StreamingCNN

from .conftest import narrow_resnet
from .test_stream_exact import dense_and_streamed, rel

TOL = 1e-4


def test_input_gradient_and_batch() -> None:
    trunk = narrow_resnet("resnet18", seed=3)
    tile = StreamingCNN(trunk, tile_size=4096).min_tile_size + 32
    x = torch.randn(2, 3, tile + 45, 301, generator=torch.Generator().manual_seed(2))
    _, out, ref, g, g_ref, xg, xg_ref = dense_and_streamed(trunk, x, tile, input_grad=True)
    assert rel(out, ref) <= TOL
    assert max(rel(g[n], g_ref[n]) for n in g_ref) <= TOL
    assert xg is not None and rel(xg, xg_ref) <= TOL


def test_torchvision_trunk_and_frozen_params() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    trunk = torch.nn.Sequential(*list(model.children())[:-2]).eval()
    for p in trunk[:6].parameters():  # stem + layer1 + layer2 frozen
        p.requires_grad_(False)
    stream = StreamingCNN(trunk, tile_size=480)
    x = torch.randn(1, 3, 530, 300, generator=torch.Generator().manual_seed(4))
    ref = trunk(x)
    ref.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in trunk.named_parameters() if p.requires_grad}
    trunk.zero_grad(set_to_none=True)
    out = stream(x)
    out.square().mean().backward()
    assert rel(out, ref) <= TOL
    assert all(p.grad is None for p in trunk[:6].parameters())
    assert max(rel(p.grad, g_ref[n]) for n, p in trunk.named_parameters() if p.requires_grad) <= TOL


def test_no_grad_forward_and_transform() -> None:
    trunk = narrow_resnet("resnet18", seed=5)
    mean = torch.tensor([0.5, 0.4, 0.6]).view(1, 3, 1, 1)
    stream = StreamingCNN(trunk, tile_size=544, transform=lambda u: (u.float() / 255 - mean) / 0.2,
                          channels_last=True)
    img = torch.randint(0, 256, (1, 3, 700, 650), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = trunk((img.float() / 255 - mean) / 0.2)
        out = stream(img)
    assert rel(out, ref) <= TOL


def test_small_image_runs_dense() -> None:
    trunk = narrow_resnet("resnet18")
    stream = StreamingCNN(trunk, tile_size=512)
    x = torch.randn(1, 3, 200, 300, generator=torch.Generator().manual_seed(0))
    assert len(stream.tiles((200, 300))) == 1
    with torch.no_grad():
        assert rel(stream(x), trunk(x)) <= 1e-6


def test_backward_uses_the_transform_of_its_own_forward() -> None:
    """Two forwards with different transforms (e.g. two slides' augmentations), one backward: each graph
    re-runs its crops with the transform it was computed with, as the whole-image pass does."""
    trunk = narrow_resnet("resnet18", width=2)
    x = torch.randn(1, 3, 600, 560, generator=torch.Generator().manual_seed(0))

    def ta(u: torch.Tensor) -> torch.Tensor:
        return u * 2.0

    def tb(u: torch.Tensor) -> torch.Tensor:
        return u - 0.5

    (trunk(ta(x)).sum() + trunk(tb(x)).square().mean()).backward()
    g_ref = {n: p.grad.clone() for n, p in trunk.named_parameters()}
    trunk.zero_grad(set_to_none=True)
    stream = StreamingCNN(trunk, 512)
    assert len(stream.tiles((600, 560))) == 4
    stream.transform = ta
    loss_a = stream(x).sum()
    stream.transform = tb
    loss_b = stream(x).square().mean()
    (loss_a + loss_b).backward()
    assert max(rel(p.grad, g_ref[n]) for n, p in trunk.named_parameters()) <= TOL

"""Shared helpers for the streaming tests: narrow ResNets with the real ResNet-18/34/50 geometry."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def narrow_resnet(name: str, seed: int = 0, width: int = 4) -> torch.nn.Module:
    """A timm ResNet with ``name``'s layers, strides, padding and pooling but few channels (fast tests).

    BatchNorm statistics and affine parameters are randomised so frozen BN is not the identity.
    """
    block, layers = ARCHS[name]
    torch.manual_seed(seed)
    m = ResNet(block, layers, channels=tuple(width * 2**i for i in range(4)), stem_width=width, num_classes=0,
               global_pool="", zero_init_last=False)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return m.eval()



def labelled_slides(d: Path, n: int, size: tuple[int, int] = (1024, 768), **slide_kw) -> Path:
    """``n`` generated slides ``s0..`` in ``d`` (one or two tissue blobs, label = i % 2) and ``d/labels.csv``."""
    from gigaslide.testing import make_slide

    rows = ["slide_id,label"]
    for i in range(n):
        make_slide(d / f"s{i}.tif", size, mpp=0.5, seed=i, blobs=1 + i % 2, **slide_kw)
        rows.append(f"s{i},{i % 2}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d

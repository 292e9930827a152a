"""Whole-image augmentation under streaming, and the streamed trunk + MIL head (gradients vs dense)."""

from __future__ import annotations

import numpy as np
import torch

from gigaslide.streaming import StreamingCNN
from gigaslide.streaming.data import Augment, Normalize
from gigaslide.streaming.head import StreamingMIL

from .conftest import narrow_resnet


def test_augment_and_normalize_are_exact_under_streaming() -> None:
    trunk = narrow_resnet("resnet18", seed=2)
    aug = Augment.draw(np.random.default_rng(3))
    img = torch.randint(0, 256, (3, 590, 530), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = aug.geometric(img)[None]
    norm = Normalize(aug)
    stream = StreamingCNN(trunk, 512, transform=norm)
    with torch.no_grad():
        assert torch.allclose(stream(x), trunk(norm(x)), rtol=0, atol=1e-4 * trunk(norm(x)).abs().max())


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


def test_build_trunk_loads_an_exported_encoder_folder(tmp_path) -> None:
    import dataclasses

    import pytest

    from gigaslide.encoders import ENCODERS
    from gigaslide.encoders.model import export_encoder
    from gigaslide.errors import GigaslideError
    from gigaslide.streaming.head import build_trunk

    src = build_trunk("resnet18")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    export_encoder(tmp_path / "encoder", src, dataclasses.replace(ENCODERS.get("resnet18"), name="resnet18_mine"))
    loaded = build_trunk("resnet18", str(tmp_path / "encoder"))
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(GigaslideError, match="no tensor in the file matches resnet34|cover only"):
        build_trunk("resnet34", str(tmp_path / "encoder"))

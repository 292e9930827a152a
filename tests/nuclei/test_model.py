"""The network on different backbones: output maps, frozen encoders, exported encoders, losses."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from gigaslide.encoders import build_encoder, export_encoder
from gigaslide.errors import GigaslideError
from gigaslide.nuclei.losses import hovernet_loss, msge
from gigaslide.nuclei.model import HoVerNet, ModelSpec
from gigaslide.nuclei.train import NucleiTrainConfig, _build


def _spec(name: str, n_types: int = 0) -> ModelSpec:
    enc = build_encoder(name, weights="random")
    return ModelSpec(backbone=asdict(enc.spec), backbone_source=name, backbone_weights=enc.weights_id, mpp=0.25,
                     n_types=n_types, decoder_channels=(16, 8))


@pytest.mark.parametrize(("name", "n_types"), [("test_resnet", 0), ("test_vit", 3)])
def test_maps_have_the_input_size(name: str, n_types: int) -> None:
    torch.manual_seed(0)
    m = HoVerNet(_spec(name, n_types)).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 96, 64))
    assert out["np"].shape == (2, 2, 96, 64) and out["hv"].shape == (2, 2, 96, 64)
    assert ("nc" in out) == bool(n_types) and (not n_types or out["nc"].shape == (2, n_types + 1, 96, 64))


def test_frozen_encoder_gets_no_gradient_and_keeps_bn_statistics() -> None:
    m = HoVerNet(_spec("test_resnet"))
    m.freeze_encoder()
    m.train()
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    loss, _ = hovernet_loss(m(torch.rand(2, 3, 64, 64)), torch.zeros(2, 64, 64, dtype=torch.long), torch.zeros(2, 2, 64, 64))
    loss.backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert any(p.grad is not None for p in m.np_head.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.encoder.state_dict().items())


def test_exported_encoder_is_the_backbone_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    enc = build_encoder("test_resnet", weights="random", seed=3)
    export_encoder(tmp_path / "encoder", enc.trunk, enc.spec)
    cfg = NucleiTrainConfig(images="", annotations="", out="", backbone=str(tmp_path / "encoder"))
    model, spec = _build(cfg, 0, {})
    assert spec.backbone_weights.startswith("sha256:")
    got, want = model.encoder.trunk.state_dict(), enc.trunk.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    other = build_encoder("test_vit", weights="random")
    export_encoder(tmp_path / "bad", other.trunk, enc.spec)  # ViT weights under a ResNet spec
    with pytest.raises(GigaslideError, match="weights do not fit encoder 'test_resnet'"):
        _build(NucleiTrainConfig(images="", annotations="", out="", backbone=str(tmp_path / "bad")), 0, {})


def test_msge_is_zero_for_the_target_and_positive_otherwise() -> None:
    t = torch.zeros(1, 2, 16, 16)
    t[0, 0, 4:12, 4:12] = torch.linspace(-1, 1, 8)
    focus = torch.zeros(1, 16, 16, dtype=torch.long)
    focus[0, 4:12, 4:12] = 1
    assert float(msge(t, t, focus)) == 0.0
    assert float(msge(torch.zeros_like(t), t, focus)) > 0.01

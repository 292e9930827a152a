"""Round 8: encoder properties a subtle slip would break silently."""

from __future__ import annotations

import torch

from gigaslide.encoders import build_encoder


def test_a_cls_mean_encoder_reports_twice_its_trunk_width():
    """test_vit_swiglu is a 32-wide ViT pooled as class token + mean patch token: 64-d features, and the encoder says
    64 (the size feature files record as embed_dim, and empty slides' arrays are made with)."""
    enc = build_encoder("test_vit_swiglu", "random")
    with torch.no_grad():
        out = enc(torch.zeros(2, 56, 56, 3, dtype=torch.uint8))
    assert enc.trunk.embed_dim == 32 and out.shape == (2, 64) and enc.embed_dim == 64

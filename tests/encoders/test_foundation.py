"""The large pathology foundation-model entries (UNI2-h, Virchow, Virchow2, H-optimus, Prov-GigaPath).

Their weights are gated and multi-GB, so the full-size architectures are checked on the meta device (no memory,
no weights) against the sizes their model cards publish, and the loading path (named SwiGLU layers, register
tokens, the class + mean patch token embedding) on tiny variants with weights the tests make.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gigaslide.encoders import ENCODERS, build_encoder, create_trunk, export_encoder
from gigaslide.encoders.model import Encoder
from gigaslide.errors import GigaslideError

# name: (parameters as published, prefix tokens = class + registers, patch px, embedding size)
PUBLISHED = {
    "uni2_h": (681e6, 9, 14, 1536),  # ViT-H/14, 681M, 8 registers
    "virchow": (632e6, 1, 14, 2560),  # ViT-H/14, 632M, class + mean patch token
    "virchow2": (632e6, 5, 14, 2560),  # ViT-H/14, 632M, 4 registers
    "h_optimus_0": (1.1e9, 5, 14, 1536),  # ViT-g/14, 1.1B, 4 registers
    "h_optimus_1": (1.1e9, 5, 14, 1536),
    "prov_gigapath": (1.13e9, 1, 16, 1536),  # ViT-g with 16-px patches, 1.13B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_architecture_matches_the_model_card(name):
    params, prefix, patch, dim = PUBLISHED[name]
    spec = ENCODERS.get(name)
    with torch.device("meta"):
        trunk = create_trunk(spec)
        out = Encoder(spec, trunk, "meta")(torch.zeros(2, 3, 224, 224))
    n = sum(p.numel() for p in trunk.parameters())
    assert abs(n - params) / params < 0.04, f"{name}: {n / 1e6:.0f}M parameters, published {params / 1e6:.0f}M"
    assert trunk.num_prefix_tokens == prefix
    assert tuple(trunk.patch_embed.patch_size) == (patch, patch)
    assert tuple(out.shape) == (2, dim) == (2, spec.embed_dim)
    assert spec.hub and spec.native_mpp == 0.5
    from gigaslide.ssl.tile.vit_layout import spec_shape, trunk_shape

    assert spec_shape(spec) == trunk_shape(trunk)  # what `pretrain --init` reads to suggest a --backbone for a checkpoint


def _tiny(name: str) -> dataclasses.replace:
    """The entry at a size a test can run (same layer types, registers and pooling)."""
    spec = ENCODERS.get(name)
    kw = {**spec.timm_kwargs, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56}
    return dataclasses.replace(spec, name=f"tiny_{name}", input_size=56, embed_dim=0, timm_kwargs=kw)


def test_cls_mean_is_class_token_and_mean_of_patch_tokens_without_registers():
    spec = _tiny("virchow2")
    torch.manual_seed(0)
    enc = Encoder(spec, create_trunk(spec), "test").eval()
    x = torch.randint(0, 256, (3, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        got = enc(x)
        tokens = enc.trunk.forward_features(enc.preprocess(x))
    assert tokens.shape[1] == 1 + 4 + 16  # class, 4 registers, 4x4 patches of 14 px
    want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(got, want)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert not torch.allclose(got, with_registers, atol=1e-4)  # the registers are left out of the mean


@pytest.mark.parametrize("name", ["virchow2", "uni2_h"])
def test_swiglu_entry_exports_as_json_and_reloads_the_same_features(tmp_path, name):
    """``mlp_layer`` is a name in the spec, resolved when the trunk is made: an export's encoder.json stays JSON and
    the reloaded encoder has SwiGLU blocks, the same pooling and the same features."""
    from timm.layers import GluMlp

    spec = _tiny(name)
    torch.manual_seed(1)
    trunk = create_trunk(spec)
    assert isinstance(trunk.blocks[0].mlp, GluMlp)  # SwiGLUPacked is a GluMlp with SiLU
    assert isinstance(trunk.blocks[0].mlp.act, torch.nn.SiLU)
    dim = trunk.num_features * (2 if spec.pool == "cls_mean" else 1)
    export_encoder(tmp_path / "enc", trunk, dataclasses.replace(spec, embed_dim=dim))
    back = build_encoder(str(tmp_path / "enc"))
    src = Encoder(dataclasses.replace(spec, embed_dim=dim), trunk, "x").eval()
    x = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), src(x))
    assert back.spec.pool == spec.pool and back.embed_dim == dim == back(x).shape[1]


def test_unknown_mlp_layer_name_is_a_one_line_error():
    spec = dataclasses.replace(_tiny("virchow"), timm_kwargs={**_tiny("virchow").timm_kwargs, "mlp_layer": "geglu"})
    with pytest.raises(GigaslideError, match="unknown mlp_layer 'geglu'"):
        create_trunk(spec)


def test_pool_must_be_known():
    with pytest.raises(ValueError, match="pool must be one of"):
        dataclasses.replace(ENCODERS.get("virchow"), pool="mean")

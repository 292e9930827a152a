"""``build_encoder --weights`` reads ViT checkpoints in the layouts other tools save (timm, facebookresearch's
DINOv2 release and its training checkpoints, transformers' Dinov2Model and ViTModel): the same function as the
source model, not just the same shapes (weights these tests make, in each layout)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gigaslide.encoders import ENCODERS, build_encoder, create_trunk
from gigaslide.testing import VIT_LAYOUTS, vit_checkpoint


def _source(name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    m = create_trunk(ENCODERS.get(name)).eval()
    with torch.no_grad():  # non-trivial tokens and layer scales, so a dropped or misplaced one shows
        m.cls_token.normal_()
        if m.reg_token is not None:
            m.reg_token.normal_()
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name,layouts", [("test_vit_dinov2", VIT_LAYOUTS[:4]), ("test_vit_dinov2_reg", VIT_LAYOUTS[:4]),
                                          ("test_vit", ("timm", "hf-vit"))])
def test_every_layout_loads_to_the_same_encoder(tmp_path, name, layouts):
    src = _source(name)
    size = ENCODERS.get(name).input_size
    x = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = None
    for layout in layouts:
        path = tmp_path / f"{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in vit_checkpoint(src, layout).items()}, str(path))
        enc = build_encoder(name, str(path))
        with torch.no_grad():
            got = enc(x)
            if want is None:
                want = src(enc.preprocess(x))
        torch.testing.assert_close(got, want, msg=lambda m, layout=layout: f"{layout}: {m}")


def test_a_vitmodel_checkpoint_converts_to_exactly_the_timm_keys():
    """Every block key of a ViTModel checkpoint differs from timm's; converted, the keys are timm's (its pooler, which
    the timm trunk has no place for, dropped)."""
    from gigaslide.encoders.vit_layout import from_transformers

    src = _source("test_vit")
    sd = vit_checkpoint(src, "hf-vit")
    assert not any(k.startswith("blocks.") for k in sd) and "vit.pooler.dense.weight" in sd
    assert set(from_transformers(sd)) == set(src.state_dict())


def test_phikon_v2_entry_is_a_vit_l16_without_registers():
    spec = ENCODERS.get("phikon_v2")
    with torch.device("meta"):
        trunk = create_trunk(spec)
    n = sum(p.numel() for p in trunk.parameters())
    assert abs(n - 303e6) / 303e6 < 0.02 and trunk.num_prefix_tokens == 1  # ViT-L: 24 blocks of 1024-d, ~0.3B
    assert tuple(trunk.patch_embed.patch_size) == (16, 16) and trunk.pos_embed.shape[1] == 1 + 14 * 14

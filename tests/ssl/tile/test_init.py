"""--init (Roth et al.): continue from an encoder; wrong architectures refused; ViT pos-embed and layer decay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from gigaslide.encoders import ENCODERS, build_encoder, create_trunk, export_encoder
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.init import run_spec
from gigaslide.ssl.tile.train import PretrainConfig, build_model, param_groups, pretrain

DINO = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 0}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"t{i}.png")
    return d


def test_wrong_architecture_init_is_refused(tiles, tmp_path):
    torch.manual_seed(0)
    export_encoder(tmp_path / "enc", create_trunk(ENCODERS.get("test_resnet")), ENCODERS.get("test_resnet"))
    cfg = PretrainConfig(data=str(tiles), out=str(tmp_path / "run"), method="simclr", backbone="test_vit", tile_size=32,
                         init=str(tmp_path / "enc"), steps=1, method_args={"hidden_dim": 16})
    with pytest.raises(GigaslideError, match="--init is a test_resnet encoder but --backbone test_vit"):
        pretrain(cfg)
    # a raw weights file of another architecture: refused by the loader, with our fix
    sd = create_trunk(ENCODERS.get("test_resnet")).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    cfg.init = str(tmp_path / "w.safetensors")
    with pytest.raises(GigaslideError, match="pick the --backbone"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing half-written


def test_init_from_previous_run_continues_its_weights(tiles, tmp_path):
    base = dict(data=str(tiles), method="dino", backbone="test_resnet", tile_size=32, batch_size=4, n_local=2,
                method_args=DINO, steps=2)
    pretrain(PretrainConfig(out=str(tmp_path / "a"), **base))
    exported = build_encoder(str(tmp_path / "a" / "encoder")).trunk.state_dict()
    model, _, source = build_model(PretrainConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a"), **base))
    assert source.endswith("encoder")
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in exported.items())
    # the teacher starts from the same weights (teacher/student EMA from the foundation model)
    t = model.teacher_backbone.state_dict()
    assert all(torch.equal(t[k], v) for k, v in exported.items())


def test_dinov2_layout_vit_init_resamples_pos_embed_and_uses_layer_decay(tiles, tmp_path):
    """A DINOv2 ViT-S/14 checkpoint at 224 px continued at 28 px tiles: pos_embed 16x16 -> 2x2."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "dinov2.safetensors"))
    cfg = PretrainConfig(data=str(tiles), out=str(tmp_path / "run"), method="dino", backbone="vit_small_dinov2",
                         tile_size=28, init=str(tmp_path / "dinov2.safetensors"), batch_size=2, n_local=1,
                         method_args=DINO, steps=1, workers=0)
    model, spec, _ = build_model(cfg)
    assert model.backbone.pos_embed.shape == (1, 1 + 4, 384)
    assert torch.equal(model.backbone.blocks[3].ls1.gamma, src.blocks[3].ls1.gamma)  # LayerScale kept
    groups = param_groups(model, cfg, spec.family)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert len(scales) > 5 and min(scales) < 0.1 and max(scales) == 1.0  # 0.75 ** 13 for the patch embed
    s = pretrain(cfg)
    assert s["steps"] == 1 and np.isfinite(s["final_loss"])
    enc = build_encoder(str(tmp_path / "run" / "encoder"))
    assert enc.spec.arch == "vit_small_patch14_dinov2" and enc.spec.input_size == 28
    assert enc(torch.zeros(1, 28, 28, 3, dtype=torch.uint8)).shape == (1, 384)


def test_run_spec_for_vits_allows_multicrop_sizes():
    spec = run_spec("vit_small", "dino", 96, [0.5, 1.0], "pathology")
    assert spec.timm_kwargs["img_size"] == 96 and spec.timm_kwargs["dynamic_img_size"]
    assert spec.native_mpp == 0.5 and spec.hub is None and spec.name == "vit_small_dino"
    with pytest.raises(GigaslideError, match="truncated"):
        run_spec("resnet50_trunc", "dino", 96, [0.5], "pathology")

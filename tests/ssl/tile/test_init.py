"""--init (Roth et al.): continue from an encoder; DINOv2 layouts (registers or not, original or timm, hub cache,
export) load with the position embedding resampled; other architectures / patch sizes refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from gigaslide.encoders import ENCODERS, build_encoder, create_trunk, export_encoder
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.config import resolve_config
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.ssl.tile.init import load_init, run_spec
from gigaslide.ssl.tile.methods import SSL_METHODS
from gigaslide.ssl.tile.step import build_model, param_groups
from gigaslide.testing import vit_checkpoint

DINO = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 0}
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"t{i}.png")
    return d


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _source_vit(arch: str, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, **TINY)
    with torch.no_grad():  # non-trivial tokens so a wrong conversion shows
        m.cls_token.normal_()
        if m.reg_token is not None:
            m.reg_token.normal_()
    return m.eval()


def _original_layout(m: torch.nn.Module, chunked: bool = False) -> dict[str, torch.Tensor]:
    """The facebookresearch/dinov2 layout, prefixed as in a DINOv2 training checkpoint."""
    return {"teacher.backbone." + k: v for k, v in vit_checkpoint(m, "dinov2-chunked" if chunked else "dinov2").items()}


def _trunk(backbone: str, tile: int):  # noqa: ANN202
    spec = run_spec(backbone, "dinov2", tile, [0.5], "pathology")
    torch.manual_seed(1)
    return create_trunk(spec), dataclasses.replace(spec, embed_dim=32)


@pytest.mark.parametrize("backbone,arch", [("test_vit_dinov2", "vit_small_patch14_dinov2"),
                                           ("test_vit_dinov2_reg", "vit_small_patch14_reg4_dinov2")])
@pytest.mark.parametrize("layout", ["timm", "original", "chunked", "transformers"])
def test_dinov2_checkpoints_load_with_and_without_registers(tmp_path, backbone, arch, layout):
    src = _source_vit(arch, 56)
    sd = {"timm": lambda: src.state_dict(), "transformers": lambda: vit_checkpoint(src, "hf-dinov2")}.get(
        layout, lambda: _original_layout(src, chunked=layout == "chunked"))()
    f = _save(sd, tmp_path / "w.safetensors")
    trunk, spec = _trunk(backbone, 56)
    assert "w.safetensors" in load_init(trunk, spec, str(f), backbone)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(trunk.eval()(x), src(x), atol=1e-5)  # same function, not just same shapes
        trunk(torch.rand(1, 3, 28, 28))  # local crops: position embedding resampled on the fly


def test_position_embedding_is_resampled_to_the_run_tile_size(tmp_path):
    src = _source_vit("vit_small_patch14_reg4_dinov2", 98)  # 7x7 grid, e.g. a 518 px release at 37x37
    f = _save(_original_layout(src), tmp_path / "w.safetensors")
    trunk, spec = _trunk("test_vit_dinov2_reg", 56)
    load_init(trunk, spec, str(f), "test_vit_dinov2_reg")
    assert trunk.pos_embed.shape == (1, 16, 32)  # 4x4 patches, no class entry (registers layout)
    assert torch.equal(trunk.blocks[1].ls1.gamma, src.blocks[1].ls1.gamma)  # LayerScale kept
    assert torch.equal(trunk.reg_token, src.reg_token)


def test_other_architectures_are_refused_in_one_line_naming_what_fits(tmp_path):
    trunk, spec = _trunk("test_vit_dinov2", 56)
    reg = _save(_source_vit("vit_small_patch14_reg4_dinov2", 56).state_dict(), tmp_path / "reg.safetensors")
    with pytest.raises(GigaslideError, match=r"4 register tokens but --backbone test_vit_dinov2 has .*no register.*"
                                             r"use --backbone test_vit_dinov2_reg") as e:
        load_init(trunk, spec, str(reg), "test_vit_dinov2")
    assert "\n" not in str(e.value)
    p16 = _save(create_trunk(ENCODERS.get("test_vit")).state_dict(), tmp_path / "p16.safetensors")
    with pytest.raises(GigaslideError, match=r"patch 16, 64-d, 6 blocks.* has patch 14, 32-d, 2 blocks.*--backbone test_vit"):
        load_init(trunk, spec, str(p16), "test_vit_dinov2")
    cnn = _save(create_trunk(ENCODERS.get("test_resnet")).state_dict(), tmp_path / "cnn.safetensors")
    with pytest.raises(GigaslideError, match="not a ViT checkpoint"):
        load_init(trunk, spec, str(cnn), "test_vit_dinov2")


def test_hub_cache_snapshot_and_hub_id(tmp_path, monkeypatch):
    src = _source_vit("vit_small_patch14_dinov2", 56)
    snap = tmp_path / "hub" / "models--timm--tiny_dinov2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    _save(src.state_dict(), snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for init in ("hf-hub:timm/tiny_dinov2", str(snap)):
        trunk, spec = _trunk("test_vit_dinov2", 56)
        load_init(trunk, spec, init, "test_vit_dinov2")
        assert torch.equal(trunk.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(GigaslideError, match="not in the local cache"):
        load_init(*_trunk("test_vit_dinov2", 56), "hf-hub:timm/absent", "test_vit_dinov2")


def test_wrong_architecture_init_is_refused(tiles, tmp_path):
    torch.manual_seed(0)
    export_encoder(tmp_path / "enc", create_trunk(ENCODERS.get("test_resnet")), ENCODERS.get("test_resnet"))
    cfg = PretrainConfig(data=str(tiles), out=str(tmp_path / "run"), method="simclr", backbone="test_vit", tile_size=32,
                         init=str(tmp_path / "enc"), steps=1, method_args={"hidden_dim": 16}, monitor_every=0)
    with pytest.raises(GigaslideError, match="--init is a test_resnet encoder but --backbone test_vit"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing half-written


def test_continued_dinov2_run_starts_teacher_and_student_from_the_init_export(tiles, tmp_path):
    src = _source_vit("vit_small_patch14_reg4_dinov2", 98)
    f = _save(_original_layout(src), tmp_path / "dinov2.safetensors")
    base = dict(data=str(tiles), method="dinov2", backbone="test_vit_dinov2_reg", tile_size=56, batch_size=2, n_local=1,
                method_args=DINO, steps=1, monitor_every=0, precision="fp32")
    s = pretrain(PretrainConfig(out=str(tmp_path / "a"), init=str(f), **base))
    assert s["steps"] == 1 and np.isfinite(s["final_loss"]) and "dinov2.safetensors" in s["init"]
    exported = build_encoder(str(tmp_path / "a" / "encoder")).trunk.state_dict()
    cfg = resolve_config(PretrainConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a" / "encoder"), **base),
                         SSL_METHODS.get("dinov2"), "vit")
    model, _, source = build_model(cfg)
    assert source.endswith("encoder")
    for part in (model.backbone, model.teacher_backbone):
        got = part.state_dict()
        assert all(torch.equal(got[k], v) for k, v in exported.items())
    scales = sorted({round(g["lr_scale"], 6) for g in param_groups(model, cfg, "vit")})
    assert scales[-1] == 1.0 and scales[-2] == pytest.approx(0.9) and scales[0] == pytest.approx(0.2 * scales[1])  # LLRD 0.9, patch embed x0.2


@pytest.mark.parametrize("layout", ["original", "transformers", "timm"])
def test_dinov2_continues_from_the_mask_token_of_the_release(tmp_path, layout):
    # DINOv2's releases (and transformers' Dinov2Model) carry the mask token iBOT trained; timm's ViT has none, so
    # loading the trunk dropped it and the continued run masked patches with a zero token
    src = _source_vit("vit_small_patch14_dinov2", 56)
    token = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    if layout == "original":
        sd = {**_original_layout(src), "teacher.backbone.mask_token": token}
    elif layout == "transformers":
        sd = {**vit_checkpoint(src, "hf-dinov2"), "embeddings.mask_token": token}
    else:
        sd = src.state_dict()
    f = _save(sd, tmp_path / "w.safetensors")
    cfg = resolve_config(PretrainConfig(data=".", out=str(tmp_path / "run"), method="dinov2",
                                        backbone="test_vit_dinov2", tile_size=56, init=str(f), method_args=DINO,
                                        steps=1), SSL_METHODS.get("dinov2"),
                         "vit")
    model, _, _ = build_model(cfg)
    want = torch.zeros(1, 1, 32) if layout == "timm" else token.view(1, 1, 32)
    assert torch.equal(model.mask_token.detach(), want)
    assert torch.equal(build_model(cfg, load=False)[0].mask_token.detach(), torch.zeros(1, 1, 32))  # resume: ckpt's


def test_run_spec_for_vits_allows_multicrop_sizes():
    spec = run_spec("vit_small", "dino", 96, [0.5, 1.0], "pathology")
    assert spec.timm_kwargs["img_size"] == 96 and spec.timm_kwargs["dynamic_img_size"]
    assert spec.native_mpp == 0.5 and spec.hub is None and spec.name == "vit_small_dino"
    with pytest.raises(GigaslideError, match="truncated"):
        run_spec("resnet50_trunc", "dino", 96, [0.5], "pathology")


def test_dinov2_registry_entries_match_their_models():
    """The shape read from each entry's name (used to suggest a --backbone) is the model's, and so is embed_dim."""
    from gigaslide.ssl.tile.vit_layout import VitShape, spec_shape, trunk_shape

    names = [n for n, s in ENCODERS.items() if "dinov2" in s.arch]
    assert {"vit_small_dinov2", "vit_giant_dinov2", "vit_small_dinov2_reg", "vit_giant_dinov2_reg", "vit_tiny_dinov2"} <= set(names)
    for n in names:
        spec = ENCODERS.get(n)
        with torch.device("meta"):
            trunk = create_trunk(spec)
        assert spec_shape(spec) == trunk_shape(trunk), n
        assert spec.embed_dim in (0, trunk.num_features), n
    assert spec_shape(ENCODERS.get("vit_giant_dinov2_reg")) == VitShape(14, 1536, 40, 4)


def test_init_weights_of_another_cnn_name_the_backbones_they_fit(tmp_path):
    """The loader names the registry entries the weights fit; --init used to replace that with 'pick the --backbone'."""
    from safetensors.torch import save_file

    from gigaslide.encoders import build_encoder
    from gigaslide.ssl.tile.init import load_init_weights

    src = build_encoder("resnet18", "random", seed=0)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(path))
    spec = ENCODERS.get("resnet34")
    with pytest.raises(GigaslideError) as e:
        load_init_weights(create_trunk(spec), spec, str(path), "resnet34")
    assert "they fit --backbone resnet18" in str(e.value) and "--encoder" not in str(e.value)

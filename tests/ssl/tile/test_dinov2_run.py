"""`pretrain --method dinov2` end to end on tiny patch-14 ViTs: recipe applied, learns, resumes bit-exactly, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide import runs
from gigaslide.encoders import build_encoder, create_trunk
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile import augment as A
from gigaslide.ssl.tile.config import resolve_config
from gigaslide.ssl.tile.dinov2 import DINOv2
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.ssl.tile.init import patch_size_of, run_spec
from gigaslide.ssl.tile.step import build_model, param_groups

SMALL = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 1}


def _tiles(d: Path, n: int, size: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.array([230, 150, 200] if i % 2 else [120, 70, 160], np.float32)
        img = base + rng.normal(0, 25, (size, size, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"t{i:02d}.png")
    return d


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return _tiles(tmp_path_factory.mktemp("tiles"), 16, 64)


def _cfg(tiles: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(tiles), out=str(out), method="dinov2", backbone="test_vit_dinov2", tile_size=56, batch_size=4,
                n_local=2, method_args=SMALL, steps=4, log_every=1, monitor_every=0, data_kind="tiles", precision="fp32")
    base.update(kw)
    return PretrainConfig(**base)


def test_issue_command_builds_only_crops_the_patch14_vit_accepts():
    """`--method dino --backbone vit_small_dinov2 --tile-size 224` used to make 96 px local crops (patch 16)."""
    with torch.device("meta"):
        trunk = create_trunk(run_spec("vit_small_dinov2", "dino", 224, [0.5], "pathology"))
        patch = patch_size_of(trunk)
        sizes = sorted({v.size for v in A.view_recipes("multicrop", "pathology", 224, 6, patch=patch)})
        assert patch == 14 and sizes == [98, 224]
        for s in sizes:
            trunk(torch.empty(1, 3, s, s))
        with pytest.raises(AssertionError, match="divisible by patch size"):
            trunk(torch.empty(1, 3, 96, 96))  # what the old multiple-of-16 rounding produced


def test_recipe_fills_the_config_and_the_parameter_groups():
    cfg = resolve_config(PretrainConfig(data=".", out=".", method="dinov2", backbone="test_vit_dinov2", tile_size=56,
                                        steps=1, method_args=SMALL), DINOv2, "vit")
    assert (cfg.layer_decay, cfg.patch_embed_lr_mult, cfg.n_local, cfg.drop_path) == (0.9, 0.2, 8, 0.1)
    assert cfg.global_scale == (0.32, 1.0) and cfg.local_scale == (0.05, 0.32) and cfg.lr == DINOv2.default_lr
    model, _, _ = build_model(cfg)
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # drop-path on the student
    # DINOv2's drop_path_uniform: every block at the rate (timm's rule would give the first block 0)
    rates = [getattr(blk, n).drop_prob for blk in model.backbone.blocks for n in ("drop_path1", "drop_path2")]
    assert rates == pytest.approx([0.1] * 2 * len(model.backbone.blocks))
    assert all(isinstance(blk.drop_path1, torch.nn.Identity) for blk in model.teacher_backbone.blocks)
    scale = {id(p): g["lr_scale"] for g in param_groups(model, cfg, "vit") for p in g["params"]}
    b = model.backbone
    assert scale[id(b.patch_embed.proj.weight)] == pytest.approx(0.2 * scale[id(b.cls_token)])  # patch embed x 0.2
    assert scale[id(b.blocks[0].attn.qkv.weight)] == pytest.approx(0.9 * scale[id(b.blocks[1].attn.qkv.weight)])
    # DINOv2's get_vit_lr_decay_rate: embeddings layer 0, blocks.i layer i + 1, final norm / heads L + 1 (x 1)
    n = len(b.blocks)
    assert scale[id(b.cls_token)] == pytest.approx(0.9 ** (n + 1))
    assert scale[id(b.blocks[-1].attn.qkv.weight)] == pytest.approx(0.9)
    assert scale[id(b.norm.weight)] == 1.0
    # DINOv2's mask token is part of the student trunk's input embedding: layer 0, 0.9 ** (blocks + 1), no x 0.2
    assert scale[id(model.mask_token)] == pytest.approx(0.9 ** (len(b.blocks) + 1))
    assert scale[id(model.mask_token)] == pytest.approx(scale[id(b.cls_token)])
    assert scale[id(model.head.last_layer.weight_v)] == 1.0


def test_dinov2_run_exports_a_teacher_that_encodes(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=3))
    assert s["steps"] == 3 and np.isfinite(s["final_loss"])
    enc = build_encoder(str(tmp_path / "run" / "encoder"))
    assert enc.spec.arch == "vit_small_patch14_dinov2" and enc.spec.input_size == 56
    ck = runs.load_checkpoint(tmp_path / "run")["model"]
    teacher = {k[len("teacher_backbone."):]: v for k, v in ck.items() if k.startswith("teacher_backbone.")}
    assert all(torch.equal(teacher[k], v) for k, v in enc.trunk.state_dict().items())
    assert enc(torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)).shape == (2, 32)
    # `gigaslide encode SLIDES --encoder RUN/encoder`: the export encodes a slide
    from gigaslide.features import store
    from gigaslide.features.extract import encode_slides
    from gigaslide.testing import make_slide
    from gigaslide.tiling import TilingParams

    slide = make_slide(tmp_path / "s.tiff", (1024, 768), seed=1)
    res = encode_slides([slide], tmp_path / "feats", enc, TilingParams(mpp=1.0, tile_size=56, min_tissue=0.5), workers=0,
                        precision="fp32")
    assert res.done == ["s"] and not res.failed, res.failed
    ff = store.load(tmp_path / "feats" / "features" / "s.h5")
    assert ff.features.shape[1] == 32 and len(ff.features) > 0 and np.isfinite(ff.features).all()


def test_dinov2_image_loss_decreases(tiles, tmp_path):
    # constant teacher temperature so the targets' sharpness does not move under the loss
    margs = {**SMALL, "warmup_teacher_temp": 0.07, "koleo_weight": 0.0}
    pretrain(_cfg(tiles, tmp_path / "run", steps=16, batch_size=8, lr=2e-3, warmup_frac=0.0, method_args=margs))
    hist = runs.load_checkpoint(tmp_path / "run")["history"]
    losses = [h["loss"] for h in hist]
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses


@pytest.mark.parametrize("backbone", ["test_vit_dinov2", "test_vit_dinov2_reg"])
def test_interrupted_dinov2_run_resumes_bit_exactly(tiles, tmp_path, backbone):
    """Teacher, centres, mask token, drop-path RNG and masks all continue where they stopped."""
    margs = {**SMALL, "centering": "centering"} if backbone.endswith("reg") else SMALL
    full = pretrain(_cfg(tiles, tmp_path / "full", backbone=backbone, method_args=margs))
    part = pretrain(_cfg(tiles, tmp_path / "part", backbone=backbone, method_args=margs, stop_after_steps=2))
    assert part["steps"] == 2 and part["stopped_by"] == "stop_after_steps"
    resumed = pretrain(_cfg(tiles, tmp_path / "part", backbone=backbone, method_args=margs))
    assert resumed["steps"] == full["steps"] == 4
    a, b = runs.load_checkpoint(tmp_path / "full")["model"], runs.load_checkpoint(tmp_path / "part")["model"]
    assert a.keys() == b.keys() and "dino_loss.center" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_bad_sizes_are_refused_before_anything_is_written(tiles, tmp_path):
    with pytest.raises(GigaslideError, match=r"not a multiple of the patch size 14.*use --tile-size 56 or 70"):
        pretrain(_cfg(tiles, tmp_path / "a", tile_size=64))
    with pytest.raises(GigaslideError, match="local crop size 30 does not work"):
        pretrain(_cfg(tiles, tmp_path / "b", local_size=30))
    tiny = _tiles(tmp_path / "tiny", 4, 20)
    with pytest.raises(GigaslideError, match=r"tiles are 20x20 px, smaller than the smallest crop .* 28 px"):
        pretrain(_cfg(tiny, tmp_path / "c"))
    assert not any((tmp_path / d / "checkpoint").exists() for d in "abc")


def test_a_folder_of_one_tile_is_refused_and_two_train(tmp_path):
    # one tile: a one-line error before the run folder is made (every method learns across different tiles);
    # two, fewer than a batch: it trains (with a warning, tests/ssl/tile/test_train.py)
    with pytest.raises(GigaslideError, match="holds 1 tile"):
        pretrain(_cfg(_tiles(tmp_path / "one", 1, 64), tmp_path / "run1", steps=2))
    assert not (tmp_path / "run1").exists()
    s = pretrain(_cfg(_tiles(tmp_path / "two", 2, 64), tmp_path / "run2", steps=2))
    assert s["steps"] == 2 and np.isfinite(s["final_loss"])


def test_non_finite_loss_stops_naming_the_step(tiles, tmp_path, monkeypatch):
    orig = DINOv2.loss

    def bad(self, views, step, progress):  # noqa: ANN001
        out = orig(self, views, step, progress)
        return out * float("nan") if step == 2 else out

    monkeypatch.setattr(DINOv2, "loss", bad)
    with pytest.raises(GigaslideError, match="at step 2"):
        pretrain(_cfg(tiles, tmp_path / "run", steps=4))


def test_dinov2_continues_a_swiglu_register_vit_and_exports_its_pooled_embedding(tiles, tmp_path):
    """A Virchow2-layout backbone (SwiGLU MLPs, 4 registers, class + mean patch token): the heads train on the
    trunk's 32-d class token, the export embeds 2 x 32 = 64-d as the entry does, and ``encode`` writes 64-d."""
    s = pretrain(_cfg(tiles, tmp_path / "run", backbone="test_vit_swiglu", steps=2))
    assert s["steps"] == 2 and np.isfinite(s["final_loss"])
    enc = build_encoder(str(tmp_path / "run" / "encoder"))
    assert enc.spec.pool == "cls_mean" and enc.embed_dim == 64 and enc.trunk.num_prefix_tokens == 5
    x = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        f = enc(x)
        tokens = enc.trunk.forward_features(enc.preprocess(x))
    assert f.shape == (2, 64)
    torch.testing.assert_close(f[:, :32], tokens[:, 0])

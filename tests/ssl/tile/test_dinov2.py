"""DINOv2 method (Roth et al. continued pre-training): losses, masks, Sinkhorn-Knopp, teacher, state, recipe."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from gigaslide.encoders import ENCODERS, create_trunk
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile import augment as A
from gigaslide.ssl.tile.dinov2 import DINOv2
from gigaslide.ssl.tile.methods import SSL_METHODS

from .test_methods import _dtypes_in_bf16

SMALL = {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 0}


def _trunk(name: str = "test_vit_dinov2", **kw):  # noqa: ANN202
    spec = ENCODERS.get(name)
    torch.manual_seed(0)
    return create_trunk(dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "dynamic_img_size": True, **kw}))


def _method(name: str = "test_vit_dinov2", trunk_kw: dict | None = None, **kw) -> DINOv2:
    trunk = _trunk(name, **(trunk_kw or {}))
    m = SSL_METHODS.get("dinov2")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, **{**SMALL, **kw})
    return m.train()


def _batch(n: int = 4, n_local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    views = A.MultiView(A.view_recipes("dinov2", "pathology", 56, n_local, patch=14))
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g) for _ in range(n)]
    return [torch.stack(v) for v in zip(*[views(im, g) for im in imgs])]


@pytest.mark.parametrize("name", ["test_vit_dinov2", "test_vit_dinov2_reg"])
def test_loss_is_dino_plus_ibot_plus_koleo_and_reaches_trunk_and_mask_token(name):
    m = _method(name, mask_sample_prob=1.0)  # every global crop masked
    loss = m.loss(_batch(), step=0, progress=0.0)
    t = m.last_terms
    assert t["masked"] > 0 and t["ibot"] > 0 and t["koleo"] != 0
    assert float(loss.detach()) == pytest.approx(t["dino"] + t["ibot"] + 0.1 * t["koleo"], rel=1e-5)
    loss.backward()
    assert float(m.mask_token.grad.abs().sum()) > 0  # masked patches were replaced by the mask token
    assert float(m.backbone.patch_embed.proj.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.teacher_backbone.parameters())


def test_ibot_and_koleo_can_be_switched_off():
    m = _method(ibot_weight=0.0, koleo_weight=0.0, mask_sample_prob=1.0)
    loss = m.loss(_batch(), step=0, progress=0.0)
    assert m.last_terms["ibot"] == 0 and m.last_terms["koleo"] == 0
    assert float(loss.detach()) == pytest.approx(m.last_terms["dino"], rel=1e-6)
    loss.backward()
    assert m.mask_token.grad is None or float(m.mask_token.grad.abs().sum()) == 0
    assert torch.equal(m.ibot_loss.center.center, torch.zeros_like(m.ibot_loss.center.center))


def test_unmasked_student_forward_is_timms_and_masking_changes_only_through_the_mask_token():
    m = _method().eval()
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(m._masked.encode(x), m.backbone.forward_features(x))
        mask = torch.zeros(2, 1 + 16, dtype=torch.bool)
        mask[:, 5] = True
        m.mask_token.fill_(0.3)
        a, b = m._masked.encode(x, mask=mask), m._masked.encode(x)
    assert not torch.allclose(a, b)
    # the export (teacher) pools like the trunk: DINOv2 class token
    assert torch.equal(m._pool(m.backbone, m.backbone.forward_features(x)), m.backbone(x))


def test_masks_depend_on_seed_and_step_only_and_follow_the_recipe():
    m = _method()
    state = random.getstate()
    a, b, c = m.masks(16, 16, step=3), m.masks(16, 16, step=3), m.masks(16, 16, step=4)
    assert random.getstate() == state  # the global RNG is untouched (resume stays exact)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ratio = a.flatten(1).float().mean(1)
    assert int((ratio > 0).sum()) == 8  # DINOv2: half of the global crops are masked
    assert float(ratio.max()) <= 0.5 + 1e-6 and float(ratio[ratio > 0].min()) >= 0.05
    # tiny grids: never an empty mask (every DDP rank must run the iBOT collectives)
    assert all(bool(m.masks(4, 2, step=s).any()) for s in range(50))


def test_sinkhorn_knopp_spreads_a_collapsing_teacher_over_prototypes():
    m = _method()
    torch.manual_seed(0)
    logits = torch.randn(64, 64) * 0.1
    logits[:, 0] += 0.5  # every sample leans to prototype 0
    logq, temp = m._targets(logits, 0.04)
    q = logq.exp()
    assert temp == 1.0 and torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    soft = torch.softmax(logits / 0.04, dim=1)
    assert float(soft[:, 0].mean()) > 0.5  # plain softmax: collapsed onto prototype 0
    assert float(q[:, 0].mean()) < 3 / 64  # Sinkhorn-Knopp: about 1/K of the mass
    cm = _method(centering="centering")
    out, t = cm._targets(logits, 0.04)
    assert t == 0.04 and torch.equal(out, logits)


def test_centre_buffers_move_only_with_mean_centring():
    sk, mc = _method(), _method(centering="centering", mask_sample_prob=1.0)
    for m in (sk, mc):
        m.loss(_batch(), step=0, progress=0.0)
    assert float(sk.dino_loss.center.abs().sum()) == 0  # Sinkhorn-Knopp needs no running centre
    assert float(mc.dino_loss.center.abs().sum()) > 0 and float(mc.ibot_loss.center.center.abs().sum()) > 0


def test_teacher_has_no_drop_path_and_stays_in_eval():
    m = _method(trunk_kw={"drop_path_rate": 0.5})
    assert type(m.backbone.blocks[1].drop_path1).__name__ == "DropPath"
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in m.teacher_backbone.blocks)
    m.train()
    assert m.backbone.training and not m.teacher_backbone.training and not m.teacher_head.training
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(m.teacher_backbone(x), m.teacher_backbone(x))
        assert not torch.equal(m.backbone(x), m.backbone(x))  # the student's drop-path is live


def test_teacher_temperature_warms_up_and_ema_moves_teacher_towards_student():
    m = _method(freeze_last_layer_steps=2)
    assert m.teacher_temp(0.0) == pytest.approx(0.04) and m.teacher_temp(0.15) == pytest.approx(0.055)
    assert m.teacher_temp(0.3) == pytest.approx(0.07) and m.teacher_temp(1.0) == pytest.approx(0.07)
    m.loss(_batch(), 0, 0.0).backward()
    m.before_optimizer_step(1)
    assert all(p.grad is None for p in m.head.last_layer.parameters())  # last layer frozen for the first steps
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher_backbone.parameters()]
    m.after_step(0.0)
    moved = [float((a - b).mean()) for a, b in zip(m.teacher_backbone.parameters(), before)]
    assert all(abs(d - 0.008) < 1e-4 for d in moved)  # 1 - 0.992 of the way
    assert m.export_trunk() is m.teacher_backbone


def test_everything_that_must_resume_is_in_the_state_dict():
    m = _method(centering="centering")
    keys = set(m.state_dict())
    assert {"mask_token", "dino_loss.center", "ibot_loss.center.center"} <= keys
    assert any(k.startswith("teacher_backbone.") for k in keys) and any(k.startswith("teacher_head.") for k in keys)
    assert not any(k.startswith("_masked") for k in keys)  # the masked view is not a second copy of the trunk


def test_recipe_is_roths():
    r = DINOv2.recipe
    assert r["layer_decay"] == 0.9 and r["patch_embed_lr_mult"] == 0.2 and r["n_local"] == 8 and r["drop_path"] > 0
    assert r["global_scale"] == (0.32, 1.0) and r["local_scale"] == (0.05, 0.32)
    hp = DINOv2.hparams
    assert (hp["warmup_teacher_temp"], hp["teacher_temp"], hp["mask_ratio_min"], hp["mask_ratio_max"]) == (0.04, 0.07, 0.1, 0.5)
    assert hp["centering"] == "sinkhorn_knopp" and hp["koleo_weight"] == 0.1 and hp["ibot_weight"] == 1.0


def test_cnn_backbone_and_bad_options_are_refused():
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    with pytest.raises(GigaslideError, match="needs a ViT"):
        SSL_METHODS.get("dinov2")(trunk, 64, (0.5,) * 3, (0.25,) * 3, **SMALL)
    with pytest.raises(GigaslideError, match="centering"):
        _method(centering="sk")
    with pytest.raises(GigaslideError, match="mask ratio"):
        _method(mask_ratio_min=0.6, mask_ratio_max=0.5)


def test_in_bf16_autocast_the_vit_runs_bf16_and_heads_and_losses_float32():
    """Heads, Sinkhorn-Knopp targets, DINO / iBOT / KoLeo losses in float32 (CPU autocast would keep softmax, exp,
    sums and KoLeo's distances in bf16); the loss stays close to the fp32 one."""
    batch = _batch()
    ref = _method(mask_sample_prob=1.0).loss(batch, step=0, progress=0.0)
    loss, trunk, heads = _dtypes_in_bf16(_method(mask_sample_prob=1.0), batch)
    assert trunk == {torch.bfloat16} and heads == {torch.float32} and loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=0.02)

"""Recipe contract (method defaults fill unset options), parameter groups (layer decay, patch-embedding lr,
drop path), the budget's step plan and the label-free monitor's statistics."""

from __future__ import annotations

import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.config import PretrainConfig, identity, resolve_config
from gigaslide.ssl.tile.methods import SSLMethod
from gigaslide.ssl.tile.monitor import rankme, view_top1
from gigaslide.ssl.tile.step import StepPlan, build_model, param_groups, trunk_patch_size


class _Recipe(SSLMethod):
    default_lr = 2e-3
    recipe = {"batch_size": 32, "layer_decay": 0.9, "patch_embed_lr_mult": 0.2, "drop_path": 0.1, "n_local": 8,
              "local_scale": [0.05, 0.32], "method_args": {"momentum": 0.99, "out_dim": 64}}


def _cfg(**kw) -> PretrainConfig:
    return PretrainConfig(data="d", out="o", method="simclr", backbone="test_vit", tile_size=32, steps=1, **kw)


def test_recipe_fills_only_what_the_user_left_unset():
    cfg = resolve_config(_cfg(batch_size=16, method_args={"out_dim": 128}), _Recipe, "vit")
    assert cfg.batch_size == 16 and cfg.layer_decay == 0.9 and cfg.patch_embed_lr_mult == 0.2 and cfg.n_local == 8
    assert cfg.method_args == {"momentum": 0.99, "out_dim": 128}  # the user's --method-args win
    assert cfg.lr == 2e-3 and cfg.local_scale == (0.05, 0.32) and cfg.weight_decay == 0.04  # default_lr, DEFAULTS
    assert cfg.crop_size == 32  # ViT: global crops at the tile size
    plain = resolve_config(_cfg(), SSLMethod, "cnn")
    assert plain.batch_size == 64 and plain.layer_decay == 1.0 and plain.crop_size == 24  # CNN: 2/3-size crops
    assert resolve_config(_cfg(init="vit_small_dinov2"), SSLMethod, "vit").layer_decay == 0.75
    assert identity(cfg)["lr"] == 2e-3 and identity(cfg)["batch_size"] == 16  # the resolved values are the identity

    class Bad(SSLMethod):
        recipe = {"learning_rate": 1e-3}

    with pytest.raises(GigaslideError, match="unknown keys"):
        resolve_config(_cfg(), Bad, "cnn")


def test_vit_groups_honour_layer_decay_patch_embed_multiplier_and_drop_path():
    cfg = resolve_config(_cfg(layer_decay=0.5, patch_embed_lr_mult=0.2, drop_path=0.1,
                              method_args={"hidden_dim": 16, "out_dim": 8}), SSLMethod, "vit")
    model, spec, _ = build_model(cfg)
    assert trunk_patch_size(model) == 16  # read from the model
    assert "drop_path_rate" not in spec.timm_kwargs  # the export builds without stochastic depth
    assert max(b.drop_path1.drop_prob for b in model.backbone.blocks if hasattr(b.drop_path1, "drop_prob")) == pytest.approx(0.1)
    groups = param_groups(model, cfg, spec.family)
    pe = {id(p) for p in model.backbone.patch_embed.parameters()}
    pe_scales = {g["lr_scale"] for g in groups if any(id(p) in pe for p in g["params"])}
    others_layer0 = {g["lr_scale"] for g in groups if any(p is model.backbone.cls_token for p in g["params"])}
    assert len(pe_scales) == 1 and len(others_layer0) == 1
    assert pe_scales.pop() == pytest.approx(0.2 * others_layer0.pop())  # same layer, x 0.2
    heads = {id(p) for p in model.head_parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups if any(id(p) in heads for p in g["params"]))
    assert min(g["lr_scale"] for g in groups) < 0.5 ** 2  # layer decay reached the early blocks


def test_budget_plan_spans_the_steps_the_measured_step_time_allows():
    plan = StepPlan(None, 100.0)
    assert plan.planned == 100  # provisional: 1 step/s until measured
    plan.observe(1, 10.0, 1, 10.0)
    assert plan.planned == 1 + int(90 / 10.0)  # the slow first step: a pessimistic plan, warm-up not wasted
    for local in range(2, 6):
        plan.observe(local, 10.0 if local == 1 else 0.5, local, 10.0 + 0.5 * (local - 1))  # the first step is slow
    assert plan.planned == 5 + int((100.0 - 12.0) / 0.5)  # first step left out of the mean
    assert plan.progress(plan.planned // 2) == pytest.approx(0.5, abs=0.01)
    capped = StepPlan(50, 100.0)
    for local in range(1, 6):
        capped.observe(local, 0.5, local, 0.5 * local)
    assert capped.planned == 50  # --steps caps a budget estimate
    monitored = StepPlan(None, 100.0, monitor_cost_s=2.0, monitor_points_left=5)
    for local in range(1, 6):
        monitored.observe(local, 0.5, local, 0.5 * local)
    assert monitored.planned == 5 + int((100.0 - 2.5 - 10.0) / 0.5)  # monitor points are budgeted


def test_rankme_and_view_top1():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert rankme(q) == pytest.approx(16.0, rel=1e-4)  # equal singular values: full rank
    assert rankme(torch.ones(16, 1) @ torch.randn(1, 8)) == pytest.approx(1.0, abs=0.01)  # collapsed
    assert view_top1(q, q) == 1.0 and view_top1(q, q.roll(1, 0)) == 0.0


def test_a_resumed_budget_plan_is_not_cut_short_by_its_first_step():
    # a 100 s budget at 0.25 s/step plans ~400 steps; interrupted at step 200 (50 s spent) and resumed. The first
    # resumed step carries the start-up (3 s): re-planning from it gave 201 + 47 / 3 = 216 steps, so progress (lr,
    # EMA momentum, teacher temperature) jumped from 0.5 to 0.93 until the next calibration point
    plan = StepPlan(None, 100.0, planned=400, resumed=True)
    assert not plan.observe(1, 3.0, 201, 53.0)
    assert plan.planned == 400 and plan.progress(201) == pytest.approx(201 / 400)
    for local in range(2, 6):  # measured step times still re-plan
        plan.observe(local, 0.25, 200 + local, 53.0 + 0.25 * (local - 1))
    assert plan.planned == 205 + int((100.0 - 54.0) / 0.25)
    fresh = StepPlan(None, 100.0)  # a new run still plans pessimistically from its first step
    fresh.observe(1, 3.0, 1, 3.0)
    assert fresh.planned == 1 + int(97.0 / 3.0)

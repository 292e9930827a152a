"""Round 8 (mutation testing): the schedules a run spans -- lr warm-up + cosine and its per-group scale as the
training step applies it, the EMA momentum's cosine, the frozen last layer of DINO / DINOv2 -- checked against
numbers worked out by hand from the papers' formulas (not from the code's own helpers)."""

from __future__ import annotations

import math

import pytest
import torch

from gigaslide.encoders import ENCODERS, create_trunk
from gigaslide.ssl.tile.methods import SSL_METHODS, SSLMethod
from gigaslide.ssl.tile.step import lr_at, train_step

from .test_dinov2 import _batch as _dinov2_batch
from .test_dinov2 import _method as _dinov2_method
from .test_methods import SMALL, _method, _views


@pytest.mark.parametrize(("progress", "want"), [
    (0.0, 0.0), (0.05, 0.5e-3), (0.1, 1e-3),  # linear warm-up over the first 10 %
    (0.325, 0.855018e-3),  # a quarter into the cosine: 0.99 * (1 + cos(pi / 4)) / 2 + 0.01
    (0.55, 0.505e-3),  # halfway: 0.99 * 0.5 + 0.01
    (1.0, 1e-5), (1.5, 1e-5)])  # the end (and past it): 1 % of the base lr
def test_lr_warms_up_linearly_then_follows_a_cosine_to_one_percent(progress, want):
    assert lr_at(progress, 1e-3, 0.1) == pytest.approx(want, rel=1e-5, abs=1e-12)


class _Toy(SSLMethod):
    """A trunk of two linear layers; loss: mean square of its output (enough for one optimiser step)."""

    def loss(self, views, step, progress):  # noqa: ANN001, ANN201
        return self.backbone(views[0]).pow(2).mean()


def test_train_step_gives_each_group_the_scheduled_lr_times_its_scale(tmp_path):
    torch.manual_seed(0)
    m = _Toy(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), 2, (0.0,) * 3, (1.0,) * 3)
    a, b = m.backbone
    opt = torch.optim.AdamW([{"params": list(a.parameters()), "lr_scale": 0.2},
                             {"params": list(b.parameters()), "lr_scale": 1.0}], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(3, 1, 1, 4).view(3, 4)
    train_step(m, [x], opt, scaler, 3, 0.3, base_lr=1e-3, warmup_frac=0.1, device=torch.device("cpu"),
               precision="fp32", run_dir=tmp_path)
    # progress 0.3 with 10 % warm-up: 2/9 of the cosine; 0.99 * (1 + cos(2 pi / 9)) / 2 + 0.01 = 0.884192
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.884192e-3, rel=1e-5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.884192e-3, rel=1e-5)


def _student_teacher(name: str):  # noqa: ANN202
    if name == "dinov2":
        m = _dinov2_method()
        return m, m.head, m.teacher_head
    m = _method(name)
    return m, m.head, (m.head_m if name == "mocov2" else m.teacher_head)


@pytest.mark.parametrize(("name", "base"), [("mocov2", 0.99), ("dino", 0.996), ("dinov2", 0.992)])
def test_ema_momentum_rises_from_its_base_to_one_along_a_cosine(name, base):
    """BYOL / DINO: tau = 1 - (1 - tau_base) (cos(pi p) + 1) / 2. A quarter into the run that is
    1 - (1 - tau_base) * 0.853553 (a straight line from tau_base to 1 would give 1 - (1 - tau_base) * 0.75)."""
    m, student, teacher = _student_teacher(name)
    assert m.hp["momentum"] == base
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # the student has moved away from its EMA copy
    before = [p.detach().clone() for p in teacher.parameters()]
    m.after_step(0.25)
    tau = 1 - (1 - base) * 0.8535534
    for k, s, t in zip(before, student.parameters(), teacher.parameters()):
        torch.testing.assert_close(t, tau * k + (1 - tau) * s.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_the_heads_last_layer_is_frozen_for_the_first_steps_only(name):
    """DINO's freeze_last_layer: no update of the prototypes layer in the first N steps (steps 0 .. N-1)."""
    if name == "dino":
        torch.manual_seed(0)
        trunk = create_trunk(ENCODERS.get("test_resnet"))
        m = SSL_METHODS.get("dino")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3,
                                    **{**SMALL["dino"], "freeze_last_layer_steps": 2})
        views = _views("multicrop")
    else:
        m = _dinov2_method(freeze_last_layer_steps=2)
        views = _dinov2_batch()
    last = list(m.head.last_layer.parameters())
    for step, frozen in ((1, True), (2, False)):
        m.zero_grad()
        m.loss(views, step, 0.0).backward()
        had = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in last if p.requires_grad]
        assert any(had)
        m.before_optimizer_step(step)
        got = [p.grad is not None and float(p.grad.abs().sum()) > 0 for p in last if p.requires_grad]
        want = [False] * len(had) if frozen else had  # frozen: every gradient zeroed; after: kept as computed
        assert got == want, (step, got)
    assert math.isfinite(float(m.loss(views, 3, 0.0).detach()))

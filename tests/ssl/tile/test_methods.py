"""SSL methods from lightly parts: finite losses, gradients, momentum/EMA, registry."""

from __future__ import annotations

import pytest
import torch

from gigaslide.encoders import ENCODERS, create_trunk
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.methods import SSL_METHODS

SMALL = {
    "simclr": {"hidden_dim": 32, "out_dim": 16},
    "mocov2": {"hidden_dim": 32, "out_dim": 16, "queue": 32},
    "barlowtwins": {"proj_dim": 32},
    "swav": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8, "freeze_prototypes_steps": 0},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 0},
}


def _method(name: str):  # noqa: ANN202
    torch.manual_seed(0)
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    return SSL_METHODS.get(name)(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, **SMALL[name])


def _views(kind: str, b: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    glob = [torch.rand(b, 3, 32, 32, generator=g) for _ in range(2)]
    return glob + ([torch.rand(b, 3, 16, 16, generator=g) for _ in range(2)] if kind == "multicrop" else [])


def test_registry_has_the_six_methods():
    assert SSL_METHODS.names() == ["barlowtwins", "dino", "dinov2", "mocov2", "simclr", "swav"]
    with pytest.raises(GigaslideError, match="unknown ssl_method"):
        SSL_METHODS.get("byol")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_loss_finite_and_gradients_reach_the_trunk(name):
    m = _method(name)
    loss = m.loss(_views(m.view_kind), step=0, progress=0.0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", ["mocov2", "dino"])
def test_momentum_encoder_moves_towards_student(name):
    m = _method(name)
    teacher = m.backbone_m if name == "mocov2" else m.teacher_backbone
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    m.after_step(progress=0.0)
    after = list(teacher.parameters())
    moved = [float((a - b).abs().mean()) for a, b in zip(after, before)]
    assert all(0 < d < 0.05 for d in moved)  # EMA: a small step towards the student
    if name == "dino":
        assert m.export_trunk() is m.teacher_backbone


def test_mocov2_both_directions_see_the_queue_as_it_was_before_the_batch():
    # symmetric MoCo: swapping the two views must give the same loss. Enqueuing the first direction's keys before
    # the second direction's loss (two calls of lightly's NTXentLoss) makes each query's own-view key a negative of
    # the second direction only, which breaks this symmetry
    m = _method("mocov2")
    bank = m.criterion.memory_bank
    bank0, ptr0 = bank.bank.clone(), bank.bank_ptr.clone()
    v = _views(m.view_kind)
    a = m.loss(v, step=0, progress=0.0)
    assert int(bank.bank_ptr) == 2 * len(v[0])  # both views' keys enqueued, once
    assert torch.allclose(bank.bank[: 2 * len(v[0])].norm(dim=1), torch.ones(2 * len(v[0])))
    bank.bank.copy_(bank0)
    bank.bank_ptr.copy_(ptr0)
    b = m.loss([v[1], v[0]], step=0, progress=0.0)
    assert float(b.detach()) == pytest.approx(float(a.detach()), abs=1e-5)
    with torch.no_grad():  # a loss without gradients (e.g. a monitor) leaves the queue alone
        m.loss(v, step=0, progress=0.0)
    assert int(bank.bank_ptr) == 2 * len(v[0])


def test_unknown_method_args_are_refused():
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    with pytest.raises(GigaslideError, match="unknown option"):
        SSL_METHODS.get("simclr")(trunk, 96, (0.5,) * 3, (0.25,) * 3, temprature=0.1)


@pytest.mark.parametrize("name,args,why", [
    ("mocov2", {"queue": -5}, "queue=-5 for MoCoV2: must be above 0"),
    ("simclr", {"out_dim": 0}, "out_dim=0 for SimCLR: must be above 0"),
    ("simclr", {"hidden_dim": 2.5}, "hidden_dim=2.5 for SimCLR: expected int"),
    ("simclr", {"temperature": "x"}, "temperature='x' for SimCLR: expected float"),
    ("swav", {"sinkhorn_epsilon": float("nan")}, "sinkhorn_epsilon=nan for SwAV: must be above 0"),
    ("dino", {"freeze_last_layer_steps": -1}, "freeze_last_layer_steps=-1 for DINO: must be finite and 0 or more"),
    ("dino", {"batch_norm_head": 1}, "batch_norm_head=1 for DINO: expected bool"),
    # an EMA momentum above 1 moved the teacher away from the student without a word; a masked share above 1 failed
    # deep inside the iBOT loss (a mask of more images than the batch)
    ("dino", {"momentum": 1.5}, "momentum=1.5 for DINO: must be between 0 and 1"),
    ("mocov2", {"momentum": 1.01}, "momentum=1.01 for MoCoV2: must be between 0 and 1"),
    ("dinov2", {"mask_sample_prob": 1.5}, "mask_sample_prob=1.5 for DINOv2: must be between 0 and 1"),
    ("dinov2", {"center_momentum": 2.0}, "center_momentum=2.0 for DINOv2: must be between 0 and 1"),
    ("dinov2", {"warmup_teacher_temp_frac": 1.2}, "warmup_teacher_temp_frac=1.2 for DINOv2: must be between 0 and 1"),
])
def test_bad_method_arg_values_are_refused_in_one_line(name, args, why):
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    with pytest.raises(GigaslideError, match=why.replace("(", r"\(")) as e:
        SSL_METHODS.get(name)(trunk, 96, (0.5,) * 3, (0.25,) * 3, **args)
    assert "\n" not in str(e.value) and "(the default)" in str(e.value)


def test_method_args_zero_where_it_means_off_and_whole_floats_as_ints():
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    m = SSL_METHODS.get("swav")(trunk, 96, (0.5,) * 3, (0.25,) * 3, **{**SMALL["swav"], "queue_length": 0,
                                                                      "hidden_dim": 32.0})
    assert m.queues is None and m.hp["hidden_dim"] == 32 and isinstance(m.hp["hidden_dim"], int)


def test_head_parameters_exclude_trunk_and_frozen_copies():
    m = _method("dino")
    heads = {id(p) for p in m.head_parameters()}
    assert heads and not heads & {id(p) for p in m.backbone.parameters()}
    assert not heads & {id(p) for p in m.teacher_head.parameters()}


def test_swav_queue_joins_the_sinkhorn_step_once_it_holds_only_real_features():
    from lightly.loss import SwaVLoss

    torch.manual_seed(0)
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    m = SSL_METHODS.get("swav")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, **SMALL["swav"], queue_length=8)
    plain = SSL_METHODS.get("swav")(create_trunk(ENCODERS.get("test_resnet")), trunk.num_features, (0.5,) * 3,
                                    (0.25,) * 3, **SMALL["swav"])
    plain.load_state_dict(m.state_dict())  # the queues are not in it (lightly keeps them non-persistent)
    m.eval(), plain.eval()  # BN in eval: features depend on the views only
    g = torch.Generator().manual_seed(1)
    batches = [[torch.rand(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)] for _ in range(3)]  # batch 4
    with torch.no_grad():
        z = [[torch.nn.functional.normalize(m.head(m.embed(v)), dim=1) for v in b] for b in batches]
        for b in batches[:2]:  # the queue of 8 holds random vectors, then half real ones: not used yet
            assert torch.equal(m.loss(b, step=0, progress=0.0), plain.loss(b, step=0, progress=0.0))
        assert int(m.queue_seen) == 8
        queued = [torch.cat([z[0][i], z[1][i]]) for i in range(2)]  # each global crop's features, oldest first
        for i in range(2):
            torch.testing.assert_close(m.queues[i].bank, queued[i])
        got = m.loss(batches[2], step=0, progress=0.0)
        p = [m.prototypes(v, 0) for v in z[2]]
        want = SwaVLoss(temperature=0.1, sinkhorn_epsilon=0.05)(p[:2], p[2:], [m.prototypes(q, 0) for q in queued])
        assert torch.allclose(got, want.reshape(()), atol=1e-6)
        plain_loss = plain.loss(batches[2], step=0, progress=0.0)
        assert not torch.allclose(got, plain_loss, atol=1e-4)  # other batches in the Sinkhorn step change the codes


def test_swav_prototypes_are_bias_free_unit_vectors():
    # SwAV scores a feature against prototype vectors c_k (official code: Linear(..., bias=False)); lightly's
    # SwaVPrototypes layer has a bias, which made the scores z . c_k + b_k (trained, never normalised)
    m = _method("swav")
    layer = m.prototypes.heads[0]
    assert layer.bias is None and "prototypes.heads.0.bias" not in m.state_dict()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    m.loss(_views(m.view_kind), step=0, progress=0.0)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(len(layer.weight)))
    z = torch.nn.functional.normalize(torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(m.prototypes(z, 0), z @ layer.weight.T)


def test_swav_negative_queue_length_is_refused():
    trunk = create_trunk(ENCODERS.get("test_resnet"))
    with pytest.raises(GigaslideError, match="queue_length"):
        SSL_METHODS.get("swav")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, queue_length=-1)


def _dtypes_in_bf16(m: torch.nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, set, set]:
    """(loss, output dtypes of the trunk's convs / linears, of the heads' linears) in CPU bf16 autocast."""
    trunk, heads = set(), set()
    backbone = {id(x) for name, sub in m.named_children() if "backbone" in name for x in sub.modules()}  # + EMA copies
    hooks = [mod.register_forward_hook(lambda mod, i, o: (trunk if id(mod) in backbone else heads).add(o.dtype))
             for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(views, step=0, progress=0.0)
    for h in hooks:
        h.remove()
    return loss, trunk, heads


@pytest.mark.parametrize("name", sorted(SMALL))
def test_in_bf16_autocast_the_trunk_runs_bf16_and_heads_and_loss_float32(name):
    """CPU autocast keeps softmax / exp / sums in bf16, and DINO / SwAV sharpen head outputs by temperatures of
    0.04-0.1: the heads and the loss run in float32, so the loss stays close to the fp32 one."""
    views = _views(_method(name).view_kind)
    ref = _method(name).loss(views, step=0, progress=0.0)
    loss, trunk, heads = _dtypes_in_bf16(_method(name), views)
    assert trunk == {torch.bfloat16} and heads == {torch.float32} and loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=0.02)


def test_dino_heads_are_built_without_lightlys_weight_norm_deprecation_warning():
    import warnings

    from lightly.models.modules import DINOProjectionHead

    from .test_dinov2 import _method as dinov2_method

    def weight_norm_warnings(build) -> int:  # noqa: ANN001
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            build()
        return sum("weight_norm" in str(w.message) for w in seen)

    assert weight_norm_warnings(lambda: DINOProjectionHead(8, 16, 8, 32)) == 1  # lightly's head warns ...
    assert weight_norm_warnings(lambda: _method("dino")) == 0  # ... the methods built on it do not pass that on
    assert weight_norm_warnings(dinov2_method) == 0
    assert hasattr(_method("dino").head.last_layer, "weight_g")  # still lightly's weight-normed head
    assert weight_norm_warnings(lambda: DINOProjectionHead(8, 16, 8, 32)) == 1  # the filter ends with construction


def test_dino_teacher_of_a_drop_path_vit_is_deterministic():
    # --drop-path is stochastic depth for the student; DINO builds its teacher without it. A deep copy of the student
    # kept the DropPath modules, and the teacher runs in train mode (BatchNorm), so its targets were dropped at random
    import dataclasses

    spec = ENCODERS.get("test_vit")
    torch.manual_seed(0)
    trunk = create_trunk(dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "dynamic_img_size": True,
                                                                "drop_path_rate": 0.5}))
    m = SSL_METHODS.get("dino")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, **SMALL["dino"]).train()
    x = _views("two")[0]
    with torch.no_grad():
        assert not torch.equal(m.embed(x), m.embed(x))  # the student does drop paths
        assert torch.equal(m.embed(x, m.teacher_backbone), m.embed(x, m.teacher_backbone))
    m.eval()
    with torch.no_grad():  # same weights: without drop-path the teacher computes what the student does in eval
        assert torch.allclose(m.embed(x, m.teacher_backbone), m.embed(x), atol=1e-6)


@pytest.mark.parametrize("name", ["mocov2", "dino"])
def test_ema_network_keeps_its_own_batchnorm_statistics(name):
    """MoCo's key encoder and DINO's teacher update their BN running statistics from their own forward passes
    (the references EMA the parameters only); DINO exports the teacher, whose statistics must be its own."""
    import copy

    m = _method(name)
    m.train()
    teacher = m.backbone_m if name == "mocov2" else m.teacher_backbone
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in teacher.modules())
    views = _views(m.view_kind)
    with torch.no_grad():  # a student that has trained away from its EMA network
        for p in m.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    own = copy.deepcopy(teacher).train()
    with torch.no_grad():
        own(m.prep(torch.cat(views[:2])))  # what the teacher's own pass on the global views gives
    m.loss(views, step=0, progress=0.0).backward()
    m.after_step(progress=0.0)
    bufs = dict(teacher.named_buffers())
    for k, b in own.named_buffers():
        assert torch.allclose(bufs[k].float(), b.float(), atol=1e-6), k
    student = dict(m.backbone.named_buffers())
    assert any(not torch.allclose(student[k].float(), b.float()) for k, b in bufs.items() if "running" in k)

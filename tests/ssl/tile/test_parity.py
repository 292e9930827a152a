"""Reference parity of the tile-SSL losses: each method's loss, recomputed from the papers' formulas (written here,
independently of lightly) on the very head outputs the method produced, must agree in value and in gradient; plus
the invariances a correct loss has (permuting the batch; swapping the two views of a symmetric loss)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gigaslide import runs
from gigaslide.ssl.tile.methods import SSL_METHODS

from .test_dinov2 import _batch as _dinov2_batch
from .test_dinov2 import _method as _dinov2_method
from .test_methods import _method, _views


class _Tap:
    """Records the outputs (and inputs) of a module's forward calls."""

    def __init__(self, module: torch.nn.Module):
        self.outs: list[torch.Tensor] = []
        self.ins: list[torch.Tensor] = []
        self.h = module.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):  # noqa: ANN001, ANN202
        self.ins.append(args[0])
        self.outs.append(out)

    def close(self) -> None:
        self.h.remove()


def _grads(loss: torch.Tensor, ref: torch.Tensor, wrt: list[torch.Tensor]) -> None:
    a = torch.autograd.grad(loss, wrt, retain_graph=True)
    b = torch.autograd.grad(ref, wrt, retain_graph=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def _restore_after(m: torch.nn.Module):  # noqa: ANN202
    """A function putting ``m`` back as it is now (non-persistent buffers such as MoCo's queue included)."""
    state = copy.deepcopy(runs.module_state(m))
    return lambda: runs.load_module_state(m, state, "test")


def _perm(views: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    p = torch.randperm(len(views[0]), generator=torch.Generator().manual_seed(seed))
    return [v[p] for v in views]


# -- references written from the papers -------------------------------------------------------------------------
def ref_nt_xent(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. (1), averaged over all 2N anchors (both directions)."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = len(z0)
    sim = z @ z.T / t
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return -(sim[torch.arange(2 * n), pos] - sim.logsumexp(1)).mean()


def ref_barlow(z0: torch.Tensor, z1: torch.Tensor, lam: float) -> torch.Tensor:
    """Barlow Twins eq. (1) with the official code's normalisation (BatchNorm1d without affine: biased std)."""
    def bn(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = bn(z0).T @ bn(z1) / len(z0)
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on + lam * off


def ref_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn (Algorithm in the paper's appendix / official code), single process."""
    q = torch.exp(scores / eps).T  # K x B
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def ref_swav(scores: list[torch.Tensor], n_global: int, t: float, eps: float, iters: int = 3) -> torch.Tensor:
    """SwAV: codes from the global crops only; every other crop predicts them; mean over the global crops."""
    total = 0.0
    for i in range(n_global):
        q = ref_sinkhorn(scores[i].detach(), eps, iters)
        sub = sum(-(q * F.log_softmax(scores[v] / t, dim=1)).sum(1).mean() for v in range(len(scores)) if v != i)
        total = total + sub / (len(scores) - 1)
    return total / n_global


def ref_dino(teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor, t_temp: float,
             s_temp: float) -> torch.Tensor:
    """DINO: H(P_t(x_i), P_s(x_v)) averaged over teacher crops i and student crops v != i."""
    terms = []
    for i, t in enumerate(teacher):
        p = F.softmax((t - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v != i:
                terms.append(-(p * F.log_softmax(s / s_temp, dim=-1)).sum(-1).mean())
    return sum(terms) / len(terms)


def ref_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al.) as DINOv2's KoLeoLoss: -mean log distance (nn.PairwiseDistance: ``|a - b + eps|``)
    of each unit vector to its nearest other one (largest inner product)."""
    x = F.normalize(x, dim=-1, eps=eps)
    dots = (x @ x.T).masked_fill(torch.eye(len(x), dtype=torch.bool), -1.0)
    nn_idx = dots.argmax(1)
    return -torch.log((x - x[nn_idx] + eps).norm(dim=-1) + eps).mean()


# -- SimCLR ------------------------------------------------------------------------------------------------------
def test_simclr_is_nt_xent_in_both_directions():
    m = _method("simclr")
    tap = _Tap(m.head)
    v = _views("two")
    loss = m.loss(v, 0, 0.0)
    z = tap.outs[0]
    ref = ref_nt_xent(*z.chunk(2), m.hp["temperature"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    _grads(loss, ref, [z])
    assert float(m.loss(_perm(v), 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)
    assert float(m.loss(v[::-1], 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)


# -- MoCo v2 -----------------------------------------------------------------------------------------------------
def test_mocov2_is_symmetrised_info_nce_against_the_queue_before_the_batch():
    m = _method("mocov2")
    bank = m.criterion.memory_bank
    queue = F.normalize(bank.bank.clone(), dim=1)  # [K, dim]
    bank.bank.copy_(queue)
    tq, tk = _Tap(m.head), _Tap(m.head_m)
    restore = _restore_after(m)
    v = _views("two")
    loss = m.loss(v, 0, 0.0)
    q0, q1 = F.normalize(tq.outs[0], dim=1).chunk(2)
    k0, k1 = F.normalize(tk.outs[0], dim=1).chunk(2)
    t = m.hp["temperature"]

    def nce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / t
        return (logits.logsumexp(1) - logits[:, 0]).mean()

    ref = 0.5 * (nce(q0, k1) + nce(q1, k0))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    _grads(loss, ref, [tq.outs[0]])
    n = len(v[0])
    torch.testing.assert_close(bank.bank[: 2 * n], torch.cat([k1, k0]))  # this batch's keys enqueued, once
    restore()
    assert float(m.loss(_perm(v), 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)
    restore()
    assert float(m.loss(v[::-1], 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)


def test_mocov2_momentum_follows_a_cosine_from_the_base_momentum_to_one():
    m = _method("mocov2")
    for p in m.head.parameters():
        p.data.add_(1.0)  # student != key encoder
    k0 = [p.clone() for p in m.head_m.parameters()]
    m.after_step(0.5)  # cosine: halfway between 0.99 and 1
    mom = 0.99 + (1 - 0.99) * 0.5
    for a, s, k in zip(m.head_m.parameters(), m.head.parameters(), k0):
        torch.testing.assert_close(a, mom * k + (1 - mom) * s)


# -- Barlow Twins ------------------------------------------------------------------------------------------------
def test_barlow_twins_is_the_papers_cross_correlation_loss():
    m = _method("barlowtwins")
    tap = _Tap(m.head)
    v = _views("two")
    loss = m.loss(v, 0, 0.0)
    z0, z1 = tap.outs
    ref = ref_barlow(z0, z1, m.hp["lambda_param"])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    _grads(loss, ref, [z0, z1])
    assert float(m.loss(_perm(v), 0, 0.0).detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(m.loss(v[::-1], 0, 0.0).detach()) == pytest.approx(float(loss.detach()), rel=1e-5)


# -- SwAV --------------------------------------------------------------------------------------------------------
def _swav(**kw):  # noqa: ANN202
    trunk = _method("swav").backbone
    args = {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8, "freeze_prototypes_steps": 0, **kw}
    return SSL_METHODS.get("swav")(trunk, trunk.num_features, (0.5,) * 3, (0.25,) * 3, **args)


@pytest.mark.parametrize("queue", [0, 8])
def test_swav_swaps_sinkhorn_codes_of_the_global_crops_over_normalised_prototypes(queue):
    m = _swav(queue_length=queue)
    with torch.no_grad():
        m.prototypes.heads[0].weight.mul_(3.0)  # not unit: the method must normalise them first
    tp, th = _Tap(m.prototypes), _Tap(m.head)
    v = _views("multicrop")
    if queue:
        m.loss(v, 0, 0.0)  # fills the queue (8 = 2 batches of 4)
        m.loss(_perm(v, 2), 0, 0.0)
        tp.outs.clear(), th.outs.clear()
        banks = [q.bank.clone() for q in m.queues]
    loss = m.loss(v, 0, 0.0)
    w = m.prototypes.heads[0].weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(len(w)))
    zs = [F.normalize(z, dim=1) for z in th.outs]
    scores = []
    for z in zs:
        scores += list((z @ w.T).chunk(len(z) // 4))
    torch.testing.assert_close(torch.cat(scores), torch.cat([o for o in tp.outs[:2]]).view(-1, 8))
    t, eps = m.hp["temperature"], m.hp["sinkhorn_epsilon"]
    if not queue:
        ref = ref_swav(scores, 2, t, eps)
    else:  # codes of crop i: Sinkhorn over this batch's and its queue's scores, kept for this batch's rows
        total = 0.0
        for i in range(2):
            both = torch.cat([scores[i].detach(), banks[i] @ w.T])
            q = ref_sinkhorn(both, eps, 3)[: len(scores[i])]
            sub = sum(-(q * F.log_softmax(scores[u] / t, dim=1)).sum(1).mean() for u in range(4) if u != i)
            total = total + sub / 3
        ref = total / 2
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    _grads(loss, ref, th.outs)
    if not queue:
        assert float(m.loss(_perm(v), 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)
        assert float(m.loss([v[1], v[0], *v[2:]], 0, 0.0).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)


def test_swav_prototypes_are_frozen_for_the_first_steps_only():
    m = _swav(freeze_prototypes_steps=3)
    v = _views("multicrop")
    m.loss(v, 2, 0.0).backward()
    assert m.prototypes.heads[0].weight.grad is None and m.head.layers[0].weight.grad is not None
    m.zero_grad()
    m.loss(v, 3, 0.0).backward()
    assert m.prototypes.heads[0].weight.grad is not None


# -- DINO --------------------------------------------------------------------------------------------------------
def test_dino_is_cross_view_distillation_with_a_centred_warmed_up_teacher():
    m = _method("dino")
    m.hp = {**m.hp, "warmup_teacher_temp": 0.02, "teacher_temp": 0.06, "warmup_teacher_temp_frac": 0.5}
    with torch.no_grad():
        m.criterion.center.normal_()
    center0 = m.criterion.center.clone()
    tt, ts = _Tap(m.teacher_head), _Tap(m.head)
    restore = _restore_after(m)
    v = _views("multicrop")
    loss = m.loss(v, 0, 0.25)  # halfway through the warm-up: 0.04
    teacher = list(tt.outs[0].chunk(2))
    student = [c for o in ts.outs for c in o.chunk(len(o) // 4)]
    ref = ref_dino(teacher, student, center0, 0.04, m.hp["student_temp"])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    _grads(loss, ref, ts.outs)
    torch.testing.assert_close(m.criterion.center, 0.9 * center0 + 0.1 * tt.outs[0].mean(0, keepdim=True))
    restore()
    assert float(m.loss(_perm(v), 0, 0.25).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)
    restore()
    assert float(m.loss([v[1], v[0], *v[2:]], 0, 0.25).detach()) == pytest.approx(float(loss.detach()), abs=1e-5)


# -- DINOv2 ------------------------------------------------------------------------------------------------------
def _dinov2_sinkhorn(x: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """DINOv2's SinkhornKnopp teacher (dinov2/loss/dino_clstoken_loss.py), single process."""
    q = torch.exp(x / temp).T
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_dinov2_is_dino_plus_masked_ibot_plus_koleo_as_in_dinov2s_code(centering):
    m = _dinov2_method(centering=centering)
    step, progress = 3, 0.1
    views = _dinov2_batch()
    tt, ts = _Tap(m.teacher_head), _Tap(m.head)
    restore = _restore_after(m)
    loss = m.loss(views, step, progress)
    n = len(views[0])
    temp = 0.04 + (0.07 - 0.04) * progress / 0.3
    grid = views[0].shape[-1] // m.patch
    mask = m.masks(2 * n, grid, step)
    assert mask.any() and not mask.all()
    t_cls, t_patch = tt.outs  # teacher head: class tokens (both global crops), then the masked patch tokens
    s_glob_in = ts.ins[0]
    s_glob, *s_loc, s_patch = ts.outs
    assert len(t_patch) == len(s_patch) == int(mask.sum())
    if centering == "sinkhorn_knopp":
        p_cls, p_patch = _dinov2_sinkhorn(t_cls, temp), _dinov2_sinkhorn(t_patch, temp)
    else:
        p_cls, p_patch = F.softmax(t_cls / temp, -1), F.softmax(t_patch / temp, -1)  # centres start at 0
    s_t = m.hp["student_temp"]
    student = list(s_glob.chunk(2)) + [c for o in s_loc for c in o.chunk(len(o) // n)]
    # DINO: 2 teacher crops x (all student crops but the same one), averaged over the (2 - 1) * 2 + 2 * n_local terms
    terms = [-(p * F.log_softmax(s / s_t, -1)).sum(-1).mean() for i, p in enumerate(p_cls.chunk(2))
             for u, s in enumerate(student) if u != i]
    dino = sum(terms) / len(terms)
    # iBOT: cross-entropy on the masked tokens only, each image's masked tokens weighted 1 / (its count), / images
    ce = -(p_patch * F.log_softmax(s_patch / s_t, -1)).sum(-1)
    w = (1.0 / mask.flatten(1).sum(1).clamp(min=1)).repeat_interleave(mask.flatten(1).sum(1))
    ibot = (ce * w).sum() / (2 * n)
    koleo = sum(ref_koleo(c) for c in s_glob_in.chunk(2))
    ref = dino + ibot + 0.1 * koleo
    assert m.last_terms["dino"] == pytest.approx(float(dino.detach()), rel=1e-5)
    assert m.last_terms["ibot"] == pytest.approx(float(ibot.detach()), rel=1e-5)
    assert m.last_terms["koleo"] == pytest.approx(float(koleo.detach()), rel=1e-5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    _grads(loss, ref, [s_glob, *s_loc, s_patch])


def test_dinov2_without_masks_is_invariant_to_batch_order_and_to_swapping_the_global_crops():
    # KoLeo off: the tiny random ViT's class tokens nearly coincide (nearest distances ~1e-11), where its log is
    # rounding-dominated and the batch order changes the last digits
    m = _dinov2_method(ibot_weight=0.0, koleo_weight=0.0)
    views = _dinov2_batch()
    restore = _restore_after(m)
    loss = float(m.loss(views, 3, 0.1).detach())
    restore()
    assert float(m.loss(_perm(views), 3, 0.1).detach()) == pytest.approx(loss, abs=1e-5)
    restore()
    assert float(m.loss([views[1], views[0], *views[2:]], 3, 0.1).detach()) == pytest.approx(loss, abs=1e-5)


def test_the_references_agree_with_lightlys_losses_on_random_inputs():
    """The paper references above, checked against lightly's losses (which the methods are built from)."""
    from lightly.loss import BarlowTwinsLoss, DINOLoss, KoLeoLoss, NTXentLoss, SwaVLoss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(NTXentLoss(temperature=0.2)(a, b), ref_nt_xent(a, b, 0.2))
    torch.testing.assert_close(BarlowTwinsLoss(lambda_param=5e-3)(a, b), ref_barlow(a, b, 5e-3))
    crops = [torch.randn(6, 7, generator=g) for _ in range(4)]
    swav = SwaVLoss(temperature=0.1, sinkhorn_epsilon=0.05)(crops[:2], crops[2:]).reshape(())
    torch.testing.assert_close(swav, ref_swav(crops, 2, 0.1, 0.05))
    center = torch.randn(1, 1, 7, generator=g)
    dino = DINOLoss(output_dim=7, teacher_temp=0.05)
    dino.center.copy_(center)
    torch.testing.assert_close(dino(crops[:2], crops, teacher_temp=0.05), ref_dino(crops[:2], crops, center, 0.05, 0.1))
    torch.testing.assert_close(KoLeoLoss()(a), ref_koleo(a))

"""Round 8 (mutation testing): loss wiring upstream of the heads, which the parity tests (recomputing each loss from
the head outputs the method produced) cannot see -- what each view / token the trunk is given, MoCo's queue as a
first-in-first-out store of the last ``queue`` keys -- and the monitor's statistics on worked-out numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gigaslide.ssl.tile.monitor import rankme, view_top1

from .test_dinov2 import _batch as _dinov2_batch
from .test_dinov2 import _method as _dinov2_method
from .test_methods import _method, _views
from .test_parity import _Tap, ref_barlow


def test_barlow_twins_embeds_each_view_in_its_own_pass():
    """Barlow Twins' reference code runs the backbone on y1 and on y2 separately, so each view's BatchNorm sees its
    own batch statistics; one pass over both views together would normalise them with shared statistics."""
    m = _method("barlowtwins").train()
    ref_m = copy.deepcopy(m)
    v = _views("two")
    loss = m.loss(v, 0, 0.0)
    with torch.no_grad():
        z0 = ref_m.head(ref_m.backbone(ref_m.prep(v[0])).flatten(1))
        z1 = ref_m.head(ref_m.backbone(ref_m.prep(v[1])).flatten(1))
        joint = ref_m.backbone(ref_m.prep(torch.cat(v))).flatten(1)
    torch.testing.assert_close(loss.detach(), ref_barlow(z0, z1, m.hp["lambda_param"]), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the distinction matters on these inputs: shared statistics give other features
        assert not torch.allclose(joint[: len(v[0])], ref_m.backbone(ref_m.prep(v[0])).flatten(1), atol=1e-4)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.float(), b.float(), compute_mode="donot_use_mm_for_euclid_dist")


def test_mocov2_queue_holds_the_last_queue_keys_first_in_first_out():
    m = _method("mocov2")  # queue 32, batch 4: each step enqueues 8 keys (both views)
    assert m.hp["queue"] == 32
    bank = m.criterion.memory_bank
    tap = _Tap(m.head_m)
    keys = []
    for seed in range(5):  # 40 keys: the queue must hold the last 32 of them, each once
        v = [x[torch.randperm(4, generator=torch.Generator().manual_seed(seed))] for x in _views("two")]
        v = [(x + 0.1 * seed).clamp(0, 1) for x in v]
        m.loss(v, seed, 0.0)
        k0, k1 = F.normalize(tap.outs[-1].detach(), dim=1).chunk(2)
        keys.append(torch.cat([k1, k0]))
    want = torch.cat(keys)[-32:]
    got = bank.bank.detach()
    assert got.shape == (32, m.hp["out_dim"])
    d = _distances(got, want)
    assert float(d.min(1).values.max()) < 1e-5 and float(d.min(0).values.max()) < 1e-5
    oldest = torch.cat(keys)[:8]  # the first step's keys have left the queue
    assert float(_distances(got, oldest).min()) > 1e-3


@pytest.mark.parametrize("name", ["test_vit_dinov2", "test_vit_dinov2_reg"])
def test_dinov2_student_masks_only_patch_tokens_before_the_position_embedding(name):
    """iBOT / DINOv2 (``prepare_tokens_with_masks``): a masked patch's embedding is replaced by the mask token before
    the position embedding is added; class and register tokens are never masked; the teacher sees the whole crop.
    Reference written with timm's own ViT parts, on the head inputs the method produced."""
    m = _dinov2_method(name)
    views = _dinov2_batch()
    step = 3
    ts, tt = _Tap(m.head), _Tap(m.teacher_head)
    with torch.no_grad():
        m.mask_token.normal_()  # a mask token unlike any patch embedding
        m.loss(views, step, 0.0)
        glob = m.prep(torch.cat(views[:2]))
        mask = m.masks(len(glob), glob.shape[-1] // m.patch, step)
        assert mask.flatten(1).any(1).any() and not mask.flatten(1).any(1).all()  # masked and unmasked crops
        vit = m.backbone
        tok = vit.patch_embed(glob)  # [n, h, w, dim] (dynamic image size)
        tok = torch.where(mask[..., None], m.mask_token.view(1, 1, 1, -1).to(tok.dtype), tok)
        tok = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(tok)))))
        flat = mask.flatten(1)
        torch.testing.assert_close(ts.ins[0], vit.forward_head(tok, pre_logits=True), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ts.ins[-1], tok[:, vit.num_prefix_tokens:][flat], rtol=1e-5, atol=1e-5)
        t_tok = m.teacher_backbone.forward_features(glob)
        torch.testing.assert_close(tt.ins[0], m.teacher_backbone.forward_head(t_tok, pre_logits=True))
        torch.testing.assert_close(tt.ins[1], t_tok[:, vit.num_prefix_tokens:][flat])


def test_rankme_is_the_exponential_entropy_of_the_normalised_singular_values():
    """Garrido et al. 2023: p_k = s_k / sum(s) (singular values, not their squares). Singular values (2, 1, 1):
    p = (1/2, 1/4, 1/4), entropy 1.5 ln 2, RankMe 2 ** 1.5 = 2.828427; (3, 1): p = (3/4, 1/4),
    exp(-(.75 ln .75 + .25 ln .25)) = 1.754765."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))  # orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    z = u[:, :3] @ torch.diag(torch.tensor([2.0, 1.0, 1.0])) @ v.T  # singular values 2, 1, 1
    assert rankme(z) == pytest.approx(2.828427, rel=1e-5)
    w, _ = torch.linalg.qr(torch.randn(2, 2, generator=g))
    z2 = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0])) @ w.T  # singular values 3, 1
    assert rankme(z2) == pytest.approx(1.754765, rel=1e-5)


def test_view_top1_asks_each_second_view_for_its_nearest_first_view():
    """Rows of ``b`` (second views) against all rows of ``a`` (first views), by cosine: b0 -> a0 (hit), b1 -> a2
    (miss), b2 -> a2 (hit): 2/3. (Asking each first view for its nearest second view instead gives 1/3.)"""
    s = 2 ** -0.5
    a = torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    assert view_top1(a, b) == pytest.approx(2 / 3)


def test_export_batchnorm_statistics_are_the_plain_average_over_all_tiles():
    """``recalibrate_bn`` (FixRes): the running statistics become the cumulative average over every tile, not an
    exponential average dominated by the last batches: with equal batches, the mean of the tiles and the average of
    the batches' unbiased variances."""
    from gigaslide.ssl.tile.monitor import recalibrate_bn

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 4, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    images[4:] += 5.0  # the last batch differs: an exponential average would lean to it
    bn = torch.nn.BatchNorm2d(3)
    trunk = torch.nn.Sequential(bn)
    assert recalibrate_bn(trunk, lambda x: x, images, batch=2) == 1
    assert not trunk.training
    torch.testing.assert_close(bn.running_mean, images.mean((0, 2, 3)))
    per_batch = torch.stack([images[i:i + 2].transpose(0, 1).flatten(1).var(1) for i in (0, 2, 4)])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0))


@pytest.mark.parametrize("iterations", [1, 5])
def test_dinov2_sinkhorn_knopp_runs_the_iterations_asked_for(iterations):
    """``--method-args sinkhorn_iterations``: the teacher's targets are DINOv2's SinkhornKnopp with that many row /
    column normalisations (the default 3 is what the parity test covers)."""
    from .test_parity import _dinov2_sinkhorn

    m = _dinov2_method(sinkhorn_iterations=iterations)
    logits = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    logits[:, :4] += 1.0
    logq, temp = m._targets(logits, 0.05)
    assert temp == 1.0
    torch.testing.assert_close(logq.exp(), _dinov2_sinkhorn(logits, 0.05, iterations), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(_dinov2_sinkhorn(logits, 0.05, iterations), _dinov2_sinkhorn(logits, 0.05, 3), atol=1e-4)

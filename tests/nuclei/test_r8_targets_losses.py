"""Review round 8: HoVer-Net training targets and losses against values worked out by hand from Graham et al. (2019)
and HoVer-Net's code (a wrong normalisation, kernel, denominator or dropped term changes these numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gigaslide.nuclei.data import hv_maps
from gigaslide.nuclei.losses import hovernet_loss, msge, soft_dice


def test_hv_maps_of_an_asymmetric_nucleus_are_scaled_per_side_from_its_centre_of_mass() -> None:
    """An L of five pixels: (x, y) = (0..3, 0) and (0, 1). Centre of mass (1.2, 0.2) (not the box centre (1.5, 0.5));
    x distances -1.2, -0.2, 0.8, 1.8 are divided by 1.2 on the left and 1.8 on the right (each side to [-1, 1] on
    its own), y distances -0.2 / 0.8 by 0.2 and 0.8. Channel 0 is horizontal (x), channel 1 vertical (y)."""
    inst = np.zeros((4, 6), np.int32)
    inst[1, 1:5] = 7
    inst[2, 1] = 7
    hv = hv_maps(inst)
    want_h = np.zeros((4, 6), np.float32)
    want_h[1, 1:5] = [-1.0, -0.2 / 1.2, 0.8 / 1.8, 1.0]
    want_h[2, 1] = -1.0
    want_v = np.zeros((4, 6), np.float32)
    want_v[1, 1:5] = -1.0
    want_v[2, 1] = 1.0
    np.testing.assert_allclose(hv[0], want_h, atol=1e-6)
    np.testing.assert_allclose(hv[1], want_v, atol=1e-6)


def _ramps(a: float, b: float, size: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([a * xx, b * yy])[None]  # [1, 2, H, W]: h = a x, v = b y


def test_msge_of_linear_ramps_is_worked_out_by_hand() -> None:
    """HoVer-Net's 5x5 kernel is ``h / (h^2 + v^2)`` (h, v in -2..2); on a ramp ``a x`` it gives
    ``a * sum(h^2 / (h^2 + v^2)) = 12 a`` (the 24 off-centre cells' h^2 / r^2 and v^2 / r^2 add to 24, half each).
    Against a zero prediction, with the focus 2 px inside the border, the loss is the mean over both channels and the
    focus pixels: ((12 a)^2 + (12 b)^2) / 2 = 72 (a^2 + b^2)."""
    a, b = 0.1, 0.2
    t = _ramps(a, b)
    focus = torch.zeros(1, 16, 16, dtype=torch.long)
    focus[0, 3:13, 2:14] = 1
    assert float(msge(torch.zeros_like(t), t, focus)) == pytest.approx(72 * (a * a + b * b), rel=1e-5)
    # a prediction with the right gradients but another offset costs nothing (MSGE sees gradients only)
    assert float(msge(t + 0.5, t, focus)) == pytest.approx(0.0, abs=1e-9)
    # only the h map wrong (a vertical ramp, no x gradient): (12 a)^2 / 2 in x, and h's y gradient is not compared
    p = t.clone()
    p[:, 0] = _ramps(0.0, 0.3)[:, 1]
    assert float(msge(p, t, focus)) == pytest.approx(72 * a * a, rel=1e-5)


def test_soft_dice_and_the_hovernet_loss_parts_by_hand() -> None:
    """NP logits (0, ln 3) everywhere: p = (0.25, 0.75). Four pixels, one background and three nuclear:
    CE = (-ln 0.25 - 3 ln 0.75) / 4; Dice per class (2 inter + eps) / (sum p + sum t + eps), summed over the 2
    classes; HV MSE the mean of the squared targets; MSGE as above; the total is the sum of the parts."""
    eps = 1e-3
    np_logits = torch.zeros(1, 2, 2, 2)
    np_logits[:, 1] = math.log(3.0)
    np_t = torch.tensor([[[0, 1], [1, 1]]])
    want_ce = (-math.log(0.25) - 3 * math.log(0.75)) / 4
    d0 = 1 - (2 * 0.25 + eps) / (4 * 0.25 + 1 + eps)  # class 0: inter 0.25, sum p 1.0, sum t 1
    d1 = 1 - (2 * 3 * 0.75 + eps) / (4 * 0.75 + 3 + eps)  # class 1: inter 2.25, sum p 3.0, sum t 3
    assert float(soft_dice(np_logits, np_t, 2)) == pytest.approx(d0 + d1, rel=1e-6)
    hv_t = torch.tensor([[[[0.5, -1.0], [0.0, 0.25]], [[1.0, 0.0], [-0.5, 0.0]]]])
    nc_logits = torch.zeros(1, 3, 2, 2)
    nc_logits[:, 2] = math.log(2.0)  # p = (0.25, 0.25, 0.5)
    nc_t = torch.tensor([[[0, 2], [1, 2]]])
    total, parts = hovernet_loss({"np": np_logits, "hv": torch.zeros(1, 2, 2, 2), "nc": nc_logits}, np_t, hv_t, nc_t)
    assert parts["np_ce"] == pytest.approx(want_ce, rel=1e-6)
    assert parts["np_dice"] == pytest.approx(d0 + d1, rel=1e-6)
    assert parts["hv_mse"] == pytest.approx((0.25 + 1 + 0 + 0.0625 + 1 + 0 + 0.25 + 0) / 8, rel=1e-6)
    assert parts["hv_msge"] == pytest.approx(float(msge(torch.zeros(1, 2, 2, 2), hv_t, np_t)), rel=1e-6)
    assert parts["hv_msge"] > 0
    assert parts["nc_ce"] == pytest.approx((-math.log(0.25) * 2 - math.log(0.5) * 2) / 4, rel=1e-6)
    nd = sum(1 - (2 * i + eps) / (s + n + eps) for i, s, n in ((0.25, 1.0, 1), (0.25, 1.0, 1), (1.0, 2.0, 2)))
    assert parts["nc_dice"] == pytest.approx(nd, rel=1e-6)
    assert float(total) == pytest.approx(sum(parts.values()), rel=1e-6) and set(parts) == {
        "np_ce", "np_dice", "hv_mse", "hv_msge", "nc_ce", "nc_dice"}


def test_summary_cis_are_the_bootstrap_of_each_statistic_written_out() -> None:
    """Image-mean and pooled PQ (and pooled mPQ) with their CIs, recomputed from the formulas on the same resamples of
    the images (:func:`bootstrap_indices`): DQ = TP / (TP + FP/2 + FN/2), SQ = IoU sum / TP; the image mean averages
    per-image PQs, pooled sums the counts first, mPQ averages the pooled PQ of each class. The images differ in size,
    so the two kinds differ and a CI filed under the other kind is caught."""
    from gigaslide.evaluation.metrics import bootstrap_indices
    from gigaslide.nuclei import metrics as M

    rows = [(40, 5, 8, 30.0), (3, 4, 1, 2.0), (10, 0, 2, 8.5), (1, 6, 6, 0.6), (25, 2, 3, 21.0), (0, 2, 3, 0.0)]
    typed = [{1: (t // 2, f, n // 2, i / 2), 2: (t - t // 2, 1, n - n // 2, i / 2)} for t, f, n, i in rows]
    stats = [M.ImageStats(t, f, n, i, per_type=p) for (t, f, n, i), p in zip(rows, typed)]

    def pq(t: float, f: float, n: float, i: float) -> float:
        return 0.0 if t == 0 else t / (t + f / 2 + n / 2) * (i / t)

    reps = []
    for idx in bootstrap_indices(len(rows), 400, 3, None, None):
        mean = np.mean([pq(*rows[k]) for k in idx])
        pooled = pq(*np.sum([rows[k] for k in idx], axis=0))
        mpq = np.mean([pq(*np.sum([typed[k][c] for k in idx], axis=0)) for c in (1, 2)])
        reps.append((mean, pooled, mpq))
    lo, hi = np.percentile(np.array(reps), [2.5, 97.5], axis=0)
    s = M.summarize(stats, n_bootstrap=400, seed=3)
    assert s["image_mean"]["pq"]["value"] == pytest.approx(np.mean([pq(*r) for r in rows]), rel=1e-12)
    assert s["pooled"]["pq"]["value"] == pytest.approx(pq(*np.sum(rows, axis=0)), rel=1e-12)
    for k, got in enumerate((s["image_mean"]["pq"], s["pooled"]["pq"], s["pooled"]["mpq"])):
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo[k], hi[k]), rel=1e-12)
    assert abs(lo[0] - lo[1]) > 0.01  # the two kinds' intervals differ here


def test_mpq_averages_only_the_classes_present() -> None:
    """A class named in the type maps but with no nucleus in either image (a stale id -> type entry) is not present:
    mPQ is the one present class's PQ (1.0), not NaN from a 0 / 0 class."""
    from gigaslide.nuclei import metrics as M

    gt = np.zeros((10, 10), np.int32)
    gt[1:5, 1:5] = 1
    st = M.image_stats(gt, gt, {1: 1, 7: 2}, {1: 1})
    assert st.per_type[1] == (1, 0, 0, 1.0)
    assert M.pooled([st])["mpq"] == 1.0
    assert M.summarize([st, st], n_bootstrap=20)["pooled"]["mpq"]["value"] == 1.0

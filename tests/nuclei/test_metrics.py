"""Nuclei metrics on hand-made label maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.nuclei import metrics as M


def _square(a: np.ndarray, y: int, x: int, s: int, v: int) -> None:
    a[y:y + s, x:x + s] = v


def test_all_hit_is_perfect_and_ids_do_not_matter() -> None:
    gt = np.zeros((20, 20), int)
    _square(gt, 1, 1, 4, 1)
    _square(gt, 10, 10, 5, 2)
    pred = np.where(gt == 1, 7, np.where(gt == 2, 3, 0))
    m = M.per_image(M.image_stats(gt, pred))
    assert m["pq"] == m["dq"] == m["sq"] == m["aji"] == m["dice"] == m["f1"] == 1.0


def test_all_miss_is_zero_not_nan() -> None:
    gt = np.zeros((20, 20), int)
    _square(gt, 1, 1, 4, 1)
    pred = np.zeros_like(gt)
    _square(pred, 12, 12, 4, 1)
    m = M.per_image(M.image_stats(gt, pred))
    assert m["pq"] == 0.0 and m["dq"] == 0.0 and m["dice"] == 0.0 and m["aji"] == 0.0 and np.isnan(m["sq"])


def test_empty_images() -> None:
    z = np.zeros((8, 8), int)
    m = M.per_image(M.image_stats(z, z))
    assert all(np.isnan(m[k]) for k in ("pq", "dq", "dice", "aji"))
    p = z.copy()
    p[2, 2] = 1  # a false positive on an image without nuclei
    m = M.per_image(M.image_stats(z, p))
    assert m["pq"] == 0.0 and m["dice"] == 0.0 and m["aji"] == 0.0
    # an empty image is left out of the image mean but its false positive counts when pooled
    gt = np.zeros((8, 8), int)
    gt[0:2, 0:2] = 1
    stats = [M.image_stats(gt, gt), M.image_stats(z, z), M.image_stats(z, p)]
    assert M.image_mean(stats[:2], "pq") == 1.0
    assert M.pooled(stats)["dq"] == pytest.approx(1 / (1 + 0.5))


def test_one_pixel_nuclei() -> None:
    gt = np.zeros((5, 5), int)
    gt[1, 1], gt[3, 3] = 1, 2
    pred = np.zeros_like(gt)
    pred[1, 1] = 5  # exact; the other missed
    st = M.image_stats(gt, pred)
    assert (st.tp, st.fp, st.fn) == (1, 0, 1)
    m = M.per_image(st)
    assert m["dq"] == pytest.approx(1 / 1.5) and m["sq"] == 1.0 and m["aji"] == pytest.approx(1 / 2)
    assert m["dice"] == pytest.approx(2 * 1 / 3)


def test_touching_nuclei_merged_by_prediction() -> None:
    """Two touching 4x4 nuclei predicted as one 4x8 blob: IoU 0.5 each -> no match (strict >), AJI 8/(32+...)."""
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4], gt[0:4, 4:8] = 1, 2
    pred = (gt > 0).astype(int)
    st = M.image_stats(gt, pred)
    assert (st.tp, st.fp, st.fn) == (0, 1, 2)
    m = M.per_image(st)
    # AJI: both gt pick the blob (IoU 0.5): C = 16 + 16, U = 32 + 32
    assert m["aji"] == pytest.approx(0.5) and m["dice"] == 1.0 and m["pq"] == 0.0


def test_partial_overlap_known_values() -> None:
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # 16 px
    pred = np.zeros_like(gt)
    pred[0:4, 1:5] = 1  # 16 px, 12 overlap -> IoU 12/20 = 0.6
    m = M.per_image(M.image_stats(gt, pred))
    assert m["sq"] == pytest.approx(0.6) and m["dq"] == 1.0 and m["pq"] == pytest.approx(0.6)
    assert m["aji"] == pytest.approx(0.6) and m["dice"] == pytest.approx(24 / 32)


def test_mpq_per_type_pooled() -> None:
    gt = np.zeros((10, 10), int)
    gt[0:3, 0:3], gt[5:8, 5:8] = 1, 2
    pred = gt.copy()
    st = M.image_stats(gt, pred, {1: 1, 2: 2}, {1: 1, 2: 1})  # second nucleus typed wrong
    p = M.pooled([st])
    assert p["pq_type1"] == pytest.approx(1 / 1.5) and p["pq_type2"] == 0.0
    assert p["mpq"] == pytest.approx((1 / 1.5 + 0.0) / 2) and p["pq"] == 1.0


def test_bootstrap_cis_bracket_and_degenerate_when_identical() -> None:
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1
    good = M.image_stats(gt, gt)
    bad_pred = np.zeros_like(gt)
    bad_pred[0:4, 1:5] = 1
    bad = M.image_stats(gt, bad_pred)
    s = M.summarize([good, good, bad, bad], n_bootstrap=300, seed=0)
    pq = s["image_mean"]["pq"]
    assert pq["value"] == pytest.approx(0.8)
    assert 0.6 <= pq["ci_low"] < 0.8 < pq["ci_high"] <= 1.0
    same = M.summarize([good, good, good], n_bootstrap=50)
    assert same["pooled"]["aji"]["ci_low"] == same["pooled"]["aji"]["ci_high"] == 1.0


def test_type_0_is_background_not_a_class_in_mpq() -> None:
    """A predicted nucleus of type 0 (NC arg-max background) is in no class's PQ (CoNIC): the one class here is
    perfect, so mPQ is 1.0; the untyped PQ still counts the extra nucleus as a false positive."""
    gt = np.zeros((20, 20), int)
    gt[0:5, 0:5] = 1
    pred = gt.copy()
    pred[10:15, 10:15] = 2
    st = M.image_stats(gt, pred, {1: 1}, {1: 1, 2: 0})
    assert st.per_type == {1: (1, 0, 0, 1.0)}
    p = M.pooled([st])
    assert p["mpq"] == 1.0 and p["pq_type1"] == 1.0 and "pq_type0" not in p
    assert p["pq"] == pytest.approx(2 / 3)
    legacy = M.ImageStats(1, 1, 0, 1.0, per_type={0: (0, 1, 0, 0.0), 1: (1, 0, 0, 1.0)})  # a type-0 entry is ignored
    assert M.pooled([legacy])["mpq"] == 1.0
    assert M.summarize([st, st], n_bootstrap=20)["pooled"]["mpq"]["value"] == 1.0


# -- parity with an independent reference of HoVer-Net's definitions (get_fast_pq, get_fast_aji, get_dice_1) --

def _reference(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Written from the definitions, object by object with boolean masks: pairs with IoU > 0.5 (each unique), DQ =
    TP / (TP + FP/2 + FN/2), SQ = mean matched IoU, PQ = DQ SQ; AJI pairs each true nucleus with its highest-IoU
    prediction (the first on ties, none when every IoU is 0) and adds unpaired predictions' areas to the union."""
    gids = [int(v) for v in np.unique(gt) if v != 0]
    pids = [int(v) for v in np.unique(pred) if v != 0]
    iou = {}
    for g in gids:
        for p in pids:
            inter = np.logical_and(gt == g, pred == p).sum()
            union = np.logical_or(gt == g, pred == p).sum()
            iou[g, p] = (inter / union, int(inter), int(union))
    pairs = [(g, p) for (g, p), (v, _, _) in iou.items() if v > 0.5]
    assert len({g for g, _ in pairs}) == len(pairs) == len({p for _, p in pairs})  # unique at IoU > 0.5
    tp, fp, fn = len(pairs), len(pids) - len(pairs), len(gids) - len(pairs)
    nan = float("nan")
    dq = tp / (tp + fp / 2 + fn / 2) if gids or pids else nan
    sq = sum(iou[k][0] for k in pairs) / tp if tp else nan
    pq = dq * sq if tp else (0.0 if gids or pids else nan)
    c = u = 0
    used = set()
    for g in gids:
        best = max(pids, key=lambda p, g=g: iou[g, p][0]) if pids else None  # max() keeps the first of ties
        if best is not None and iou[g, best][0] > 0:
            c, u = c + iou[g, best][1], u + iou[g, best][2]
            used.add(best)
        else:
            u += int((gt == g).sum())
    u += sum(int((pred == p).sum()) for p in pids if p not in used)
    fg = (gt > 0).sum() + (pred > 0).sum()
    return {"dq": dq, "sq": sq, "pq": pq, "f1": dq, "aji": c / u if u else nan,
            "dice": 2 * np.logical_and(gt > 0, pred > 0).sum() / fg if fg else nan}


def _check_parity(gt: np.ndarray, pred: np.ndarray) -> None:
    got, want = M.per_image(M.image_stats(gt, pred)), _reference(gt, pred)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12, nan_ok=True), (k, got[k], v)


def _random_instances(rng: np.random.Generator, shape=(40, 40), n=8) -> np.ndarray:  # noqa: ANN001
    """Overlapping painted discs and boxes (later ones on top), ids drawn sparse from a large range."""
    out = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in rng.choice(np.arange(1, 60000), size=n, replace=False):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 8)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        m = disc if rng.random() < 0.5 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        out[m] = i
    return out


def test_parity_with_reference_on_random_instance_maps() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        gt = _random_instances(rng, n=int(rng.integers(1, 10)))
        pred = np.roll(gt, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))  # shifted copies: IoUs around 0.5
        pred = np.where(rng.random() < 0.3, _random_instances(rng, n=3), pred)  # some unrelated predictions
        pred[pred % 5 == 0] = 0  # some nuclei missed
        _check_parity(gt, pred)
        _check_parity(gt, _random_instances(rng, n=int(rng.integers(1, 10))))


def test_parity_edge_cases() -> None:
    z = np.zeros((20, 20), np.int32)
    g = z.copy()
    g[2:12, 2:12] = 9
    half = z.copy()
    half[2:12, 2:7] = 4  # IoU exactly 50 / 100 = 0.5: not a match (strictly > 0.5)
    split = z.copy()
    split[2:12, 2:8], split[2:12, 8:12] = 30, 31  # one nucleus split in two: the larger half (IoU 0.6) matches
    sparse = np.where(g > 0, 65535, 0)
    sparse[15:18, 15:18] = 1000  # ids far from consecutive
    for gt, pred in [(g, z), (z, g), (z, z), (g, half), (g, split), (split, g), (sparse, g), (sparse, sparse)]:
        _check_parity(gt, pred)
    m = M.per_image(M.image_stats(g, half))
    assert (m["dq"], m["pq"]) == (0.0, 0.0) and np.isnan(m["sq"])
    m = M.per_image(M.image_stats(g, split))
    assert m["dq"] == pytest.approx(1 / (1 + 0.5)) and m["sq"] == pytest.approx(0.6)
    assert m["aji"] == pytest.approx(60 / (100 + 40))  # the unpaired half adds its area to the union

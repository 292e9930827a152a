import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from gigaslide.evaluation import metrics as m


def _data(c=3, n=300, seed=0):
    r = np.random.default_rng(seed)
    y = r.integers(0, c, n)
    p = r.dirichlet(np.ones(c), n)
    p[np.arange(n), y] += 0.3
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [2, 3, 5])
def test_metrics_match_sklearn(c):
    y, p = _data(c)
    ref_auc = roc_auc_score(y, p[:, 1]) if c == 2 else roc_auc_score(y, p, multi_class="ovr")
    assert m.auc(y, p) == pytest.approx(ref_auc, abs=1e-9)
    assert m.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert m.macro_f1(y, p) == pytest.approx(f1_score(y, p.argmax(1), average="macro"))


def test_auc_ties_and_vector_input():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.9])
    assert m.auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(m.auc(np.zeros(4, int), np.full(4, 0.3)))


def test_macro_f1_counts_a_class_predicted_but_absent_from_y():
    y = np.array([0, 0, 1, 1])
    p = np.eye(3)[[0, 2, 1, 1]]  # one tile of class 0 predicted as class 2, which y lacks
    assert m.macro_f1(y, p) == pytest.approx(f1_score(y, p.argmax(1), average="macro"))  # 5/9, not 5/6
    assert m.macro_f1(y, p) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_multiclass_auc_keeps_tied_scores_tied():
    # 20-NN vote fractions: rows sum to 1 up to float rounding, many scores tied
    r = np.random.default_rng(1)
    worst = 0.0
    for c in (3, 5, 8):
        y = r.integers(0, c, 400)
        votes = np.stack([np.bincount(np.where(r.random(20) < 0.4, t, r.integers(0, c, 20)), minlength=c) for t in y])
        p = votes / 20.0
        ref = np.mean([roc_auc_score(y == k, p[:, k]) for k in range(c)])  # macro OvR on the columns as given
        worst = max(worst, abs(m.auc(y, p) - ref))
    assert worst < 1e-12


def test_bootstrap_ci_contains_value_and_is_deterministic():
    y, p = _data(2, 400)
    s1 = m.summarize(y, p, n_bootstrap=300, seed=1)
    s2 = m.summarize(y, p, n_bootstrap=300, seed=1)
    assert s1 == s2
    for v in s1.values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"]
        assert v["ci_high"] - v["ci_low"] < 0.2
    lo, hi = m.bootstrap_ci(m.auc, y, p, n_bootstrap=300, seed=1)
    assert (lo, hi) == pytest.approx((s1["auc"]["ci_low"], s1["auc"]["ci_high"]))


def test_stratified_bootstrap_keeps_strata():
    strata = np.repeat([0, 1, 2], [5, 7, 3])
    idx = m.bootstrap_indices(15, 50, 0, strata)
    assert idx.shape == (50, 15)
    assert (strata[idx] == np.sort(strata)).all()


def test_perfect_and_random_golden():
    y = np.repeat([0, 1], 50)
    assert m.auc(y, y.astype(float)) == 1.0
    assert m.balanced_accuracy(y, np.full(100, 0.9)) == 0.5
    r = np.random.default_rng(3).random(100)
    assert abs(m.auc(y, r) - 0.5) < 0.12


def test_paired_difference_on_the_same_items():
    from gigaslide.evaluation.metrics import paired_difference

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    good = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 120), 0, 1)
    weak = np.clip(y * 0.1 + rng.normal(0.45, 0.2, 120), 0, 1)
    d = paired_difference(y, good, weak, "auc", n_bootstrap=400, seed=1)
    assert d["diff"] > 0.3 and d["ci_low"] > 0 and d["p_value"] <= 0.01
    back = paired_difference(y, weak, good, "auc", n_bootstrap=400, seed=1)
    assert back["diff"] == pytest.approx(-d["diff"]) and back["ci_high"] < 0
    same = paired_difference(y, good, good, "auc", n_bootstrap=100)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p_value"] == 1.0
    # two models that differ only by noise: the CI covers 0
    a = np.clip(good + rng.normal(0, 0.02, 120), 0, 1)
    b = np.clip(good + rng.normal(0, 0.02, 120), 0, 1)
    close = paired_difference(y, a, b, "auc", n_bootstrap=400)
    assert close["ci_low"] <= 0 <= close["ci_high"] and close["p_value"] > 0.05
    with pytest.raises(ValueError, match="same 120 items"):
        paired_difference(y, good, weak[:10])


def test_bootstrap_replicates_is_the_one_loop_and_respects_strata():
    from gigaslide.evaluation.metrics import bootstrap_replicates, percentile_ci

    x = np.array([0.0, 0.0, 10.0, 10.0])
    strata = np.array([0, 0, 1, 1])
    reps = bootstrap_replicates(lambda i: x[i].mean(), 4, n_bootstrap=200, seed=0, strata=strata)
    assert np.all(reps == 5.0)  # each stratum resampled within itself: the mean cannot move
    free = bootstrap_replicates(lambda i: x[i].mean(), 4, n_bootstrap=200, seed=0)
    assert free.min() < 5.0 < free.max()
    assert np.isnan(percentile_ci(np.array([np.nan, np.nan]))[0])
    assert percentile_ci(np.array([1.0, np.nan, 2.0])) == pytest.approx((1.025, 1.975))
    assert bootstrap_replicates(lambda i: 1.0, 4, n_bootstrap=0).shape == (0,)


def test_cluster_bootstrap_draws_whole_groups_within_strata():
    """groups (patients): a replicate is whole groups, drawn within their stratum; groups of one item give the same
    indices as no groups (slide-level CIs of one-slide patients do not move); a group spanning strata is its own."""
    strata = np.repeat([0, 1, 2], [5, 7, 3])
    singles = [f"p{i}" for i in range(15)]
    assert np.array_equal(np.stack(m.bootstrap_indices(15, 40, 3, strata, groups=singles)),
                          m.bootstrap_indices(15, 40, 3, strata))
    assert np.array_equal(np.stack(m.bootstrap_indices(15, 40, 3, groups=singles)), m.bootstrap_indices(15, 40, 3))
    groups = np.array(["a", "a", "a", "b", "b", "c", "c", "c", "c", "d", "e", "e", "f", "g", "g"])
    for idx in m.bootstrap_indices(15, 200, 0, strata, groups=groups):
        drawn = groups[idx]
        for g in set(drawn):  # every member of a drawn group, as many times as the group was drawn
            assert np.sum(drawn == g) % np.sum(groups == g) == 0
        assert {*groups[idx[strata[idx] == 0]]} <= {"a", "b"} and {*groups[idx[strata[idx] == 2]]} <= {"f", "g"}
        assert sum(np.sum(drawn == g) // np.sum(groups == g) for g in "ab") == 2  # stratum 0 keeps its 2 groups
    mixed = m.bootstrap_indices(4, 50, 0, np.array([0, 1, 0, 1]), groups=["a", "a", "b", "c"])
    assert all(sorted(i.tolist()).count(0) == sorted(i.tolist()).count(1) for i in mixed)


def test_a_patient_bootstrap_is_as_wide_as_one_slide_per_patient():
    """Five identical slides per patient carry the information of one: resampling slides gave a CI ~sqrt(5) too
    narrow; resampling patients gives exactly the one-slide-per-patient CI."""
    y, p = _data(2, 60, seed=4)
    y5, p5 = np.repeat(y, 5), np.repeat(p, 5, axis=0)
    pats = np.repeat([f"p{i:02d}" for i in range(60)], 5)
    one = m.summarize(y, p, n_bootstrap=300, seed=2)
    per_patient = m.summarize(y5, p5, n_bootstrap=300, seed=2, groups=pats)
    per_slide = m.summarize(y5, p5, n_bootstrap=300, seed=2)
    for k in one:
        assert (per_patient[k]["ci_low"], per_patient[k]["ci_high"]) == pytest.approx(
            (one[k]["ci_low"], one[k]["ci_high"]))
    width = one["auc"]["ci_high"] - one["auc"]["ci_low"]
    assert per_slide["auc"]["ci_high"] - per_slide["auc"]["ci_low"] < 0.6 * width
    d = m.paired_difference(y5, p5, np.full_like(p5, 0.5), "auc", n_bootstrap=200, seed=1, groups=pats)
    d1 = m.paired_difference(y, p, np.full_like(p, 0.5), "auc", n_bootstrap=200, seed=1)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((d1["ci_low"], d1["ci_high"])) and d["resampled"] == "groups"


def test_replicates_where_auc_is_undefined_are_counted_not_silently_dropped():
    """3 positives in 60: about 1 resample in 20 draws none, where AUC is undefined. Those replicates were left out of
    the CI with no trace (the report said B=1000 over all of them); they are now counted, and a class-stratified
    bootstrap (``strata=y``) has none."""
    y = np.r_[np.zeros(57, int), np.ones(3, int)]
    p = np.random.default_rng(0).random(60) * 0.8 + 0.3 * y
    r = np.random.default_rng(0)  # the resamples written out: bootstrap_indices' unstratified draw
    n_undefined = int(sum(len(np.unique(y[i])) < 2 for i in r.integers(0, 60, size=(1000, 60))))
    assert n_undefined > 0
    s = m.summarize(y, p, n_bootstrap=1000, seed=0)
    assert s["auc"]["undefined_replicates"] == n_undefined and "undefined_replicates" not in s["balanced_accuracy"]
    d = m.paired_difference(y, p, np.clip(p + 0.1 * (1 - y), 0, 1), "auc", n_bootstrap=1000, seed=0)
    assert d["undefined_replicates"] == n_undefined
    assert "undefined_replicates" not in m.summarize(y, p, n_bootstrap=1000, seed=0, strata=y)["auc"]

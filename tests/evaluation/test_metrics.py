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

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation.compare import compare_reports, comparison_markdown, verdict
from gigaslide.evaluation.metrics import METRICS, paired_difference


def _probs(y, strength, seed):
    r = np.random.default_rng(seed)
    s = strength * (2 * y - 1) + r.normal(size=len(y))
    p1 = 1 / (1 + np.exp(-s))
    return np.stack([1 - p1, p1], 1)


def test_draws_are_averaged_and_one_draw_is_the_plain_comparison():
    y = np.arange(200) % 2
    a = np.stack([_probs(y, 1.5, s) for s in range(3)])  # 3 draws
    b = _probs(y, 0.5, 9)
    d = paired_difference(y, a, b, "auc", n_bootstrap=200, seed=1)
    want = np.mean([METRICS["auc"](y, x) for x in a]) - METRICS["auc"](y, b)
    assert d["diff"] == pytest.approx(want) and d["ci_low"] > 0
    one = paired_difference(y, a[:1], b, "balanced_accuracy", n_bootstrap=200, seed=1)
    plain = paired_difference(y, a[0], b, "balanced_accuracy", n_bootstrap=200, seed=1)
    assert one == plain
    with pytest.raises(ValueError, match="same 200 items"):
        paired_difference(y, a[:, :100], b)


def _report(fp, y, probs, path="t"):
    return {"test": {"fingerprint": fp, "path": path, "n": len(y)}, "test_labels": y, "test_probs": probs}


def test_reports_are_compared_only_on_the_same_recorded_tiles():
    y = np.arange(100) % 2
    good, weak = _probs(y, 2.0, 0), _probs(y, 0.2, 1)
    here = _report("abc", y, {"linear": good, "knn": weak})
    diffs = compare_reports(here, _report("abc", y, {"linear": weak, "fewshot_1%": weak[None]}), n_bootstrap=100)
    assert list(diffs) == ["linear"]  # the protocol both have
    assert diffs["linear"]["auc"]["diff"] == pytest.approx(METRICS["auc"](y, good) - METRICS["auc"](y, weak))
    assert verdict(diffs["linear"]["balanced_accuracy"]) == "better"
    md = comparison_markdown(diffs, "rep_b")
    assert "| linear | +" in md and "better" in md and "rep_b" in md
    with pytest.raises(GigaslideError, match="other tiles"):
        compare_reports(here, _report("xyz", y, {"linear": weak}), fix_tiles="embed the same folder")
    with pytest.raises(GigaslideError, match="no record of which tiles"):
        compare_reports(here, _report(None, y, {"linear": weak}))
    with pytest.raises(GigaslideError, match="no protocol in common"):
        compare_reports(here, _report("abc", y, {"fewshot_1%": weak[None]}))
    assert verdict({"ci_low": -0.2, "ci_high": -0.01}) == "worse"
    assert verdict({"ci_low": -0.2, "ci_high": 0.01}) == "not distinguishable"


def test_draws_are_resampled_with_one_index_when_both_sides_drew_the_same_subsets():
    """Identical draws on both sides: 0 whatever the resampling when paired; resampled apart, the draws' spread
    shows in the CI. A draw-resampling replicate that kept every draw would give 0 here too: this could fail."""
    y = np.arange(300) % 2
    draws = np.stack([_probs(y, s, k) for k, s in enumerate((0.1, 0.5, 1.0, 2.0, 4.0))])  # very different draws
    paired = paired_difference(y, draws, draws.copy(), "auc", n_bootstrap=200, draws="paired")
    assert paired["diff"] == 0.0 and paired["ci_low"] == 0.0 and paired["ci_high"] == 0.0
    apart = paired_difference(y, draws, draws.copy(), "auc", n_bootstrap=200, draws="independent")
    assert apart["diff"] == 0.0 and apart["ci_high"] - apart["ci_low"] > 0.1 and apart["draws"] == "independent"
    with pytest.raises(ValueError, match="as many draws"):
        paired_difference(y, draws, draws[:2], draws="paired")


def test_few_shot_draws_are_paired_only_for_the_same_training_tiles_and_seed():
    y = np.arange(100) % 2
    a, b = np.stack([_probs(y, 1.0, k) for k in range(3)]), np.stack([_probs(y, 0.5, k + 9) for k in range(3)])
    here = {**_report("abc", y, {"fewshot_1%": a, "linear": a[0]}), "train": {"fingerprint": "tr"}, "seed": 0}
    same = {**_report("abc", y, {"fewshot_1%": b, "linear": b[0]}), "train": {"fingerprint": "tr"}, "seed": 0}
    d = compare_reports(here, same, n_bootstrap=50)
    assert d["fewshot_1%"]["auc"]["draws"] == "paired" and d["linear"]["auc"]["draws"] == "fixed"
    for other in ({"train": {}}, {"seed": 1}):  # training tiles not recorded on one side, or another seed
        d = compare_reports(here, {**same, **other}, n_bootstrap=50)
        assert d["fewshot_1%"]["auc"]["draws"] == "independent"
    assert "resample the draws too (the same draws on both sides)" in comparison_markdown(
        compare_reports(here, same, n_bootstrap=50), "b")


def test_probes_trained_on_other_tiles_are_refused_and_tiles_resampled_within_classes():
    """Two encoders' probes trained on other training tiles differ in their labels too: refused (they were compared
    as if only the encoder differed). The paired bootstrap resamples the test tiles within each class, as the CIs
    do: with 3 positives in 60, an unstratified resample without a positive made AUC undefined."""
    y = np.r_[np.zeros(57, int), np.ones(3, int)]
    a, b = _probs(y, 1.0, 0), _probs(y, 0.3, 1)
    here = {**_report("abc", y, {"linear": a}), "train": {"fingerprint": "tr", "path": "a_tr.h5", "n": 300}}
    base = {**_report("abc", y, {"linear": b}), "train": {"fingerprint": "tr2", "path": "b_tr.h5", "n": 300}}
    with pytest.raises(GigaslideError, match="b_tr.h5: trained on other tiles|trained on other tiles.*b_tr.h5"):
        compare_reports(here, base, path="b_tr.h5", fix_train="embed the same folder")
    d = compare_reports(here, {**base, "train": here["train"]}, n_bootstrap=300, seed=2)["linear"]["auc"]
    want = paired_difference(y, a, b, "auc", n_bootstrap=300, seed=2, strata=y)
    assert (d["ci_low"], d["ci_high"]) == (want["ci_low"], want["ci_high"]) and "undefined_replicates" not in d
    assert "undefined_replicates" in paired_difference(y, a, b, "auc", n_bootstrap=300, seed=2)  # unstratified

"""Round 8 (mutation testing): the bootstrap's p-value and CI, and the slide evaluation's resampling within folds,
recomputed independently (sklearn's AUC over the resamples written out), so that a slip in the code (an undoubled
two-sided p, a CI over the wrong percentiles, a bootstrap that ignores the folds) fails a test."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gigaslide.evaluation import metrics as m


def test_paired_difference_p_value_and_ci_are_the_two_sided_bootstrap_written_out():
    """Unstratified paired bootstrap: replicate b draws n items with replacement (``default_rng(seed).integers``,
    as :func:`bootstrap_indices` documents) for both models; the CI is the 2.5 / 97.5 percentiles of AUC(a) - AUC(b)
    and p twice the smaller share of replicates on either side of 0."""
    r = np.random.default_rng(7)
    n, B, seed = 80, 400, 3
    y = np.repeat([0, 1], n // 2)
    a = y * 0.5 + r.normal(0, 0.5, n)
    b = y * 0.5 + r.normal(0, 0.5, n)  # as good as a: the difference is noise, p well inside (0, 1)
    got = m.paired_difference(y, a, b, "auc", n_bootstrap=B, seed=seed)
    reps = []
    for i in np.random.default_rng(seed).integers(0, n, size=(B, n)):
        reps.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    reps = np.asarray(reps)
    p = 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))
    assert 0.02 < p < 0.5  # neither floored at 1/B nor capped at 1: halving or doubling p shows
    assert got["p_value"] == pytest.approx(p, abs=1e-12)
    assert got["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), abs=1e-12)


def test_slide_evaluation_resamples_slides_within_each_fold(tmp_path, monkeypatch):
    """evaluate_predictions' CI resamples slides within folds: every bootstrap replicate holds each fold's number of
    slides (folds of 6, 10 and 4 slides here), and only that fold's slides in those places. Each slide is told apart
    by its own prob_1, so the slides a replicate scored can be read back."""
    from gigaslide.evaluation.slides import evaluate_predictions, write_predictions

    sizes = [6, 10, 4]
    folds = np.repeat([0, 1, 2], sizes)
    n = len(folds)
    y = np.arange(n) % 2
    p1 = (np.arange(n) + 0.5) / (n + 1)  # unique per slide
    probs = np.stack([1 - p1, p1], 1)
    path = write_predictions(tmp_path / "p.csv", [f"s{i}" for i in range(n)], y, probs, folds.tolist())
    seen = []
    real = m.METRICS["auc"]

    def spy(yy, pp):  # noqa: ANN001, ANN202
        seen.append(np.asarray(pp)[:, 1].copy())
        return real(yy, pp)

    monkeypatch.setitem(m.METRICS, "auc", spy)
    evaluate_predictions(path, n_bootstrap=50, seed=0)
    fold_of = {round(float(v), 9): int(f) for v, f in zip(p1, folds)}
    reps = [s for s in seen if len(s) == n][1:]  # the value on all slides first, then the replicates
    assert len(reps) >= 50
    for s in reps[:50]:
        counts = np.bincount([fold_of[round(float(v), 9)] for v in s], minlength=3)
        assert counts.tolist() == sizes


def test_few_shot_draws_are_distinct_tiles_and_each_repeat_draws_anew(monkeypatch):
    """Each few-shot draw takes distinct training tiles (``n/class``: n of each class, all of a class that has fewer;
    ``p%``: round(p % of the tiles), every class present), and the repeats are different draws (a repeat that drew
    the same labels again would make the std over draws and the draw resampling of the CI meaningless)."""
    from gigaslide.evaluation import tiles as T

    r = np.random.default_rng(0)
    ytr = np.repeat([0, 1, 2], [30, 12, 4])
    xtr = r.normal(size=(46, 5)) + ytr[:, None]
    yte = np.repeat([0, 1, 2], 10)
    xte = r.normal(size=(30, 5)) + yte[:, None]
    seen = []
    real = T._few_shot_indices

    def spy(y, setting, rng):  # noqa: ANN001, ANN202
        idx = real(y, setting, rng)
        seen.append((setting, np.asarray(idx)))
        return idx

    monkeypatch.setattr(T, "_few_shot_indices", spy)
    T.few_shot(xtr, ytr, xte, yte, 3, settings=("5/class", "10%"), repeats=4, n_bootstrap=0)
    assert [s for s, _ in seen] == ["5/class"] * 4 + ["10%"] * 4
    for setting, idx in seen:
        assert len(set(idx.tolist())) == len(idx)  # no tile twice
        if setting == "5/class":
            assert np.bincount(ytr[idx], minlength=3).tolist() == [5, 5, 4]
        else:
            assert len(idx) == 5 and set(ytr[idx].tolist()) == {0, 1, 2}  # round(0.1 * 46)
    for setting in ("5/class", "10%"):
        assert len({frozenset(idx.tolist()) for s, idx in seen if s == setting}) == 4


def test_tile_probe_cis_resample_the_test_tiles_within_each_class(monkeypatch):
    """The linear and k-NN probes' CIs resample test tiles within their class: every replicate scores the test
    set's class counts (here 25 / 8 / 3), so no replicate loses the rare class."""
    from gigaslide.evaluation.tiles import evaluate_tile_features

    r = np.random.default_rng(1)
    ytr = np.repeat([0, 1, 2], [40, 20, 10])
    yte = np.repeat([0, 1, 2], [25, 8, 3])
    xtr, xte = r.normal(size=(70, 4)) + ytr[:, None], r.normal(size=(36, 4)) + yte[:, None]
    counts = []
    real = m.METRICS["auc"]

    def spy(yy, pp):  # noqa: ANN001, ANN202
        counts.append(np.bincount(np.asarray(yy), minlength=3).tolist())
        return real(yy, pp)

    monkeypatch.setitem(m.METRICS, "auc", spy)
    evaluate_tile_features((xtr, ytr), (xte, yte), "linear,knn", n_bootstrap=40, seed=0)
    assert len(counts) == 2 * (1 + 40)  # each probe: the value, then its replicates
    assert all(c == [25, 8, 3] for c in counts)


def test_multiclass_auc_averages_the_classes_present_only():
    """Three-class probabilities on a test set holding classes 0 and 2 only: the macro one-vs-rest AUC is the mean
    of those two classes' AUCs (sklearn's, on their own columns), not NaN for the absent class 1."""
    r = np.random.default_rng(2)
    y = np.repeat([0, 2], [15, 11])
    p = r.dirichlet(np.ones(3), len(y))
    p[np.arange(len(y)), y] += 0.2
    want = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 2)])
    assert m.auc(y, p) == pytest.approx(want, abs=1e-12)


def test_the_validation_split_takes_the_fraction_asked_for():
    """50 one-slide patients, 25 per class: fraction 0.2 carves 10 validation slides (5 per class), 0.5 carves 25."""
    from gigaslide.evaluation.splits import validation_split

    y = np.arange(50) % 2
    for fraction, n_val in ((0.2, 10), (0.25, 12), (0.5, 25)):
        tr, va = validation_split(np.arange(50), y, [f"p{i}" for i in range(50)], fraction=fraction, seed=0)
        assert len(va) in (n_val, n_val + 1) and abs(int(y[va].sum()) - len(va) / 2) <= 1
        assert sorted(np.r_[tr, va].tolist()) == list(range(50))

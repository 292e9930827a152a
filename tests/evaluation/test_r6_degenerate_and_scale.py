"""Review round 6: one-class inputs (AUC undefined: said, not nan) and the slide k-NN probe on large cohorts."""

import tracemalloc

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation import slides as SL
from gigaslide.evaluation.slides import evaluate_predictions, evaluation_markdown, knn_probe_slides
from gigaslide.evaluation.splits import make_folds
from gigaslide.evaluation.tiles import evaluate_tile_features


def _csv(path, rows):
    path.write_text("slide_id,label,prob_0,prob_1,fold\n" + "".join(f"{r}\n" for r in rows))
    return path


def test_predictions_of_one_class_are_refused_not_scored_nan(tmp_path, cli, capsys):
    p = _csv(tmp_path / "one.csv", ["a,1,0.2,0.8,0", "b,1,0.6,0.4,0", "c,1,0.1,0.9,1", "d,1,0.0,1.0,1"])
    with pytest.raises(GigaslideError, match=r"every predicted slide \(4 rows\) has label 1: AUC is undefined"):
        evaluate_predictions(p, n_bootstrap=10)
    assert cli(["evaluate", "slides", "--predictions", str(p), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err
    assert "AUC is undefined on one class" in err and "Traceback" not in err
    assert not (tmp_path / "evaluation.json").exists()  # no NaN result written
    with pytest.raises(GigaslideError, match="AUC is undefined on one class"):
        SL.compare_predictions(p, p, n_bootstrap=10)


def test_folds_of_one_class_each_say_so_instead_of_nan(tmp_path):
    p = _csv(tmp_path / "two.csv", ["a,1,0.2,0.8,0", "b,1,0.6,0.4,0", "c,0,0.1,0.9,1", "d,0,0.7,0.3,1"])
    res = evaluate_predictions(p, n_bootstrap=10)
    md = evaluation_markdown(res)
    auc_row = next(line for line in md.splitlines() if line.startswith("| auc"))
    assert "nan" not in auc_row and "undefined: every test fold has one class" in auc_row
    assert res["metrics"]["auc"]["value"] == pytest.approx(0.5)  # pooled: a, b over d; c over both


def test_tile_evaluation_refuses_a_test_set_of_one_class():
    r = np.random.default_rng(0)
    x, y = r.normal(size=(60, 4)), np.arange(60) % 2
    with pytest.raises(GigaslideError, match=r"every test tile \(20\) has label 1: AUC is undefined on one class"):
        evaluate_tile_features((x, y), (x[:20], np.ones(20, int)), "knn", n_bootstrap=5)


def _reference_knn(X, y, folds, k, n_classes):
    """The probe as first written: a stable full sort of every test slide's similarities."""
    Xn = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    probs = np.zeros((len(y), n_classes))
    for tr, te in folds:
        kk = SL.knn_k(k, len(tr))
        nn = np.argsort(-np.round(Xn[te] @ Xn[tr].T, 12), axis=1, kind="stable")[:, :kk]
        probs[te] = np.stack([np.bincount(v, minlength=n_classes) for v in y[tr][nn]]) / kk
    return probs


@pytest.mark.parametrize("chunk", [1, 7, 1 << 40])
def test_slide_knn_blocks_give_the_stable_sort_s_neighbours(monkeypatch, chunk):
    r = np.random.default_rng(3)
    X = r.integers(-1, 2, size=(90, 2)).astype(float)  # many equal similarities: ties go to the earlier slide
    y = np.arange(90) % 3
    folds = make_folds(y, None, 3, 0)
    monkeypatch.setattr(SL, "KNN_CHUNK", chunk)
    for k in (1, 4, 20):
        got = knn_probe_slides(X, y, folds, k=k).probs
        assert np.array_equal(got, _reference_knn(X, y, folds, k, 3)), k


def test_slide_knn_memory_does_not_grow_with_test_x_training_slides(monkeypatch):
    """It held the [n_test, n_train] similarities, their negation and a full argsort at once: 2 GB for 20,000
    slides (and 2 minutes); now a block of KNN_CHUNK similarities at a time (20,000 slides: 0.35 GB, 22 s)."""
    n = 3000
    r = np.random.default_rng(0)
    X, y = r.normal(size=(n, 16)), np.arange(n) % 2
    folds = make_folds(y, None, 5, 0)
    monkeypatch.setattr(SL, "KNN_CHUNK", 1 << 15)  # 0.25 MB of similarities
    tracemalloc.start()
    try:
        knn_probe_slides(X, y, folds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6e6, peak  # the whole-fold version: 600 x 2400 x 8 B x 3 = 35 MB

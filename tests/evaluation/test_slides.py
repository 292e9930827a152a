import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation import slides as E
from gigaslide.evaluation.splits import make_folds


def _preds(tmp_path, n=60, c=2, seed=0, folds=3, good=True):
    r = np.random.default_rng(seed)
    y = np.arange(n) % c
    p = r.dirichlet(np.ones(c), n)
    if good:
        p[np.arange(n), y] += 1.0
    p /= p.sum(1, keepdims=True)
    ids = [f"s{i}" for i in range(n)]
    for k in range(folds):
        m = np.arange(n) % folds == k
        E.write_predictions(tmp_path / f"fold{k}" / "predictions.csv", [i for i, mm in zip(ids, m) if mm], y[m], p[m], k)
    return ids, y, p


def test_roundtrip_and_metrics(tmp_path):
    ids, y, p = _preds(tmp_path)
    pred = E.read_predictions(tmp_path)
    assert len(pred.slide_ids) == 60 and pred.n_classes == 2
    res = E.evaluate_predictions(tmp_path, n_bootstrap=200, out=tmp_path)
    auc = res["metrics"]["auc"]
    assert auc["value"] > 0.95 and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert res["n_folds"] == 3 and res["class_counts"] == [30, 30]
    assert (tmp_path / "evaluation.md").read_text().startswith("# Slide-level evaluation")


def test_multiclass_random_is_chance(tmp_path):
    _preds(tmp_path, n=300, c=4, good=False)
    res = E.evaluate_predictions(tmp_path, n_bootstrap=100)
    assert abs(res["metrics"]["auc"]["value"] - 0.5) < 0.08
    assert res["metrics"]["auc"]["ci_low"] < 0.5 + 0.08


def test_repeats_average(tmp_path):
    ids = ["a", "b", "c", "d"]
    y = [0, 1, 0, 1]
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    bad = good[:, ::-1]
    import csv
    with open(tmp_path / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "prob_0", "prob_1", "fold", "repeat"])
        for rep, p in ((0, good), (1, bad)):
            for i in range(4):
                w.writerow([ids[i], y[i], *p[i], i % 2, rep])
    res = E.evaluate_predictions(tmp_path, n_bootstrap=0)
    assert res["n_repeats"] == 2 and res["metrics"]["auc"]["value"] == pytest.approx(0.5)


def test_bad_prediction_files(tmp_path):
    (tmp_path / "predictions.csv").write_text("slide_id,label,prob_0,prob_1\na,0,0.5,0.5\n")
    with pytest.raises(GigaslideError, match="missing column"):
        E.read_predictions(tmp_path)
    (tmp_path / "predictions.csv").write_text("slide_id,label,prob_0,prob_1,fold\na,0,0.5,0.5,0\na,1,0.5,0.5,1\n")
    with pytest.raises(GigaslideError, match="predicted twice"):
        E.read_predictions(tmp_path)
    with pytest.raises(GigaslideError, match="not found"):
        E.read_predictions(tmp_path / "nope")


def test_linear_probe_slides(tmp_path):
    r = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    X = r.normal(size=(60, 5)) + y[:, None] * 2.0
    folds = make_folds(y, None, 5, seed=0)
    pred = E.linear_probe_slides(X, y, folds, out_csv=tmp_path / "predictions.csv")
    res = E.evaluate_predictions(tmp_path, n_bootstrap=50)
    assert res["metrics"]["auc"]["value"] > 0.95 and res["n_slides"] == 60 and len(pred.slide_ids) == 60


def test_cli_evaluate_slides(tmp_path, cli, capsys):
    _preds(tmp_path)
    assert cli(["evaluate", "slides", "--predictions", str(tmp_path), "--bootstrap", "50"]) == 0
    assert "auc" in capsys.readouterr().out and (tmp_path / "evaluation.json").is_file()


def test_linear_probe_run_few_shot(tmp_path):
    r = np.random.default_rng(1)
    n = 40
    y = np.arange(n) % 2
    emb = {f"s{i}": r.normal(size=6) + 2.5 * y[i] for i in range(n)}
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,patient_id,label\n" + "".join(f"s{i},p{i // 2},{y[i]}\n" for i in range(n)))
    res = E.linear_probe_run(emb, lab, tmp_path / "run", folds=4, train_slides=10, repeats=3, n_bootstrap=50)
    assert res["n_repeats"] == 3 and res["n_slides"] == n and res["metrics"]["auc"]["value"] > 0.9
    assert (tmp_path / "run" / "splits.json").is_file()
    emb["s0"] = np.zeros(3)
    with pytest.raises(GigaslideError, match="different sizes"):
        E.linear_probe_run(emb, lab, tmp_path / "run2", folds=4)
    del emb["s0"]
    with pytest.raises(GigaslideError, match="have no features: s0"):
        E.linear_probe_run(emb, lab, tmp_path / "run3", folds=4)

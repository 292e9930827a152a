import json

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation.tiles import evaluate_tile_features
from gigaslide.features import store


def _split(n, seed, sep=1.5, d=8, c=2):
    r = np.random.default_rng(seed)
    y = r.integers(0, c, n)
    centers = np.random.default_rng(99).normal(size=(c, d)) * sep
    return (centers[y] + r.normal(size=(n, d))).astype(np.float32), y


def test_separable_vs_random_features(tmp_path):
    rep = evaluate_tile_features(_split(300, 0), _split(200, 1), ["linear", "knn"], n_bootstrap=100, out=tmp_path / "r")
    for p in ("linear", "knn"):
        assert rep["protocols"][p]["auc"]["value"] > 0.95
        assert rep["protocols"][p]["auc"]["ci_low"] <= rep["protocols"][p]["auc"]["value"]
    X, y = _split(300, 0)
    Xt, yt = _split(200, 1)
    rnd = evaluate_tile_features((np.random.default_rng(5).normal(size=X.shape), y), (Xt, yt), "linear", n_bootstrap=50)
    assert abs(rnd["protocols"]["linear"]["auc"]["value"] - 0.5) < 0.12
    assert json.loads((tmp_path / "r" / "report.json").read_text())["protocols"]["linear"]["C"] > 0
    assert (tmp_path / "r" / "report.png").stat().st_size > 1000
    assert "| linear |" in (tmp_path / "r" / "report.md").read_text()


def test_fewshot_multiclass_from_files(tmp_path):
    for name, seed, n in (("tr", 0, 400), ("te", 1, 150)):
        X, y = _split(n, seed, c=3)
        store.save(tmp_path / f"{name}.h5", X, labels=y, attrs={"encoder": "toy"})
    rep = evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "te.h5"), "fewshot", n_bootstrap=30, fewshot_repeats=2)
    fs = rep["protocols"]
    assert set(fs) == {"fewshot_1%", "fewshot_10%", "fewshot_1/class", "fewshot_5/class", "fewshot_10/class"}
    assert fs["fewshot_1/class"]["n_labels"] == 3 and fs["fewshot_10%"]["n_labels"] == 40
    assert fs["fewshot_10%"]["auc"]["value"] > fs["fewshot_1/class"]["auc"]["value"] - 0.05
    assert fs["fewshot_10%"]["auc"]["value"] > 0.9


def test_bad_inputs(tmp_path):
    X, y = _split(50, 0)
    store.save(tmp_path / "nolab.h5", X)
    with pytest.raises(GigaslideError, match="no 'labels'"):
        evaluate_tile_features(store.load(tmp_path / "nolab.h5"), (X, y))
    with pytest.raises(GigaslideError, match="8-d but test features are 4-d"):
        evaluate_tile_features((X, y), (X[:, :4], y))
    with pytest.raises(GigaslideError, match="unknown protocol"):
        evaluate_tile_features((X, y), (X, y), "svm")
    with pytest.raises(GigaslideError, match="single class"):
        evaluate_tile_features((X, np.zeros_like(y)), (X, y))
    # a class with one training tile, or too few tiles for the linear probe's stratified validation split: one line
    # naming the file (was sklearn's ValueError traceback); the probes without that split still run
    y1 = y.copy()
    y1[0] = 2
    store.save(tmp_path / "rare.h5", X, labels=y1, attrs={"encoder": "toy"})
    with pytest.raises(GigaslideError, match=r"rare\.h5: class\(es\) 2 have 1 training tile.*fix:"):
        evaluate_tile_features(store.load(tmp_path / "rare.h5"), (X, y1), "linear,knn", n_bootstrap=0)
    with pytest.raises(GigaslideError, match="9 training tiles of 3 classes"):
        evaluate_tile_features((X[:9], np.arange(9) % 3), (X, y), "linear", n_bootstrap=0)
    assert "knn" in evaluate_tile_features(store.load(tmp_path / "rare.h5"), (X, y1), "knn", n_bootstrap=0)["protocols"]
    store.save(tmp_path / "a.h5", X, labels=y, attrs={"encoder": "a"})
    store.save(tmp_path / "b.h5", X, labels=y, attrs={"encoder": "b"})
    with pytest.raises(GigaslideError, match="differs from test encoder"):
        evaluate_tile_features(store.load(tmp_path / "a.h5"), store.load(tmp_path / "b.h5"))


def test_cli_evaluate_tiles(tmp_path, cli, capsys):
    for name, seed in (("tr", 0), ("te", 1)):
        X, y = _split(200, seed)
        store.save(tmp_path / f"{name}.h5", X, labels=y, attrs={"encoder": "toy"})
    rc = cli(["evaluate", "tiles", "--train", str(tmp_path / "tr.h5"), "--test", str(tmp_path / "te.h5"),
              "--protocol", "knn", "--bootstrap", "20", "--out", str(tmp_path / "rep")])
    assert rc == 0 and (tmp_path / "rep" / "report.json").is_file()
    assert cli(["evaluate", "tiles", "--train", str(tmp_path / "missing.h5"), "--test", str(tmp_path / "te.h5"),
                "--out", str(tmp_path / "rep")]) == 2
    assert "feature file not found" in capsys.readouterr().err


def _saved_pair(tmp_path, fp_b="tiles-1"):
    """Encoder a (informative features) and b (noise) on the same recorded test tiles."""
    X, y = _split(300, 0)
    Xt, yt = _split(200, 1)
    noise = np.random.default_rng(5)
    for name, tr, te, fp in (("a", X, Xt, "tiles-1"),
                             ("b", noise.normal(size=X.shape), noise.normal(size=Xt.shape), fp_b)):
        store.save(tmp_path / f"{name}_tr.h5", tr.astype(np.float32), labels=y, attrs={"encoder": name})
        store.save(tmp_path / f"{name}_te.h5", te.astype(np.float32), labels=yt,
                   attrs={"encoder": name, **({"tiles_fingerprint": fp} if fp else {})})
    return yt


def _args(tmp_path, name, *extra):
    return ["evaluate", "tiles", "--train", str(tmp_path / f"{name}_tr.h5"), "--test", str(tmp_path / f"{name}_te.h5"),
            "--protocol", "linear,knn,fewshot", "--fewshot-repeats", "2", "--bootstrap", "100",
            "--out", str(tmp_path / f"rep_{name}"), *extra]


def test_cli_compares_two_encoders_paired_on_the_same_test_tiles(tmp_path, cli, capsys):
    from gigaslide.evaluation.metrics import METRICS
    from gigaslide.evaluation.tiles import saved_predictions

    yt = _saved_pair(tmp_path)
    assert cli(_args(tmp_path, "b")) == 0
    assert cli(_args(tmp_path, "a", "--baseline", str(tmp_path / "rep_b"))) == 0
    assert "Paired vs" in capsys.readouterr().out
    cmp = json.loads((tmp_path / "rep_a" / "comparison.json").read_text())["protocols"]
    assert set(cmp) == {"linear", "knn", "fewshot_1%", "fewshot_10%", "fewshot_1/class", "fewshot_5/class",
                        "fewshot_10/class"}
    a, b = saved_predictions(tmp_path / "rep_a"), saved_predictions(tmp_path / "rep_b")
    assert (a["test_labels"] == yt).all() and a["test_probs"]["fewshot_1%"].shape == (2, 200, 2)
    for proto in ("linear", "fewshot_5/class"):  # a's score minus b's, from the saved predictions (draws averaged)
        want = {m: np.mean([METRICS[m](yt, p) for p in np.reshape(a["test_probs"][proto], (-1, 200, 2))])
                - np.mean([METRICS[m](yt, p) for p in np.reshape(b["test_probs"][proto], (-1, 200, 2))])
                for m in ("auc", "balanced_accuracy")}
        assert cmp[proto]["auc"]["diff"] == pytest.approx(want["auc"])
        assert cmp[proto]["balanced_accuracy"]["diff"] == pytest.approx(want["balanced_accuracy"])
    assert cmp["linear"]["balanced_accuracy"]["ci_low"] > 0.2  # informative features vs noise: clearly better
    assert "| linear |" in (tmp_path / "rep_a" / "comparison.md").read_text()
    # the report's numbers are the saved predictions' numbers
    rep = json.loads((tmp_path / "rep_a" / "report.json").read_text())
    assert rep["protocols"]["linear"]["auc"]["value"] == pytest.approx(METRICS["auc"](yt, a["test_probs"]["linear"]))


def test_a_baseline_on_other_or_unrecorded_tiles_is_refused_before_probing(tmp_path, cli, capsys):
    _saved_pair(tmp_path, fp_b="tiles-2")
    assert cli(_args(tmp_path, "b")) == 0
    assert cli(_args(tmp_path, "a", "--baseline", str(tmp_path / "rep_b"))) == 2
    err = capsys.readouterr().err
    assert "other tiles" in err and "embed-tiles" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep_a").exists()  # refused before any probing
    _saved_pair(tmp_path / "old", fp_b=None)  # a test file from before tiles were recorded
    assert cli(_args(tmp_path / "old", "b")) == 0
    assert cli(_args(tmp_path / "old", "a", "--baseline", str(tmp_path / "old" / "rep_b"))) == 2
    assert "no record of which tiles" in capsys.readouterr().err
    assert cli(_args(tmp_path, "a", "--baseline", str(tmp_path / "nothing"))) == 2
    err = capsys.readouterr().err
    assert "no tile evaluation with test predictions" in err and "nothing" in err


def test_a_report_and_predictions_of_different_runs_are_not_read_as_one(tmp_path, cli, capsys):
    """An evaluation interrupted between its two writes leaves a new predictions.npz beside an old report.json."""
    from gigaslide.evaluation.tiles import saved_predictions

    _saved_pair(tmp_path)
    assert cli(_args(tmp_path, "a")) == 0
    old = (tmp_path / "rep_a" / "report.json").read_text()
    X, y = _split(200, 1)
    store.save(tmp_path / "a_te.h5", X, labels=y, attrs={"encoder": "a", "tiles_fingerprint": "tiles-9"})
    assert cli(_args(tmp_path, "a")) == 0
    (tmp_path / "rep_a" / "report.json").write_text(old)
    with pytest.raises(GigaslideError, match="different runs"):
        saved_predictions(tmp_path / "rep_a")


def test_test_labels_follow_the_training_folders_class_names(tmp_path):
    """Each tile folder numbers its own sorted class sub-folders: a test folder without class b (a, c) stores c as 1,
    which is b in the training folder (a, b, c). Separable tiles scored balanced accuracy 0.5 (every c tile counted
    as a mistaken b); the test labels are now the training classes' indices, and a test class the training folder
    lacks is refused."""
    r = np.random.default_rng(0)
    centers = r.normal(size=(3, 8)) * 4
    ytr = np.repeat([0, 1, 2], 60)
    store.save(tmp_path / "tr.h5", (centers[ytr] + r.normal(size=(180, 8))).astype(np.float32), labels=ytr,
               attrs={"encoder": "toy", "classes": json.dumps(["a", "b", "c"])})
    true = np.repeat([0, 2], 50)  # a and c tiles
    store.save(tmp_path / "te.h5", (centers[true] + r.normal(size=(100, 8))).astype(np.float32),
               labels=np.repeat([0, 1], 50), attrs={"encoder": "toy", "classes": json.dumps(["a", "c"])})
    rep = evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "te.h5"), "linear,knn",
                                 n_bootstrap=0)
    assert rep["test_labels"].tolist() == true.tolist() and rep["test"]["class_counts"] == [50, 0, 50]
    for p in ("linear", "knn"):
        assert rep["protocols"][p]["balanced_accuracy"]["value"] == 1.0
    store.save(tmp_path / "te2.h5", np.zeros((4, 8), np.float32), labels=np.array([0, 0, 1, 1]),
               attrs={"encoder": "toy", "classes": json.dumps(["a", "d"])})
    with pytest.raises(GigaslideError, match=r"te2\.h5: test class\(es\) d have no training tiles"):
        evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "te2.h5"), "knn", n_bootstrap=0)


def test_a_few_shot_setting_draws_the_same_labels_whatever_else_is_evaluated():
    """Draws were seeded by the setting's place in the list: 5/class evaluated alone drew other tiles (another
    score, same seed) than 5/class after 1%; two such reports would still have been paired as the same draws."""
    from gigaslide.evaluation.compare import compare_reports

    train, test = _split(300, 0, sep=0.4), _split(200, 1, sep=0.4)
    both = evaluate_tile_features(train, test, "fewshot", n_bootstrap=0, fewshot_settings=("1%", "5/class"))
    alone = evaluate_tile_features(train, test, "fewshot", n_bootstrap=0, fewshot_settings=("5/class",))
    assert np.array_equal(both["test_probs"]["fewshot_5/class"], alone["test_probs"]["fewshot_5/class"])
    assert both["protocols"]["fewshot_5/class"]["auc"]["value"] == alone["protocols"]["fewshot_5/class"]["auc"]["value"]
    assert both["fewshot_draws"] == "seed, setting name, draw"
    fp = {"test": {"fingerprint": "t", "n": 200}, "train": {"fingerprint": "tr"}}
    here, older = {**alone, **fp}, {**alone, **fp}
    older.pop("fewshot_draws")  # a report of the list-position draws
    assert compare_reports(here, {**here}, n_bootstrap=20)["fewshot_5/class"]["auc"]["draws"] == "paired"
    assert compare_reports(here, older, n_bootstrap=20)["fewshot_5/class"]["auc"]["draws"] == "independent"


def test_nan_test_features_name_the_test_file(tmp_path):
    """A NaN in the test features was reported against the training file ('train.h5: features contain NaN/inf')."""
    X, y = _split(60, 0)
    Xt = X.copy()
    Xt[5, 3] = np.nan
    store.save(tmp_path / "train.h5", X, labels=y, attrs={"encoder": "toy"})
    store.save(tmp_path / "test.h5", Xt, labels=y, attrs={"encoder": "toy"})
    with pytest.raises(GigaslideError, match=r"test\.h5: 1 tile\(s\) have NaN/inf features"):
        evaluate_tile_features(store.load(tmp_path / "train.h5"), store.load(tmp_path / "test.h5"), "knn")
    with pytest.raises(GigaslideError, match=r"test\.h5: 1 tile\(s\) have NaN/inf"):  # and the training file's own
        evaluate_tile_features(store.load(tmp_path / "test.h5"), store.load(tmp_path / "train.h5"), "knn")


def _stratified_indices(y, n_bootstrap, seed):
    """Class-stratified bootstrap resamples, written out: each class's items resampled within the class."""
    r = np.random.default_rng(seed)
    out = np.empty((n_bootstrap, len(y)), np.int64)
    pos = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, pos: pos + len(members)] = members[r.integers(0, len(members), size=(n_bootstrap, len(members)))]
        pos += len(members)
    return out


def test_tile_cis_resample_the_test_tiles_within_each_class():
    """3 tumour tiles in 60: unstratified resamples without one (1 in 20) left AUC undefined and were dropped from the
    CI unreported; the CI is now over class-stratified resamples, every one of them defined."""
    from sklearn.metrics import roc_auc_score

    X, y = _split(200, 0, sep=0.3)
    Xt, yt = _split(400, 1, sep=0.3)
    keep = np.r_[np.flatnonzero(yt == 0)[:57], np.flatnonzero(yt == 1)[:3]]
    Xt, yt = Xt[keep], yt[keep]
    rep = evaluate_tile_features((X, y), (Xt, yt), "knn", n_bootstrap=400, seed=3)
    p = rep["test_probs"]["knn"]
    reps = [roc_auc_score(yt[i], p[i, 1]) for i in _stratified_indices(yt, 400, 3)]
    got = rep["protocols"]["knn"]["auc"]
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))
    assert "undefined_replicates" not in got and got["ci_high"] - got["ci_low"] > 0.1


def test_few_shot_ci_resamples_the_draws_and_reports_each_draw():
    """1 label per class: the 5 draws' AUCs spread far wider than the test tiles move them, and the CI (test tiles
    resampled, draws kept) left most draws' values outside it. Each replicate now resamples the draws too (with
    replacement), and each draw's value is reported."""
    from sklearn.metrics import roc_auc_score

    r = np.random.default_rng(0)
    c = r.normal(size=(2, 16)) * 0.7
    ytr = r.integers(0, 2, 300)
    Xtr = (c[ytr] + r.normal(size=(300, 16))).astype(np.float32)
    yte = np.repeat([0, 1], 400)
    Xte = (c[yte] + r.normal(size=(800, 16))).astype(np.float32)
    rep = evaluate_tile_features((Xtr, ytr), (Xte, yte), "fewshot", n_bootstrap=200, seed=0, fewshot_repeats=5,
                                 fewshot_settings=("1/class",))
    got = rep["protocols"]["fewshot_1/class"]["auc"]
    draws = rep["test_probs"]["fewshot_1/class"].astype(np.float64)
    # per_draw: computed from the float64 probabilities the report scored (the saved ones are float32)
    assert got["per_draw"] == pytest.approx([roc_auc_score(yte, d[:, 1]) for d in draws], abs=1e-6)
    assert got["value"] == pytest.approx(np.mean(got["per_draw"]))
    jd = np.random.default_rng([0, 1]).integers(0, 5, (200, 5))  # the draws of each replicate
    reps = [np.mean([roc_auc_score(yte[i], draws[j][i, 1]) for j in jd[b]])
            for b, i in enumerate(_stratified_indices(yte, 200, 0))]
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])), abs=1e-5)
    assert got["ci_low"] < sorted(got["per_draw"])[1] and got["ci_high"] > sorted(got["per_draw"])[-2]


def test_training_and_test_files_of_the_same_tiles_are_refused(tmp_path):
    """`embed-tiles` of one folder twice (or of one folder with two --limit draws) gave a train and a test file of
    the same tiles: scored without a word, test tiles being training tiles."""
    X, y = _split(60, 0)
    Xt, yt = _split(40, 1)
    store.save(tmp_path / "tr.h5", X, labels=y, attrs={"encoder": "toy", "tiles_fingerprint": "fp1",
                                                        "source_folder": "/d/train"})
    store.save(tmp_path / "same.h5", X, labels=y, attrs={"encoder": "toy", "tiles_fingerprint": "fp1",
                                                          "source_folder": "/d/train"})
    store.save(tmp_path / "sub.h5", Xt, labels=yt, attrs={"encoder": "toy", "tiles_fingerprint": "fp2",
                                                           "source_folder": "/d/train"})
    store.save(tmp_path / "te.h5", Xt, labels=yt, attrs={"encoder": "toy", "tiles_fingerprint": "fp3",
                                                          "source_folder": "/d/valid"})
    with pytest.raises(GigaslideError, match=r"same\.h5: the test tiles are the training tiles.*fix: embed"):
        evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "same.h5"), "knn", n_bootstrap=0)
    with pytest.raises(GigaslideError, match=r"sub\.h5: train and test tiles were embedded from the same folder"):
        evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "sub.h5"), "knn", n_bootstrap=0)
    assert "knn" in evaluate_tile_features(store.load(tmp_path / "tr.h5"), store.load(tmp_path / "te.h5"), "knn",
                                           n_bootstrap=0)["protocols"]


def test_a_baseline_whose_probes_trained_on_other_tiles_is_refused_before_probing(tmp_path, cli, capsys):
    _saved_pair(tmp_path)
    X, y = _split(300, 7)  # b's training file: other tiles
    store.save(tmp_path / "b_tr.h5", X, labels=y, attrs={"encoder": "b", "tiles_fingerprint": "train-b"})
    store.save(tmp_path / "a_tr.h5", _split(300, 0)[0], labels=_split(300, 0)[1],
               attrs={"encoder": "a", "tiles_fingerprint": "train-a"})
    assert cli(_args(tmp_path, "b")) == 0
    assert cli(_args(tmp_path, "a", "--baseline", str(tmp_path / "rep_b"))) == 2
    err = capsys.readouterr().err
    assert "trained on other tiles" in err and "training tile folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep_a").exists()  # refused before any probing


def test_saved_predictions_keep_the_probabilities_as_scored(tmp_path, monkeypatch):
    """predictions.npz stored float32: confident tiles 1e-9 apart became ties, so a later paired comparison scored
    the baseline on other numbers (another AUC) than its report."""
    from gigaslide.evaluation import tiles
    from gigaslide.evaluation.metrics import auc
    from gigaslide.evaluation.tiles import saved_predictions, write_report

    monkeypatch.setattr(tiles, "report_markdown", lambda r: "")  # the predictions file is what is tested
    monkeypatch.setattr(tiles, "plot_report", lambda r, path: None)

    y = np.array([0, 1, 0, 1])
    p = np.array([1 - 4e-9, 1 - 3e-9, 1 - 2e-9, 1 - 1e-9])
    probs = np.stack([1 - p, p], 1)
    report = {"test": {"fingerprint": "f", "n": 4}, "protocols": {}}
    write_report(report, tmp_path, probs={"linear": probs}, labels=y)
    back = saved_predictions(tmp_path)["test_probs"]["linear"]
    assert auc(y, back) == auc(y, probs) == 0.75

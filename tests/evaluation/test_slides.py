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


def test_a_fold_of_one_class_is_named_not_silently_left_out_of_the_per_fold_mean(tmp_path):
    """Fold 1 holds negatives only: its AUC is undefined, so the per-fold AUC is fold 0's alone -- and the report
    says over how many folds it is (it read as the mean over both)."""
    p = tmp_path / "predictions.csv"
    p.write_text("slide_id,label,prob_0,prob_1,fold\na,0,0.9,0.1,0\nb,1,0.2,0.8,0\nc,0,0.4,0.6,0\nd,1,0.7,0.3,0\n"
                 "e,0,0.6,0.4,1\nf,0,0.8,0.2,1\n")
    res = E.evaluate_predictions(p, n_bootstrap=0)
    a, ba = res["metrics"]["auc"], res["metrics"]["balanced_accuracy"]
    assert a["fold_mean"] == 0.75 and (a["fold_n"], a["fold_total"]) == (1, 2)
    assert (ba["fold_n"], ba["fold_total"]) == (2, 2)
    md = E.evaluation_markdown(res)
    auc_row = next(line for line in md.splitlines() if line.startswith("| auc |"))
    ba_row = next(line for line in md.splitlines() if line.startswith("| balanced_accuracy |"))
    assert "(1 of 2 folds: the others have one class)" in auc_row and "folds:" not in ba_row


def test_a_prediction_file_keeps_every_digit_of_the_probabilities(tmp_path):
    """Metrics read from the written CSV are the model's: confident probabilities that differ beyond the 6th digit
    stay ordered (the AUC counted them as ties) and a near-0.5 row keeps its arg-max (balanced accuracy)."""
    from gigaslide.evaluation.metrics import auc, balanced_accuracy

    y = np.array([1, 0, 1, 0])
    p1 = np.array([1 - 1e-7, 1 - 4e-7, 0.5000004, 0.2])
    probs = np.stack([1 - p1, p1], 1)
    E.write_predictions(tmp_path / "predictions.csv", list("abcd"), y, probs, 0)
    back = E.read_predictions(tmp_path / "predictions.csv")
    assert np.array_equal(back.probs, probs)
    assert auc(back.labels, back.probs) == auc(y, probs) == 0.75
    assert balanced_accuracy(back.labels, back.probs) == balanced_accuracy(y, probs) == 0.75


def test_predictions_from_other_tools_are_read_by_column_name_or_refused_in_one_line(tmp_path):
    """A prediction CSV saved by Excel (a BOM before slide_id) or with spaces after the commas is read as written;
    prob columns that are not prob_0..prob_{C-1} are refused (prob_tumor was a ValueError traceback; prob_0,prob_2
    was read as two classes, class 1's probabilities taken from the column of class 2)."""
    rows = "a,0,0.9,0.1,0\nb,1,0.2,0.8,0\nc,0,0.6,0.4,1\nd,1,0.3,0.7,1\n"
    p = tmp_path / "p.csv"
    p.write_text("slide_id,label,prob_0,prob_1,fold\n" + rows, encoding="utf-8-sig")
    pred = E.read_predictions(p)
    assert pred.slide_ids == ["a", "b", "c", "d"] and pred.probs[:, 1].tolist() == [0.1, 0.8, 0.4, 0.7]
    p.write_text("slide_id, label, prob_0, prob_1, fold\n" + rows.replace(",", ", "))
    pred = E.read_predictions(p)
    assert pred.slide_ids == ["a", "b", "c", "d"] and pred.labels.tolist() == [0, 1, 0, 1]
    for head in ("slide_id,label,prob_normal,prob_tumor,fold", "slide_id,label,prob_0,prob_2,fold"):
        p.write_text(head + "\n" + rows)
        with pytest.raises(GigaslideError, match=r"prob columns .* are not prob_0..prob_1") as e:
            E.read_predictions(p)
        assert "p.csv" in str(e.value) and "fix:" in str(e.value)


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
    assert res["resampled"] == "patients" and res["n_patients"] == 20  # labels.csv names them: CIs over patients
    emb["s0"] = np.zeros(3)
    with pytest.raises(GigaslideError, match="different sizes"):
        E.linear_probe_run(emb, lab, tmp_path / "run2", folds=4)
    del emb["s0"]
    with pytest.raises(GigaslideError, match="have no features: s0"):
        E.linear_probe_run(emb, lab, tmp_path / "run3", folds=4)
    emb["s0"] = np.full(6, np.nan)  # a diverged slide encoder: one line naming the slide (was sklearn's ValueError)
    with pytest.raises(GigaslideError, match=r"1 slide embedding\(s\) contain NaN/inf: s0"):
        E.linear_probe_run(emb, lab, tmp_path / "run4", folds=4)


def test_two_runs_are_compared_paired_on_the_same_slides(tmp_path, cli, capsys):
    """Runs with other folds and slide order are matched by slide id; Δ = pooled metric of a minus b's."""
    from gigaslide.evaluation.metrics import METRICS

    ids, y, p_good = _preds(tmp_path / "a", n=80, folds=4, seed=0, good=True)
    _, _, p_bad = _preds(tmp_path / "b", n=80, folds=2, seed=1, good=False)
    d = E.compare_predictions(tmp_path / "a", tmp_path / "b", n_bootstrap=200)
    for m in ("auc", "balanced_accuracy"):
        assert d[m]["diff"] == pytest.approx(METRICS[m](y, p_good) - METRICS[m](y, p_bad), abs=1e-5)
    assert d["auc"]["ci_low"] > 0.2
    assert E.compare_predictions(tmp_path / "a", tmp_path / "a", n_bootstrap=50)["auc"]["diff"] == 0.0
    rc = cli(["evaluate", "slides", "--predictions", str(tmp_path / "a"), "--baseline", str(tmp_path / "b"),
              "--bootstrap", "50"])
    assert rc == 0 and "Paired vs" in capsys.readouterr().out
    cmp = __import__("json").loads((tmp_path / "a" / "comparison.json").read_text())["protocols"]
    assert cmp["slides (pooled out-of-fold)"]["auc"]["diff"] == pytest.approx(d["auc"]["diff"])


def test_repeats_are_averaged_in_a_paired_comparison(tmp_path):
    import csv

    ids, y = ["a", "b", "c", "d"], [0, 1, 0, 1]
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    for name, draws in (("two", (good, good[:, ::-1])), ("one", (good,))):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "label", "prob_0", "prob_1", "fold", "repeat"])
            for rep, p in enumerate(draws):
                for i in range(4):
                    w.writerow([ids[i], y[i], *p[i], i % 2, rep])
    d = E.compare_predictions(tmp_path / "two", tmp_path / "one", n_bootstrap=0)
    assert d["auc"]["diff"] == pytest.approx(0.5 - 1.0)  # repeats' mean AUC 0.5 vs 1.0


def test_runs_on_other_slides_or_labels_are_refused(tmp_path, cli, capsys):
    _preds(tmp_path / "a", n=60)
    _preds(tmp_path / "b", n=40)
    with pytest.raises(GigaslideError, match=r"other slides \(20 only here, e.g. s40, 0 only in the baseline\)"):
        E.compare_predictions(tmp_path / "a", tmp_path / "b")
    _preds(tmp_path / "c", n=60, c=3)
    with pytest.raises(GigaslideError, match="3 classes in the baseline, 2 here"):
        E.compare_predictions(tmp_path / "a", tmp_path / "c")
    pred = E.read_predictions(tmp_path / "a")
    flipped = E.Predictions(pred.slide_ids, 1 - pred.labels, pred.probs, pred.folds, pred.repeats, "flipped")
    with pytest.raises(GigaslideError, match="has label"):
        E.compare_predictions(pred, flipped)
    rc = cli(["evaluate", "slides", "--predictions", str(tmp_path / "a"), "--baseline", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "other slides" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "evaluation.json").exists()  # refused before evaluating


def test_cli_evaluate_embeddings_against_a_baseline_run(tmp_path, cli, capsys):
    """Two slide-embedding methods on the same slides: paired Δ in comparison.json, equal to comparing their saved
    out-of-fold predictions; a baseline that is no run is refused before any work."""
    import json

    import h5py

    r = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{y[i]}\n" for i in range(n)))
    for name, signal in (("good", 3.0), ("noise", 0.0)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["slide_ids"] = np.array([f"s{i}" for i in range(n)], dtype="S")
            f["embeddings"] = (r.normal(size=(n, 6)) + signal * y[:, None]).astype(np.float32)

    def run(name, *extra):
        return cli(["evaluate", "embeddings", "--embeddings", str(tmp_path / f"{name}.h5"), "--labels",
                    str(tmp_path / "labels.csv"), "--folds", "4", "--bootstrap", "200", "--out",
                    str(tmp_path / f"lin_{name}"), *extra])

    assert run("noise") == 0
    assert run("good", "--baseline", str(tmp_path / "lin_noise")) == 0
    assert "Paired vs" in capsys.readouterr().out
    got = json.loads((tmp_path / "lin_good" / "comparison.json").read_text())["protocols"]
    want = E.compare_predictions(tmp_path / "lin_good", tmp_path / "lin_noise", n_bootstrap=200)
    assert got["slides (pooled out-of-fold)"]["auc"]["diff"] == pytest.approx(want["auc"]["diff"])
    assert want["auc"]["ci_low"] > 0.2  # informative embeddings vs noise
    assert run("good", "--baseline", str(tmp_path / "nothing")) == 2
    assert "predictions not found" in capsys.readouterr().err
    # a slide twice (the second row silently won) or ids and rows of different lengths (zip cut the longer): one line
    ids = [f"s{i}" for i in range(n)]
    for name, ids, rows in (("dup", ids + ["s3"], n + 1), ("short", ids, n + 2)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["slide_ids"] = np.array(ids, dtype="S")
            f["embeddings"] = (r.normal(size=(rows, 6)) + 3.0 * np.resize(y, rows)[:, None]).astype(np.float32)
        assert run(name) == 2
        err = capsys.readouterr().err
        assert f"{name}.h5" in err and ("slide(s) s3 appear more than once" if name == "dup" else
                                        f"{n} slide ids for {n + 2} embeddings") in err
        assert not (tmp_path / f"lin_{name}" / "predictions.csv").exists()


def _five_slides_per_patient(tmp_path, seed=0, good=True, patients=True):
    """40 patients in 4 folds, each scanned as 5 slides with one prediction (a patient's slides agree), and the
    same cohort with one slide per patient."""
    r = np.random.default_rng(seed)
    y = np.arange(40) % 2
    p = r.dirichlet(np.ones(2), 40)
    p[np.arange(40), y] += 0.4 if good else 0.0
    p /= p.sum(1, keepdims=True)
    pats = [f"p{i:02d}" for i in range(40)]
    folds = np.arange(40) % 4
    E.write_predictions(tmp_path / "one" / "predictions.csv", pats, y, p, folds)
    five = [f"{q}_{c}" for q in pats for c in "abcde"]
    E.write_predictions(tmp_path / "five" / "predictions.csv", five, np.repeat(y, 5), np.repeat(p, 5, axis=0),
                        np.repeat(folds, 5), patient_ids=np.repeat(pats, 5) if patients else None)
    return tmp_path / "one", tmp_path / "five"


def test_slides_of_one_patient_are_resampled_together(tmp_path):
    """labels.csv names each slide's patient: the CIs resample patients (all their slides), recorded as such; five
    identical slides per patient give the one-slide-per-patient CI (resampling slides gave one ~sqrt(5) too narrow)."""
    one, five = _five_slides_per_patient(tmp_path)
    assert E.read_predictions(five).patient_ids[:6] == ["p00"] * 5 + ["p01"]
    r1, r5 = E.evaluate_predictions(one, n_bootstrap=300), E.evaluate_predictions(five, n_bootstrap=300, out=five)
    assert r5["resampled"] == "patients" and r5["n_patients"] == 40 and r1["resampled"] == "slides"
    for k in ("auc", "balanced_accuracy"):
        assert (r5["metrics"][k]["ci_low"], r5["metrics"][k]["ci_high"]) == pytest.approx(
            (r1["metrics"][k]["ci_low"], r1["metrics"][k]["ci_high"]))
    assert "over patients within folds, each with all its slides (40 patients)" in (five / "evaluation.md").read_text()
    _, bare = _five_slides_per_patient(tmp_path / "bare", patients=False)
    w_slides = E.evaluate_predictions(bare, n_bootstrap=300)["metrics"]["auc"]
    w_one = r1["metrics"]["auc"]
    assert w_slides["ci_high"] - w_slides["ci_low"] < 0.6 * (w_one["ci_high"] - w_one["ci_low"])
    # a paired comparison resamples patients too
    _, five_b = _five_slides_per_patient(tmp_path / "b", seed=1, good=False)
    one_b, _ = _five_slides_per_patient(tmp_path / "b1", seed=1, good=False)
    d5, d1 = E.compare_predictions(five, five_b, n_bootstrap=200), E.compare_predictions(one, one_b, n_bootstrap=200)
    assert d5["auc"]["resampled"] == "patients" and d1["auc"]["resampled"] == "slides"
    assert (d5["auc"]["ci_low"], d5["auc"]["ci_high"]) == pytest.approx((d1["auc"]["ci_low"], d1["auc"]["ci_high"]))
    # the run without the column is compared over the other's patients
    assert E.compare_predictions(bare, five_b, n_bootstrap=50)["auc"]["resampled"] == "patients"


def test_a_slide_in_two_patients_is_refused(tmp_path):
    E.write_predictions(tmp_path / "a.csv", ["s1", "s1"], [0, 0], np.full((2, 2), 0.5), 0, [0, 1],
                        patient_ids=["p1", "p2"])
    with pytest.raises(GigaslideError, match="slide s1 belongs to patient p1 in one row, p2 in another"):
        E.read_predictions(tmp_path / "a.csv")
    E.write_predictions(tmp_path / "b.csv", ["s1", "s2", "s3", "s4"], [0, 1, 0, 1], np.full((4, 2), 0.5), 0,
                        patient_ids=["p1", "p2", "p3", "p4"])
    E.write_predictions(tmp_path / "c.csv", ["s1", "s2", "s3", "s4"], [0, 1, 0, 1], np.full((4, 2), 0.5), 0,
                        patient_ids=["p1", "p2", "p3", "p3"])
    with pytest.raises(GigaslideError, match="slide s4 belongs to patient p3 in the baseline, p4 here"):
        E.compare_predictions(tmp_path / "b.csv", tmp_path / "c.csv")


def test_cli_evaluate_slides_takes_the_patients_from_labels(tmp_path, cli, capsys):
    """Predictions written without patient_id (another tool's): --labels names the patients, the CIs resample them."""
    import json

    one, bare = _five_slides_per_patient(tmp_path, patients=False)
    ids = [f"p{i:02d}_{c}" for i in range(40) for c in "abcde"]
    lab = tmp_path / "labels.csv"
    lab.write_text("slide_id,patient_id,label\n" + "".join(f"{s},{s[:3]},{int(s[1:3]) % 2}\n" for s in ids))
    assert cli(["evaluate", "slides", "--predictions", str(bare), "--labels", str(lab), "--bootstrap", "300"]) == 0
    got = json.loads((bare / "evaluation.json").read_text())
    want = E.evaluate_predictions(one, n_bootstrap=300)["metrics"]["auc"]
    assert got["resampled"] == "patients" and got["metrics"]["auc"]["ci_low"] == pytest.approx(want["ci_low"])
    assert "over patients within folds" in capsys.readouterr().out
    lab.write_text("slide_id,label\n" + "".join(f"{s},{int(s[1:3]) % 2}\n" for s in ids))
    assert cli(["evaluate", "slides", "--predictions", str(bare), "--labels", str(lab)]) == 2
    assert "no patient_id (or case_id) column" in capsys.readouterr().err
    lab.write_text("slide_id,patient_id,label\n" + "".join(f"{s},{s[:3]},{int(s[1:3]) % 2}\n" for s in ids[5:]))
    assert cli(["evaluate", "slides", "--predictions", str(bare), "--labels", str(lab)]) == 2
    assert "5 predicted slide(s) are not in it: p00_a" in capsys.readouterr().err


def test_class_names_travel_with_the_predictions(tmp_path):
    """Named classes: a class_name column, kept when the folds are pooled, in the evaluation and its report."""
    names = ["LUAD", "LUSC", "MESO"]
    y = np.array([0, 1, 2, 1, 0, 2])
    p = np.eye(3)[y] * 0.7 + 0.1
    E.write_predictions(tmp_path / "fold0" / "predictions.csv", ["a", "b", "c"], y[:3], p[:3], 0, class_names=names)
    E.write_predictions(tmp_path / "fold1" / "predictions.csv", ["d", "e", "f"], y[3:], p[3:], 1, class_names=names)
    assert (tmp_path / "fold0" / "predictions.csv").read_text().splitlines()[1].endswith(",0,LUAD")
    pooled = E.pool_predictions([tmp_path / f"fold{k}" / "predictions.csv" for k in (0, 1)],
                                tmp_path / "predictions.csv")
    assert pooled.class_names == names and E.read_predictions(tmp_path / "predictions.csv").class_names == names
    res = E.evaluate_predictions(tmp_path / "predictions.csv", n_bootstrap=0, out=tmp_path)
    assert res["class_names"] == names and res["class_counts"] == [2, 2, 2]
    assert "6 slides (0 = LUAD: 2, 1 = LUSC: 2, 2 = MESO: 2)" in (tmp_path / "evaluation.md").read_text()
    # a class absent from one fold's rows takes its name from the other folds
    E.write_predictions(tmp_path / "g0.csv", ["a"], [0], p[:1], 0, class_names=names)
    E.write_predictions(tmp_path / "g1.csv", ["b"], [2], p[2:3], 1, class_names=names)
    assert E.pool_predictions([tmp_path / "g0.csv", tmp_path / "g1.csv"], tmp_path / "g.csv").class_names == [
        "LUAD", "1", "MESO"]
    bad = "slide_id,label,prob_0,prob_1,fold,class_name\na,0,0.9,0.1,0,normal\nb,0,0.8,0.2,0,tumor\n"
    (tmp_path / "bad.csv").write_text(bad)
    with pytest.raises(GigaslideError, match=r"line 3: label 0 is class 'tumor' here, 'normal' above"):
        E.read_predictions(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text(bad.replace("normal", ""))
    with pytest.raises(GigaslideError, match=r"line 2: empty class_name"):
        E.read_predictions(tmp_path / "bad.csv")


def test_a_labels_csv_with_other_numbering_is_matched_by_class_name(tmp_path, cli, capsys):
    """A run trained on LUSC / MESO slides only numbers them 0 / 1; the full labels.csv (LUAD, LUSC, MESO) numbers
    them 1 / 2: with names on both sides the slides' classes agree (compared by name, not renumbered silently), and
    a slide whose class differs is refused naming both classes."""
    y = np.array([0, 1, 0, 1])
    E.write_predictions(tmp_path / "run" / "predictions.csv", ["a", "b", "c", "d"], y, np.eye(2)[y] * 0.8 + 0.1,
                        [0, 0, 1, 1], class_names=["LUSC", "MESO"])
    lab = tmp_path / "labels.csv"
    lab.write_text("case_id,slide_id,label\np1,a,LUSC\np1,b,MESO\np2,c,LUSC\np3,d,MESO\np4,e,LUAD\n")
    pred = E.with_patients(E.read_predictions(tmp_path / "run"), lab)
    assert pred.patient_ids == ["p1", "p1", "p2", "p3"] and pred.class_names == ["LUSC", "MESO"]
    lab.write_text("case_id,slide_id,label\np1,a,LUSC\np1,b,LUSC\np2,c,LUSC\np3,d,MESO\np4,e,LUAD\n")
    with pytest.raises(GigaslideError, match=r"slide b has label 1 \(LUSC\) here, 1 \(MESO\) in the predictions"):
        E.with_patients(E.read_predictions(tmp_path / "run"), lab)
    assert cli(["evaluate", "slides", "--predictions", str(tmp_path / "run"), "--labels", str(lab)]) == 2
    assert "(MESO) in the predictions" in capsys.readouterr().err
    # predictions written without names (another tool, an older run): a labels.csv naming the classes names them,
    # with or without patients, where its numbering agrees with every slide's label
    E.write_predictions(tmp_path / "old" / "predictions.csv", ["a", "b", "c", "d"], [1, 2, 1, 2],
                        np.eye(3)[[1, 2, 1, 2]] * 0.7 + 0.1, [0, 0, 1, 1])
    lab.write_text("slide_id,label\na,LUSC\nb,MESO\nc,LUSC\nd,MESO\ne,LUAD\n")
    pred = E.with_patients(E.read_predictions(tmp_path / "old"), lab)
    assert pred.class_names == ["LUAD", "LUSC", "MESO"] and pred.patient_ids is None
    assert cli(["evaluate", "slides", "--predictions", str(tmp_path / "old"), "--labels", str(lab)]) == 0
    assert "4 slides (0 = LUAD: 0, 1 = LUSC: 2, 2 = MESO: 2)" in capsys.readouterr().out


def test_compare_refuses_runs_with_other_class_names(tmp_path):
    y = np.array([0, 1, 0, 1])
    p = np.eye(2)[y] * 0.8 + 0.1
    E.write_predictions(tmp_path / "a.csv", list("abcd"), y, p, 0, class_names=["normal", "tumor"])
    E.write_predictions(tmp_path / "b.csv", list("abcd"), y, p, 0, class_names=["LUAD", "LUSC"])
    with pytest.raises(GigaslideError, match="classes LUAD, LUSC in the baseline, normal, tumor here"):
        E.compare_predictions(tmp_path / "a.csv", tmp_path / "b.csv", n_bootstrap=10)


def _knn_data(n=60, c=3, d=5, seed=0):
    r = np.random.default_rng(seed)
    y = np.arange(n) % c
    X = r.normal(size=(n, d)) + 1.5 * np.eye(c, d)[y]
    return X, y


def test_knn_probe_slides_matches_sklearn_and_ignores_scale():
    """The slide k-NN probe = sklearn's cosine KNeighborsClassifier (an independent implementation) fold by fold,
    with k capped at half the training slides; scaling each embedding by a positive factor changes nothing."""
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _knn_data()
    folds = make_folds(y, None, 3, seed=0)
    pred = E.knn_probe_slides(X, y, folds, k=20)
    for tr, te in folds:
        ref = KNeighborsClassifier(n_neighbors=E.knn_k(20, len(tr)), metric="cosine", algorithm="brute").fit(X[tr],
                                                                                                            y[tr])
        rows = [pred.slide_ids.index(str(i)) for i in te]
        np.testing.assert_allclose(pred.probs[rows], ref.predict_proba(X[te]), atol=1e-12)
    scaled = E.knn_probe_slides(X * np.random.default_rng(1).uniform(0.01, 100, (len(X), 1)), y, folds, k=20)
    np.testing.assert_array_equal(scaled.probs, pred.probs)
    few = [(tr[:8], te) for tr, te in folds]  # 8 training slides: 4 vote, not all 8 (a constant prior)
    pf = E.knn_probe_slides(X, y, few, k=20)
    for tr, te in few:
        ref = KNeighborsClassifier(n_neighbors=4, metric="cosine", algorithm="brute").fit(X[tr], y[tr])
        rows = [pf.slide_ids.index(str(i)) for i in te]
        np.testing.assert_allclose(pf.probs[rows], ref.predict_proba(X[te]), atol=1e-12)
    assert E.knn_k(20, 100) == 20 and E.knn_k(20, 8) == 4 and E.knn_k(20, 1) == 1


def test_probe_run_puts_linear_and_knn_side_by_side(tmp_path, cli, capsys):
    """Both probes on the same folds, few-shot draws and slides, scored by the same protocol (CIs over patients),
    named classes in every output; the CLI prints one row per probe."""
    import json

    X, y = _knn_data(n=48, c=2, seed=2)
    names = ["normal_tissue", "tumor_tissue"]
    emb = {f"s{i}": X[i] for i in range(len(y))}
    lab = tmp_path / "labels.csv"
    lab.write_text("case_id,slide_id,label\n" + "".join(f"c{i // 2},s{i},{names[y[i]]}\n" for i in range(len(y))))
    res = E.probe_run(emb, lab, tmp_path / "run", folds=4, train_slides=12, repeats=2, n_bootstrap=50)
    lin, knn = E.read_predictions(tmp_path / "run"), E.read_predictions(tmp_path / "run" / "knn")
    assert lin.slide_ids == knn.slide_ids and lin.folds.tolist() == knn.folds.tolist()
    assert lin.repeats.tolist() == knn.repeats.tolist() and knn.class_names == names
    assert res["knn"]["probe"]["k_used"] == [6] and res["knn"]["resampled"] == "patients"
    # the k-NN row is the evaluation of the same draws' k-NN predictions, recomputed here
    sp = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert sp["class_names"] == names
    from gigaslide.evaluation import splits as S
    t = S.read_labels(lab)
    f = S.make_folds(t.labels, t.patient_ids, 4, 0)
    rf = [[(S.few_shot_draws(tr, t.labels, 12, 2, seed=k)[r], te) for k, (tr, te) in enumerate(f)] for r in range(2)]
    want = [E.knn_probe_slides(X, y, rfr, slide_ids=t.slide_ids, k=20, repeat=r) for r, rfr in enumerate(rf)]
    got = np.concatenate([w.probs for w in want])
    np.testing.assert_allclose(knn.probs, got)
    md = (tmp_path / "run" / "probes.md").read_text()
    assert "| linear (C=1.0) |" in md and "| k-NN (cosine, k=6) |" in md
    with pytest.raises(GigaslideError, match="--protocol linear,svm: unknown svm"):
        E.probe_run(emb, lab, tmp_path / "run2", protocols="linear,svm")
    import h5py
    with h5py.File(tmp_path / "e.h5", "w") as h:
        h["slide_ids"] = np.array(list(emb), dtype="S")
        h["embeddings"] = X.astype(np.float32)
    assert cli(["evaluate", "embeddings", "--embeddings", str(tmp_path / "e.h5"), "--labels", str(lab), "--folds", "4",
                "--bootstrap", "20", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "| linear (C=10.0) |" in out and "| k-NN (cosine, k=18) |" in out and "0 = normal_tissue: 24" in out
    # against a baseline run: each probe with the baseline's same probe, paired (the k-NN one from BASELINE/knn)
    assert cli(["evaluate", "embeddings", "--embeddings", str(tmp_path / "e.h5"), "--labels", str(lab), "--folds", "4",
                "--bootstrap", "20", "--out", str(tmp_path / "cli2"), "--seed", "1", "--baseline",
                str(tmp_path / "cli")]) == 0
    got = json.loads((tmp_path / "cli2" / "comparison.json").read_text())["protocols"]
    want = E.compare_predictions(tmp_path / "cli2" / "knn", tmp_path / "cli" / "knn", n_bootstrap=20, seed=1)
    assert got["slides, k-NN probe (pooled out-of-fold)"]["auc"]["diff"] == pytest.approx(want["auc"]["diff"])
    assert set(got) == {"slides (pooled out-of-fold)", "slides, k-NN probe (pooled out-of-fold)"}

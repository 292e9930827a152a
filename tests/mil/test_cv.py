import json

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.cv import run_cv
from gigaslide.mil.train import TrainConfig

torch.set_num_threads(1)


def _make(tmp_path, n=24, d=8, encoder="toy", skip=()):
    r = np.random.default_rng(0)
    feats = tmp_path / "feats"
    rows = ["slide_id,patient_id,label"]
    for i in range(n):
        y = i % 2
        x = r.normal(size=(int(r.integers(6, 14)), d)).astype(np.float32)
        if y:
            x[:3, :2] += 3.0
        if f"s{i}" not in skip:
            store.save(feats / f"s{i}.h5", x, r.integers(0, 900, (len(x), 2)), attrs={"encoder": encoder, "slide_id": f"s{i}"})
        rows.append(f"s{i},p{i // 4 * 2 + y},{y}")  # two slides per patient (one label)
    lab = tmp_path / "labels.csv"
    lab.write_text("\n".join(rows) + "\n")
    return feats, lab


FAST = dict(epochs=4, lr=3e-3, hidden=16, patience=4)


def test_run_cv_layout_grouping_resume(tmp_path):
    feats, lab = _make(tmp_path)
    out = tmp_path / "run"
    res = run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=50, verbose=False)
    assert res["n_slides"] == 24 and res["metrics"]["auc"]["value"] > 0.8
    assert len(res["seconds_per_fold"]) == 3
    for k in range(3):
        assert {"model.safetensors", "config.json", "predictions.csv", "attention.h5", "history.json"} <= {
            p.name for p in (out / f"fold{k}").iterdir()}
    sp = json.loads((out / "splits.json").read_text())
    pat = {f"s{i}": f"p{i // 4 * 2 + i % 2}" for i in range(24)}
    for name, f in sp["per_fold"].items():
        tr, va, te = ({pat[s] for s in f[key]} for key in ("train", "val", "test"))
        assert not (tr | va) & te and not tr & va, name
    mtime = (out / "fold0" / "model.safetensors").stat().st_mtime_ns
    run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=50, verbose=False)
    assert (out / "fold0" / "model.safetensors").stat().st_mtime_ns == mtime  # resumed, not retrained
    with pytest.raises(GigaslideError, match=r"another run \(train_config.model: 'abmil' -> 'mean'\)"):
        run_cv(feats, lab, out, cfg=TrainConfig(model="mean", **FAST), folds=3, verbose=False)
    store.save(feats / "s0.h5", np.ones((5, 8), np.float32), attrs={"encoder": "toy", "slide_id": "s0"})
    with pytest.raises(GigaslideError, match=r"another run \(input:features"):  # features changed under the run
        run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, verbose=False)


def test_a_run_of_an_older_network_is_not_resumed_as_the_newer(tmp_path):
    """TransMIL gained PPEG (arch 2) with the same settings: a run folder its first version trained (no model_arch
    in run.json) is refused, not finished with the other network; runs of networks that did not change (abmil,
    TransMIL with ppeg=False: version 1) keep resuming."""
    feats, lab = _make(tmp_path, n=12)
    for name, model, kw in (("ppeg", "transmil", {}), ("noppeg", "transmil", {"ppeg": False}), ("abmil", "abmil", {})):
        out, cfg = tmp_path / name, TrainConfig(model=model, model_kwargs=kw, **FAST)
        run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
        rec = json.loads((out / "run.json").read_text())
        assert rec["identity"].pop("model_arch", None) == (2 if name == "ppeg" else None)
        (out / "run.json").write_text(json.dumps(rec))  # as the first version recorded it
        if name == "ppeg":
            with pytest.raises(GigaslideError, match=r"another run \(model_arch: None -> 2\)"):
                run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
        else:
            mtime = (out / "fold0" / "model.safetensors").stat().st_mtime_ns
            run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
            assert (out / "fold0" / "model.safetensors").stat().st_mtime_ns == mtime  # resumed, not retrained


def test_fold_seed_keeps_the_folds_while_the_training_seed_changes(tmp_path):
    feats, lab = _make(tmp_path, n=30)

    def test_folds(out, seed, fold_seed=None):
        run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", seed=seed, **FAST), folds=3, n_bootstrap=0,
               verbose=False, fold_seed=fold_seed)
        sp = json.loads((out / "splits.json").read_text())
        return [sorted(f["test"]) for f in sp["per_fold"].values()]

    base = test_folds(tmp_path / "a", 0)
    assert test_folds(tmp_path / "b", 1) != base  # by default the folds follow the seed
    assert test_folds(tmp_path / "c", 1, fold_seed=0) == base
    pa = (tmp_path / "a" / "fold0" / "predictions.csv").read_text()
    assert (tmp_path / "c" / "fold0" / "predictions.csv").read_text() != pa  # another training seed, another model

def test_few_shot_repeats(tmp_path):
    feats, lab = _make(tmp_path)
    res = run_cv(feats, lab, tmp_path / "fs", cfg=TrainConfig(model="mean", **FAST), folds=2, train_slides=6,
                 repeats=2, n_bootstrap=20, verbose=False)
    assert res["n_repeats"] == 2 and res["n_slides"] == 24
    sp = json.loads((tmp_path / "fs" / "splits.json").read_text())["per_fold"]
    assert set(sp) == {"fold0", "fold0_r1", "fold1", "fold1_r1"}
    assert all(len(f["train"]) + len(f["val"]) == 6 for f in sp.values())
    assert len({len(f["val"]) > 0 for f in sp.values()}) == 1  # every draw validated, or none


def test_few_shot_draws_share_one_validation_protocol():
    """4 slides drawn from a balanced fold: some draws are 2:2 (a validation split is possible), others 3:1 (not).
    A run must not mix early-stopped models on 2 slides with last-epoch models on 4: none validates, all train on 4;
    with 20 drawn slides every draw can validate, and all do."""
    from types import SimpleNamespace

    from gigaslide.evaluation import splits as S
    from gigaslide.mil.cv import _train_val_parts

    y = np.array([0, 1] * 20)
    t = SimpleNamespace(labels=y, patient_ids=None)
    fold = [(np.arange(40), np.arange(0))]
    draws = S.few_shot_draws(fold[0][0], y, 4, 8, seed=0)
    positives = {int(y[d].sum()) for d in draws}
    assert 2 in positives and positives - {2}  # the premise: both kinds of draw occur
    parts = _train_val_parts(fold, t, 4, 8, 0.2, 0)[0]
    assert [len(va) for _, va in parts] == [0] * 8
    assert all((tr == d).all() for (tr, _), d in zip(parts, draws))
    parts = _train_val_parts(fold, t, 20, 3, 0.2, 0)[0]
    assert all(len(va) > 0 and len(tr) + len(va) == 20 for tr, va in parts)


def test_missing_and_unknown_slides(tmp_path, capsys):
    feats, lab = _make(tmp_path, skip=("s3",))
    with pytest.raises(GigaslideError, match="1 labeled slide\\(s\\) have no features: s3"):
        run_cv(feats, lab, tmp_path / "r", cfg=TrainConfig(**FAST), folds=2, verbose=False)
    store.save(feats / "extra.h5", np.zeros((4, 8), np.float32), attrs={"encoder": "toy", "slide_id": "extra"})
    res = run_cv(feats, lab, tmp_path / "r", cfg=TrainConfig(model="mean", **FAST), folds=2, on_missing="skip", n_bootstrap=0)
    assert res["n_slides"] == 23
    assert "left out" in capsys.readouterr().out
    left = json.loads((tmp_path / "r" / "run.json").read_text())["left_out"]
    assert left == {"labeled_without_features": ["s3"], "features_without_label": ["extra"]}


def test_mixed_encoders_and_empty_bag(tmp_path):
    feats, lab = _make(tmp_path)
    store.save(feats / "s0.h5", np.zeros((5, 16), np.float32), attrs={"encoder": "other", "slide_id": "s0"})
    with pytest.raises(GigaslideError, match="differ in encoder"):
        run_cv(feats, lab, tmp_path / "r", cfg=TrainConfig(**FAST), folds=2, verbose=False)
    store.save(feats / "s0.h5", np.zeros((0, 8), np.float32), attrs={"encoder": "toy", "slide_id": "s0"})
    with pytest.raises(GigaslideError, match="empty bag"):
        run_cv(feats, lab, tmp_path / "r", cfg=TrainConfig(**FAST), folds=2, verbose=False)


def test_cli_train_mil_and_evaluate(tmp_path, cli, capsys):
    feats, lab = _make(tmp_path)
    out = tmp_path / "cli"
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "clam_sb", "--folds", "2",
                "--epochs", "2", "--hidden", "16", "--bootstrap", "20", "--bag-memory-gb", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clam_sb: slide-level" in printed and "read from disk at every use" in printed
    assert json.loads((out / "run.json").read_text())["bags"]["kept_bags"] == 0
    assert cli(["evaluate", "slides", "--predictions", str(out), "--bootstrap", "20"]) == 0
    (tmp_path / "bad.csv").write_text("slide_id,label\ns0,0\ns0,1\n")
    assert cli(["train-mil", "--features", str(feats), "--labels", str(tmp_path / "bad.csv"), "--out", str(out / "x")]) == 2
    assert "duplicate slide_id" in capsys.readouterr().err
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "nope", "--out", str(out / "y")]) == 2
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--bag-memory-gb", "lots",
                "--out", str(out / "z")]) == 2
    assert "bag memory budget 'lots'" in capsys.readouterr().err



def test_cli_train_mil_model_args(tmp_path, cli, capsys):
    from gigaslide.mil.train import load_model

    feats, lab = _make(tmp_path)
    out = tmp_path / "cli"
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "transmil", "--folds", "2",
                "--epochs", "1", "--hidden", "16", "--bootstrap", "0", "--model-args", '{"ppeg": false}',
                "--out", str(out)]) == 0
    model, meta = load_model(out / "fold0")
    assert meta["train_config"]["model_kwargs"] == {"ppeg": False} and model.mil.ppeg is None
    capsys.readouterr()
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "transmil",
                "--model-args", '{"pe": false}', "--out", str(out / "x")]) == 2
    assert "transmil has no setting pe" in (err := capsys.readouterr().err) and "heads, layers, ppeg" in err
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model-args", "{ppeg",
                "--out", str(out / "y")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    # a width TransMIL's heads do not divide: refused before the run folder exists (was a reshape traceback in fold 0)
    assert cli(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "transmil", "--hidden", "50",
                "--out", str(out / "z")]) == 2
    assert "hidden width 50 is not a multiple of its 4 attention heads" in capsys.readouterr().err
    assert not (out / "z").exists()


def test_interrupted_run_resumes_to_the_same_predictions(tmp_path, monkeypatch):
    import gigaslide.mil.cv as cv

    feats, lab = _make(tmp_path)
    ref = tmp_path / "ref"
    run_cv(feats, lab, ref, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0, verbose=False)
    real, calls = cv.train_fold, []

    def dies_on_third_fold(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while training fold 2
        return real(*a, **k)

    monkeypatch.setattr(cv, "train_fold", dies_on_third_fold)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0, verbose=False)
    rec = json.loads((out / "run.json").read_text())
    assert rec["folds_done"] == ["fold0", "fold1"] and rec["status"] == "running"
    assert not (out / "predictions.csv").exists()
    monkeypatch.setattr(cv, "train_fold", real)
    run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0, verbose=False)
    assert (out / "predictions.csv").read_text() == (ref / "predictions.csv").read_text()
    sidecar = json.loads((out / "predictions.provenance.json").read_text())
    assert sidecar["kind"] == "predictions" and sidecar["encoder"] == "toy" and sidecar["model"] == "abmil"
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_damaged_model_of_a_finished_fold_is_retrained(tmp_path):
    feats, lab = _make(tmp_path)
    out = tmp_path / "run"
    run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0, verbose=False)
    ref = (out / "fold1" / "model.safetensors").read_bytes()
    (out / "fold1" / "model.safetensors").write_bytes(ref[:100])  # truncated by another tool / a full disk
    mtime0 = (out / "fold0" / "model.safetensors").stat().st_mtime_ns
    run_cv(feats, lab, out, cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0, verbose=False)
    assert (out / "fold1" / "model.safetensors").read_bytes() == ref  # redone, deterministically
    assert (out / "fold0" / "model.safetensors").stat().st_mtime_ns == mtime0  # intact folds are kept


def test_a_bag_budget_below_the_cohort_gives_the_same_run(tmp_path):
    """Bags read from disk at every use (budget 0) train the same models as bags held in memory."""
    feats, lab = _make(tmp_path)
    cfg = TrainConfig(model="clam_sb", **FAST)
    run_cv(feats, lab, tmp_path / "mem", cfg=cfg, folds=3, n_bootstrap=0, verbose=False)
    run_cv(feats, lab, tmp_path / "disk", cfg=cfg, folds=3, n_bootstrap=0, verbose=False, bag_memory_gb=0)
    for k in range(3):
        a = (tmp_path / "mem" / f"fold{k}" / "predictions.csv").read_text()
        assert a == (tmp_path / "disk" / f"fold{k}" / "predictions.csv").read_text()
    rec = json.loads((tmp_path / "disk" / "run.json").read_text())["bags"]
    assert rec["kept_bags"] == 0 and rec["reads"] > 24 * 4  # every slide read more than once per epoch's worth
    assert json.loads((tmp_path / "mem" / "run.json").read_text())["bags"]["kept_bags"] == 24


def test_a_slide_with_nan_features_is_named_not_reported_as_a_diverged_model(tmp_path):
    """One NaN in one tile of s3 made the fold's standardisation statistics NaN and every prediction NaN, which was
    reported after training as 'predictions contain NaN ... the model diverged; retrain' (retraining cannot help);
    it is one line naming s3's feature file, whether s3 is a training or a test slide of the fold."""
    from gigaslide.mil.bags import Bags
    from gigaslide.mil.train import predict, train_fold

    feats, lab = _make(tmp_path, n=12)
    ff = store.load(feats / "s3.h5")
    x = np.asarray(ff.features).copy()
    x[2, 1] = np.nan
    store.save(feats / "s3.h5", x, ff.coords, attrs={"encoder": "toy", "slide_id": "s3"})
    with pytest.raises(GigaslideError, match=r"s3\.h5: 1 tile\(s\) have NaN/inf features"):
        run_cv(feats, lab, tmp_path / "run", cfg=TrainConfig(model="abmil", **FAST), folds=2, n_bootstrap=0,
               verbose=False)
    files = [store.load(feats / f"s{i}.h5", arrays=False) for i in range(12)]
    bags = Bags(files, 0)
    y = np.arange(12) % 2
    model, _ = train_fold(bags.take([0, 1, 2, 4]), y[[0, 1, 2, 4]], bags.take([]), y[:0], 8, 2,
                          TrainConfig(model="abmil", **FAST))
    with pytest.raises(GigaslideError, match=r"s3\.h5: 1 tile\(s\) have NaN/inf features"):
        predict(model, bags.take([5, 3]))


def test_a_run_with_patients_bootstraps_patients(tmp_path):
    """labels.csv with patient_id (two slides per patient here): the run's predictions name each slide's patient
    and its CIs resample patients (recorded in evaluation.json/.md); without the column, slides."""
    import csv

    from gigaslide.evaluation.slides import read_predictions

    feats, lab = _make(tmp_path, n=16)
    out = tmp_path / "run"
    res = run_cv(feats, lab, out, cfg=TrainConfig(model="mean", **FAST), folds=2, n_bootstrap=20, verbose=False)
    assert res["resampled"] == "patients" and res["n_patients"] == 8
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert {r["slide_id"]: r["patient_id"] for r in rows}["s3"] == "p1"
    assert read_predictions(out / "fold0" / "predictions.csv").patient_ids is not None
    assert json.loads((out / "evaluation.json").read_text())["resampled"] == "patients"
    assert "over patients within folds" in (out / "evaluation.md").read_text()
    lab.write_text("".join(",".join(r.split(",")[::2]) + "\n" for r in lab.read_text().splitlines()))  # no patients
    res = run_cv(feats, lab, tmp_path / "run2", cfg=TrainConfig(model="mean", **FAST), folds=2, n_bootstrap=20,
                 verbose=False)
    assert res["resampled"] == "slides" and "patient_id" not in (tmp_path / "run2" / "predictions.csv").read_text()


@pytest.mark.parametrize("model", ["abmil", "transmil"])
def test_nan_features_are_named_without_standardisation_too(tmp_path, model):
    """--standardize false: a NaN tile in a training slide made the loss and then every weight NaN; the fold
    trained on silently, its model predicted NaN for clean test slides. It is one line naming the file."""
    from gigaslide.mil.bags import Bags
    from gigaslide.mil.train import train_fold

    feats, _ = _make(tmp_path, n=8)
    ff = store.load(feats / "s3.h5")
    x = np.asarray(ff.features).copy()
    x[1, 0] = np.inf
    store.save(feats / "s3.h5", x, ff.coords, attrs={"encoder": "toy", "slide_id": "s3"})
    bags = Bags([store.load(feats / f"s{i}.h5", arrays=False) for i in range(8)], 0)
    y = np.arange(8) % 2
    with pytest.raises(GigaslideError, match=r"s3\.h5: 1 tile\(s\) have NaN/inf features"):
        train_fold(bags.take([0, 1, 2, 3]), y[:4], bags.take([4, 5]), y[4:6], 8, 2,
                   TrainConfig(model=model, standardize=False, **FAST))


def test_a_diverged_model_stops_training_with_the_fix_not_retrain(tmp_path):
    """--lr 1e9: the weights went NaN in the first epoch; the fold was saved as finished with NaN predictions and the
    run ended 'predictions contain NaN ... the model diverged; retrain' -- which diverges again, deterministically.
    It stops at the first NaN training loss (round 6; before, at the first NaN validation score), saying to lower the
    learning rate, with no fold written."""
    feats, lab = _make(tmp_path, n=12)
    out = tmp_path / "run"
    with pytest.raises(GigaslideError, match=r"training loss is nan at epoch 0, step \d+ \(bag s\d+\.h5\): training "
                                             r"diverged.*lower --lr"):
        run_cv(feats, lab, out, cfg=TrainConfig(model="transmil", **{**FAST, "lr": 1e9}), folds=2, n_bootstrap=0,
               verbose=False)
    assert not (out / "fold0" / "predictions.csv").exists()


def test_run_cv_with_class_names(tmp_path):
    """A CLAM-style labels.csv (case_id,slide_id,label with names): trained as 0..C-1 in sorted name order, the names
    in run.json, in every fold's and the pooled prediction CSV (class_name column) and in the evaluation."""
    feats, lab = _make(tmp_path)
    rows = lab.read_text().splitlines()
    names = {"0": "normal_tissue", "1": "tumor_tissue"}
    lab.write_text("case_id,slide_id,label\n" + "".join(
        f"{p},{s},{names[y]}\n" for s, p, y in (r.split(",") for r in rows[1:])))
    out = tmp_path / "run"
    res = run_cv(feats, lab, out, cfg=TrainConfig(model="mean", **FAST), folds=3, n_bootstrap=20, verbose=False)
    want = ["normal_tissue", "tumor_tissue"]
    assert res["class_names"] == want and res["class_counts"] == [12, 12] and res["resampled"] == "patients"
    assert json.loads((out / "run.json").read_text())["class_names"] == want
    assert json.loads((out / "fold0" / "config.json").read_text())["class_names"] == want
    for f in (out / "predictions.csv", out / "fold1" / "predictions.csv"):
        lines = f.read_text().splitlines()
        assert lines[0].endswith(",patient_id,class_name")
        assert all(r.endswith(want[int(r.split(",")[1])]) for r in lines[1:])
    assert "0 = normal_tissue: 12, 1 = tumor_tissue: 12" in (out / "evaluation.md").read_text()


def test_a_damaged_or_nan_bag_is_refused_before_any_fold_trains(tmp_path, monkeypatch):
    """A feature chunk that fails its checksum (or a NaN tile) in a test slide of fold 0 was found only when fold 0,
    trained, predicted its test slides: hours lost on a cohort. Every bag is read before the first fold trains."""
    import h5py

    import gigaslide.mil.cv as cv

    feats, lab = _make(tmp_path)
    run_cv(feats, lab, tmp_path / "ref", cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0,
           verbose=False)
    test0 = json.loads((tmp_path / "ref" / "splits.json").read_text())["per_fold"]["fold0"]["test"][0]
    p = feats / f"{test0}.h5"
    with h5py.File(p, "r") as f:
        off = f["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(p.read_bytes())
    raw[off + 10] ^= 0xFF  # the header stays readable
    p.write_bytes(bytes(raw))
    calls = []

    def trains(*a, **k):
        calls.append(1)
        raise AssertionError("a fold trained before the bags were checked")

    monkeypatch.setattr(cv, "train_fold", trains)
    with pytest.raises(GigaslideError, match=rf"{test0}\.h5: cannot read HDF5"):
        run_cv(feats, lab, tmp_path / "run", cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0,
               verbose=False)
    assert calls == []


def test_every_unreadable_feature_file_is_named_in_one_line(tmp_path):
    feats, lab = _make(tmp_path)
    for s in ("s4", "s17"):
        p = feats / f"{s}.h5"
        p.write_bytes(p.read_bytes()[:300])  # truncated copies
    with pytest.raises(GigaslideError, match=r"2 feature files cannot be read: s17\.h5: cannot read HDF5 .*; "
                                             r"s4\.h5: cannot read HDF5") as e:
        run_cv(feats, lab, tmp_path / "run", cfg=TrainConfig(model="abmil", **FAST), folds=3, n_bootstrap=0,
               verbose=False)
    assert "\n" not in str(e.value)

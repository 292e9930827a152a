"""Fine-tune evaluation: learns an easy task, low-label subsets, resume, exported encoder, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gigaslide import runs
from gigaslide.cli.main import main as cli
from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.metrics import METRICS
from gigaslide.ssl.tile.finetune import FinetuneConfig, compare_runs, finetune_tiles, label_subset, saved_predictions
from gigaslide.testing import make_tile_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    return make_tile_folder(d / "train", 40, seed=0), make_tile_folder(d / "test", 20, seed=1)


CFG = dict(epochs=3, batch_size=16, lr=1e-3, head_lr=1e-2, workers=0, n_bootstrap=50, patience=3)


def test_label_subset_is_stratified_with_two_per_class():
    y = np.array([0] * 90 + [1] * 10)
    idx = label_subset(y, 0.01, seed=0)
    assert np.bincount(y[idx]).tolist() == [2, 2]  # 1 % would give 1 and 0: at least two per class
    idx = label_subset(y, 0.5, seed=0)
    assert np.bincount(y[idx]).tolist() == [45, 5]
    assert np.array_equal(idx, label_subset(y, 0.5, seed=0))
    with pytest.raises(GigaslideError, match="outside"):
        label_subset(y, 0.0, seed=0)


def test_finetune_learns_reports_resumes_and_exports(folders, tmp_path):
    train, test = folders
    out = tmp_path / "ft"
    cfg = FinetuneConfig(fractions=(0.1, 1.0), **CFG)
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    full, low = rep["protocols"]["finetune_100%"], rep["protocols"]["finetune_10%"]
    assert full["balanced_accuracy"]["value"] >= 0.9, full
    assert full["n_labels"] == 80 and low["n_labels"] == 8  # 10 % of 40 per class = 4 per class
    assert full["n_val"] == 16 and low["n_val"] == 2
    assert full["auc"]["ci_low"] <= full["auc"]["value"] <= full["auc"]["ci_high"]
    for f in ("report.json", "report.md", "report.png"):
        assert (out / f).is_file()
    assert "finetune_10%" in (out / "report.md").read_text()
    # the fine-tuned encoder is an export folder that differs from the random start
    enc = build_encoder(str(out / "fraction_100pct" / "encoder"))
    assert enc.weights_id != build_encoder("test_resnet", "random").weights_id and enc.spec.name == "test_resnet_finetuned"
    # same settings: finished fractions are reused, not re-trained
    stamp = (out / "fraction_100pct" / "result.json").stat().st_mtime_ns
    rep2 = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    assert (out / "fraction_100pct" / "result.json").stat().st_mtime_ns == stamp
    assert rep2["protocols"]["finetune_100%"]["auc"] == full["auc"]
    # lost result, checkpoint kept (interrupted after the last epoch): resumes without training again
    (out / "fraction_100pct" / "result.json").unlink()
    state = runs.load_checkpoint(out / "fraction_100pct")["state"]
    assert state["epoch"] == 3 and len(state["history"]) == 3
    rep3 = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    assert rep3["protocols"]["finetune_100%"]["auc"]["value"] == pytest.approx(full["auc"]["value"])
    assert rep3["protocols"]["finetune_100%"]["train_seconds"] == full["train_seconds"]


def test_the_test_predictions_are_returned_for_paired_comparisons(folders, tmp_path):
    train, test = folders
    out = tmp_path / "ft"
    cfg = FinetuneConfig(fractions=(1.0,), **CFG)
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    probs, y = rep["test_probs"]["finetune_100%"], rep["test_labels"]
    assert probs.shape == (40, 2) and np.bincount(y).tolist() == [20, 20]
    # the predictions the reported scores were computed from
    reported = rep["protocols"]["finetune_100%"]["balanced_accuracy"]["value"]
    assert METRICS["balanced_accuracy"](y, probs) == pytest.approx(reported)
    assert "test_probs" not in json.loads((out / "report.json").read_text())["protocols"]["finetune_100%"]
    # a result kept from before predictions were stored: predicted again from the finished checkpoint, not re-trained
    res_file = out / "fraction_100pct" / "result.json"
    old = json.loads(res_file.read_text())
    res_file.write_text(json.dumps({k: v for k, v in old.items() if k != "test_probs"}))
    rep2 = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    assert np.allclose(rep2["test_probs"]["finetune_100%"], probs, atol=1e-6)
    assert rep2["protocols"]["finetune_100%"]["train_seconds"] == rep["protocols"]["finetune_100%"]["train_seconds"]
    assert "test_probs" in json.loads(res_file.read_text())


def test_another_test_folder_or_training_tiles_are_not_answered_from_the_old_result(folders, tmp_path):
    """Re-run into the same --out: another --test folder is predicted again from the finished model (its scores were
    the old folder's, under the new folder's header); other training tiles of the same count train again; another
    --bootstrap only draws the CIs again."""
    from gigaslide.testing import make_tile_folder

    train, test = folders
    out = tmp_path / "ft"
    cfg = FinetuneConfig(fractions=(1.0,), **{**CFG, "epochs": 1})
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    test2 = make_tile_folder(tmp_path / "test2", 7, seed=5)
    rep2 = finetune_tiles(train, test2, "test_resnet", out, weights="random", cfg=cfg)
    probs2, y2 = rep2["test_probs"]["finetune_100%"], rep2["test_labels"]
    assert probs2.shape == (14, 2) and rep2["test"]["n"] == 14  # the new folder's tiles, not the old 40
    assert METRICS["balanced_accuracy"](y2, probs2) == pytest.approx(
        rep2["protocols"]["finetune_100%"]["balanced_accuracy"]["value"])
    assert rep2["protocols"]["finetune_100%"]["train_seconds"] == rep["protocols"]["finetune_100%"]["train_seconds"]
    rep3 = finetune_tiles(train, test2, "test_resnet", out, weights="random", cfg=FinetuneConfig(
        fractions=(1.0,), **{**CFG, "epochs": 1, "n_bootstrap": 20}))
    assert rep3["protocols"]["finetune_100%"]["train_seconds"] == rep["protocols"]["finetune_100%"]["train_seconds"]
    assert np.array_equal(rep3["test_probs"]["finetune_100%"], probs2) and rep3["n_bootstrap"] == 20
    other = make_tile_folder(tmp_path / "train2", 40, seed=9)  # same count and classes, other tiles
    rep4 = finetune_tiles(other, test2, "test_resnet", out, weights="random", cfg=cfg)
    assert not np.allclose(rep4["test_probs"]["finetune_100%"], probs2)  # trained again on the new tiles


def test_interrupted_run_resumes_from_the_last_epoch(folders, tmp_path, monkeypatch):
    import gigaslide.ssl.tile.finetune as ft

    train, test = folders
    out = tmp_path / "ft"
    cfg = FinetuneConfig(**CFG)
    real, calls = ft.predict_tiles, []

    def interrupt_in_second_validation(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "predict_tiles", interrupt_in_second_validation)
    with pytest.raises(KeyboardInterrupt):
        finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    run = out / "fraction_100pct"
    assert not (run / "result.json").exists() and not (out / "report.json").exists()
    first = runs.load_checkpoint(run)["state"]
    assert first["epoch"] == 1
    monkeypatch.setattr(ft, "predict_tiles", real)
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=cfg)
    hist = json.loads((run / "result.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and hist[0] == first["history"][0]  # epoch 0 not re-trained
    assert rep["protocols"]["finetune_100%"]["epochs_run"] == 3
    # other settings: the checkpoint is not reused, the run starts over
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=FinetuneConfig(**{**CFG, "epochs": 1}))
    assert rep["protocols"]["finetune_100%"]["epochs_run"] == 1


def test_bad_input(folders, tmp_path):
    train, test = folders
    cfg = FinetuneConfig(**CFG)
    other = make_tile_folder(tmp_path / "other", 2, classes=("a", "b"))
    with pytest.raises(GigaslideError, match="differ from training classes"):
        finetune_tiles(train, other, "test_resnet", tmp_path / "o1", weights="random", cfg=cfg)
    one = make_tile_folder(tmp_path / "one", 3, classes=("only",))
    with pytest.raises(GigaslideError, match="single class"):
        finetune_tiles(one, one, "test_resnet", tmp_path / "o2", weights="random", cfg=cfg)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(GigaslideError, match="no class sub-folders"):
        finetune_tiles(flat, test, "test_resnet", tmp_path / "o3", weights="random", cfg=cfg)
    with pytest.raises(GigaslideError, match="augmentation"):
        finetune_tiles(train, test, "test_resnet", tmp_path / "o4", weights="random", cfg=FinetuneConfig(**{**CFG, "augment": "x"}))
    (train / "normal" / "broken.png").write_bytes(b"not a png")
    try:
        with pytest.raises(GigaslideError, match="broken.png"):
            finetune_tiles(train, test, "test_resnet", tmp_path / "o5", weights="random", cfg=cfg)
    finally:
        (train / "normal" / "broken.png").unlink()


def test_cli_finetune(folders, tmp_path, capsys):
    train, test = folders
    out = tmp_path / "cli"
    rc = cli(["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
              "--weights", "random", "--out", str(out), "--epochs", "1", "--batch-size", "16", "--workers", "0",
              "--bootstrap", "20", "--fractions", "0.5"])
    assert rc == 0
    assert "finetune_50%" in capsys.readouterr().out
    assert (out / "fraction_50pct" / "encoder" / "encoder.json").is_file()
    assert cli(["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
                "--out", str(out), "--fractions", "x"]) == 2


def test_cli_compares_two_runs_paired_on_the_same_test_tiles(folders, tmp_path, capsys):
    train, test = folders
    args = ["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
            "--weights", "random", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--bootstrap", "50"]
    assert cli([*args, "--fractions", "0.5,1", "--out", str(tmp_path / "a")]) == 0
    assert cli([*args, "--out", str(tmp_path / "b"), "--lr", "1e-3", "--fractions", "1", "--baseline",
                str(tmp_path / "a")]) == 0
    assert "Paired vs" in capsys.readouterr().out
    cmp = json.loads((tmp_path / "b" / "comparison.json").read_text())
    assert list(cmp["protocols"]) == ["finetune_100%"]  # the one fraction both runs have
    # the difference is b's score minus a's, on the same tiles, from the saved predictions
    a_rep, a_probs = saved_predictions(tmp_path / "a")
    b_rep, b_probs = saved_predictions(tmp_path / "b")
    y = np.array([0] * 20 + [1] * 20)  # make_tile_folder's classes in sorted order, 20 each
    want = {m: METRICS[m](y, b_probs["finetune_100%"]) - METRICS[m](y, a_probs["finetune_100%"])
            for m in ("balanced_accuracy", "auc")}
    got = cmp["protocols"]["finetune_100%"]
    assert got["auc"]["diff"] == pytest.approx(want["auc"]) and got["balanced_accuracy"]["diff"] == pytest.approx(
        want["balanced_accuracy"])
    assert "finetune_100%" in (tmp_path / "b" / "comparison.md").read_text()


def test_a_baseline_on_other_tiles_or_without_a_report_is_refused(folders, tmp_path, capsys):
    train, test = folders
    cfg = FinetuneConfig(fractions=(1.0,), **{**CFG, "epochs": 1})
    rep = finetune_tiles(train, test, "test_resnet", tmp_path / "a", weights="random", cfg=cfg)
    assert compare_runs(rep, tmp_path / "a")["finetune_100%"]["auc"]["diff"] == 0.0  # a run against itself
    other = make_tile_folder(tmp_path / "other", 20, seed=5)
    finetune_tiles(train, other, "test_resnet", tmp_path / "o", weights="random", cfg=cfg)
    with pytest.raises(GigaslideError, match="other tiles"):
        compare_runs(rep, tmp_path / "o")
    rc = cli(["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
              "--weights", "random", "--out", str(tmp_path / "c"), "--baseline", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "other tiles" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # refused before any training
    # a report from before the test tiles were recorded: told to re-run it (its fractions are reused)
    old = json.loads((tmp_path / "o" / "report.json").read_text())
    (tmp_path / "o" / "report.json").write_text(json.dumps({**old, "test": {"path": str(other), "n": 40}}))
    with pytest.raises(GigaslideError, match="does not record its test tiles.*re-run"):
        compare_runs(rep, tmp_path / "o")
    # a folder that is no fine-tune run: refused before any training, in one line
    rc = cli(["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
              "--weights", "random", "--out", str(tmp_path / "c"), "--baseline", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2 and "no fine-tune report" in err and "nothing" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_fp16_fine_tuning_scales_the_loss(folders, tmp_path):
    """fp16 autocast fine-tunes with a loss scaler (small gradients would flush to zero); the checkpoint keeps it."""
    train, test = folders
    finetune_tiles(train, test, "test_resnet", tmp_path / "o", weights="random",
                   cfg=FinetuneConfig(fractions=(1.0,), **{**CFG, "epochs": 1, "precision": "fp16"}))
    ck = runs.load_checkpoint(next((tmp_path / "o").glob("**/checkpoint")).parent)
    assert {"scale", "growth_factor"} <= set(ck["scaler"])  # a scaler that is off keeps no state


def test_test_tiles_that_are_training_tiles_are_refused_before_training(folders, tmp_path):
    """--test equal to --train, or a test tile copied among the training tiles: fine-tuned and scored on tiles it
    trained on, without a word."""
    import shutil

    train, test = folders
    cfg = FinetuneConfig(**{**CFG, "epochs": 1})
    with pytest.raises(GigaslideError, match="the test folder is the training folder.*fix:"):
        finetune_tiles(train, train, "test_resnet", tmp_path / "o1", weights="random", cfg=cfg)
    leaky = tmp_path / "leaky"
    shutil.copytree(train, leaky)
    shutil.copy(test / "tumor" / sorted(p.name for p in (test / "tumor").iterdir())[0], leaky / "tumor" / "dup.png")
    with pytest.raises(GigaslideError, match=r"test tile tumor/\S+ is also a training tile \(tumor/dup\.png"):
        finetune_tiles(leaky, test, "test_resnet", tmp_path / "o2", weights="random", cfg=cfg)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_baseline_that_drew_other_labels_is_refused(folders, tmp_path, capsys):
    """Another --seed draws other tiles for a label fraction: two runs of two encoders then differed in their labels
    too, and were compared (paired, 'better') as if only the encoder did. Refused before training where the
    baseline's settings tell (--seed, --max-train), and on the fractions' recorded training tiles."""
    from gigaslide.ssl.tile.finetune import compare_reports

    train, test = folders
    args = ["evaluate", "finetune", "--train", str(train), "--test", str(test), "--encoder", "test_resnet",
            "--weights", "random", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--bootstrap", "20",
            "--fractions", "0.5"]
    assert cli([*args, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert cli([*args, "--out", str(tmp_path / "b"), "--seed", "1", "--baseline", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "seed=0" in err and "--seed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    a_rep, a_probs = saved_predictions(tmp_path / "a")
    fp = a_rep["protocols"]["finetune_50%"]["train_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 16
    here = {**a_rep, "test_probs": a_probs, "test_labels": np.repeat([0, 1], 20)}
    assert compare_reports(here, here, n_bootstrap=10)["finetune_50%"]["auc"]["diff"] == 0.0
    other = {**here, "protocols": {"finetune_50%": {**a_rep["protocols"]["finetune_50%"], "train_fingerprint": "x"}}}
    with pytest.raises(GigaslideError, match="finetune_50% of the baseline trained on other tiles"):
        compare_reports(here, other, n_bootstrap=10)


def test_fine_tune_cis_resample_the_test_tiles_within_each_class(tmp_path):
    from gigaslide.evaluation.metrics import bootstrap_indices, percentile_ci

    abc = ("a", "b", "c")  # a and c share their colour: an AUC below 1, a CI of some width
    train = make_tile_folder(tmp_path / "train", 6, seed=0, classes=abc)
    test = make_tile_folder(tmp_path / "test", 10, seed=1, classes=abc)
    cfg = FinetuneConfig(fractions=(1.0,), **{**CFG, "epochs": 1, "n_bootstrap": 100})
    rep = finetune_tiles(train, test, "test_resnet", tmp_path / "a", weights="random", cfg=cfg)
    y, p = rep["test_labels"], rep["test_probs"]["finetune_100%"].astype(np.float64)
    reps = [METRICS["auc"](y[i], p[i]) for i in bootstrap_indices(len(y), 100, 0, strata=y)]
    got = rep["protocols"]["finetune_100%"]["auc"]
    assert got["ci_high"] - got["ci_low"] > 0.05  # not a degenerate CI that any resampling would give
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(percentile_ci(np.array(reps)), abs=1e-6)
    # a result kept from before (CIs over unstratified resamples): its CIs are drawn again, the model not re-trained
    res_file = tmp_path / "a" / "fraction_100pct" / "result.json"
    old = json.loads(res_file.read_text())
    old.pop("bootstrap")
    res_file.write_text(json.dumps({**old, "auc": {**old["auc"], "ci_low": 0.0, "ci_high": 1.0}}))
    again = finetune_tiles(train, test, "test_resnet", tmp_path / "a", weights="random", cfg=cfg)["protocols"]
    assert again["finetune_100%"]["auc"] == got and "bootstrap" not in again["finetune_100%"]
    assert again["finetune_100%"]["train_seconds"] == rep["protocols"]["finetune_100%"]["train_seconds"]

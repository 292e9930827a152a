"""Review round 7: what a trained StreamingCLAM run hands to heatmap-streaming (the normalisation it trained with,
relative paths it was given, a checkpoint's head) and the caller's global state after the Python API."""

from __future__ import annotations

import csv
import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.streaming.cv import run_training
from gigaslide.streaming.heatmap import load_run_model, streaming_heatmap
from gigaslide.streaming.train import TrainConfig

from .conftest import labelled_slides

SMALL = {"encoder": "test_resnet", "weights": "random", "mpp": 1.5, "image_size": 320, "tile_size": 256,
         "pool_kernel": 2, "folds": 2, "epochs": 2, "freeze_epochs": 1, "accumulate": 1, "precision": "fp32", "seed": 0,
         "checkpoint_blocks": False, "device": "cpu"}


def _export(folder: Path) -> Path:
    """A test_resnet export whose mean/std are far from the registry's (as an SSL export's may be)."""
    from gigaslide.encoders import build_encoder
    from gigaslide.encoders.model import export_encoder

    enc = build_encoder("test_resnet", "random", seed=3)
    return export_encoder(folder, enc.trunk, dataclasses.replace(enc.spec, name="my_ssl", mean=(0.2, 0.3, 0.4),
                                                                 std=(0.1, 0.1, 0.1)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):  # noqa: ANN001, ANN201
    d = labelled_slides(tmp_path_factory.mktemp("r7slides"), 4)
    (d / "mpp.csv").write_text("slide_id,mpp\n" + "".join(f"s{i},0.5\n" for i in range(4)))
    return d


def _train(out: Path, data: Path, **kw) -> Path:  # noqa: ANN003
    run_training(str(data), str(data / "labels.csv"), str(out), TrainConfig(**{**SMALL, **kw}), log=lambda *a: None)
    return out


def _fold_prediction(run: Path) -> tuple[str, list[float]]:
    row = next(csv.DictReader(open(run / "fold0" / "predictions.csv")))
    return row["slide_id"], [float(row["prob_0"]), float(row["prob_1"])]


@pytest.fixture(scope="module")
def export_run(data, tmp_path_factory):  # noqa: ANN001, ANN201
    """Trained with --weights EXPORT (own mean/std) and a relative --slide-mpp CSV, from the slides' folder."""
    tmp = tmp_path_factory.mktemp("r7run")
    exp = _export(tmp / "export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(data)
        return _train(tmp / "run", Path("."), weights=str(exp), slide_mpp="mpp.csv"), exp


def test_heatmap_normalises_as_the_run_trained_after_the_export_moved(export_run, data, tmp_path,  # noqa: ANN001
                                                                     monkeypatch) -> None:  # noqa: ANN001
    """The heatmap built the model from the export folder as it is *now*: moved (or deleted, re-exported), it fell back
    to the registry's mean/std silently -- P 0.513 instead of the run's own 0.541 on this slide."""
    run, exp = export_run
    sid, want = _fold_prediction(run)
    moved = tmp_path / "elsewhere"
    shutil.move(str(exp), moved)
    try:
        monkeypatch.chdir(data)
        res = streaming_heatmap(data / f"{sid}.tif", run, tmp_path / "a.png", device="cpu")
    finally:
        shutil.move(str(moved), exp)
    np.testing.assert_allclose(res["probs"], want, rtol=0, atol=1e-6)


def test_heatmap_reads_relative_run_paths_from_another_directory(export_run, data, tmp_path,  # noqa: ANN001
                                                                 monkeypatch) -> None:  # noqa: ANN001
    """``--slide-mpp mpp.csv`` (relative) was recorded as given: heatmap-streaming from another working directory
    failed 'mpp.csv: mpp table not found', though run.json records where the run read it."""
    run, _ = export_run
    sid, want = _fold_prediction(run)
    monkeypatch.chdir(tmp_path)
    res = streaming_heatmap(data / f"{sid}.tif", run, tmp_path / "a.png", device="cpu")
    np.testing.assert_allclose(res["probs"], want, rtol=0, atol=1e-6)


def test_heatmap_finds_a_relative_encoder_export_from_another_directory(data, tmp_path,  # noqa: ANN001
                                                                       monkeypatch) -> None:  # noqa: ANN001
    """``--encoder export`` (a relative export folder) made heatmap-streaming from elsewhere fail: unknown encoder."""
    _export(tmp_path / "export")
    monkeypatch.chdir(tmp_path)
    run = _train(tmp_path / "run", data, encoder="export", weights="default", epochs=1, freeze_epochs=0)
    sid, want = _fold_prediction(run)
    monkeypatch.chdir(data)
    res = streaming_heatmap(data / f"{sid}.tif", run, tmp_path / "a.png", device="cpu")
    np.testing.assert_allclose(res["probs"], want, rtol=0, atol=1e-6)


def _with_classifier(run: Path, dst: Path, weight: torch.Tensor) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("canvases", "checkpoint", "heatmaps"))
    sd = load_file(str(dst / "fold0" / "best.safetensors"))
    sd["head.classifier.weight"] = weight
    save_file(sd, str(dst / "fold0" / "best.safetensors"))
    return dst


def test_absurd_classifier_shape_is_refused_before_a_model_is_built(export_run, tmp_path,  # noqa: ANN001
                                                                   monkeypatch) -> None:  # noqa: ANN001
    """A shared checkpoint whose classifier claims [10^8, 0] (no bytes) made the heatmap build a head with 10^8
    instance classifiers: a hang, then out of memory (measured: no answer in 60 s). One line now, before anything is
    built (checked here with 5000 classes, which the old code built before failing); so is a head of another class
    count than the run's (recorded in run.json)."""
    import gigaslide.streaming.heatmap as H

    run, _ = export_run
    built: list[int] = []
    real = H.build_model
    monkeypatch.setattr(H, "build_model", lambda cfg, n, dev: built.append(n) or real(cfg, n, dev))
    bomb = _with_classifier(run, tmp_path / "bomb", torch.zeros(5000, 0))
    with pytest.raises(GigaslideError, match=r"classifier.*has shape \[5000, 0\]") as e:
        load_run_model(bomb, 0, "cpu")
    assert "\n" not in e.value.one_line()
    three = _with_classifier(run, tmp_path / "three", torch.zeros(3, 128))
    with pytest.raises(GigaslideError, match=r"has shape \[3, 128\], not \[2, D\]: the run has 2 classes"):
        load_run_model(three, 0, "cpu")
    assert built == []


def test_damaged_checkpoint_is_one_line(export_run, tmp_path) -> None:  # noqa: ANN001
    run, _ = export_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("canvases", "checkpoint", "heatmaps"))
    (bad / "fold0" / "best.safetensors").write_bytes(bytes(range(100)))
    with pytest.raises(GigaslideError, match="unreadable checkpoint"):
        load_run_model(bad, 0, "cpu")


def _rng() -> tuple:
    st = np.random.get_state()
    return random.getstate(), st[1].tobytes(), st[2], torch.get_rng_state()


def test_api_keeps_the_callers_random_streams(data, export_run, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """run_training and streaming_heatmap reset torch's global RNG to the run's seed (building the trunk seeds it)
    and drew from it: a notebook's next torch.rand was the same after every call."""
    run, _ = export_run
    monkeypatch.chdir(data)  # where the run was given its relative --slide-mpp
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    before = _rng()
    _train(tmp_path / "run", data, epochs=1, freeze_epochs=0)
    streaming_heatmap(data / "s1.tif", run, tmp_path / "a.png", device="cpu")
    after = _rng()
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])


def test_grid_of_a_fold_trained_since_is_refused(export_run, data, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A grid saved while a fold trained (or before it was trained again) was shown by the viewer as the run's
    attention after best.safetensors changed: the grid now records the checkpoint it was computed with."""
    from safetensors.torch import load_file, save_file

    from gigaslide.streaming.grids import load_grid

    run = tmp_path / "run"
    shutil.copytree(export_run[0], run, ignore=shutil.ignore_patterns("canvases", "checkpoint", "heatmaps"))
    monkeypatch.chdir(data)
    streaming_heatmap(data / "s1.tif", run, tmp_path / "a.png", device="cpu")
    assert load_grid(run, "s1", 0).slide_id == "s1"  # the checkpoint it was made with: read
    best = run / "fold0" / "best.safetensors"
    sd = load_file(str(best))
    sd["head.classifier.bias"] = sd["head.classifier.bias"] + 1  # the fold trained further
    save_file(sd, str(best))
    with pytest.raises(GigaslideError, match=r"another fold0/best.safetensors"):
        load_grid(run, "s1", 0)


@pytest.mark.parametrize("key,value,want", [("tile_size", "abc", "of type int"), ("mpp", "x", "a finite number")])
def test_run_config_of_a_wrong_type_is_one_line(export_run, data, tmp_path, monkeypatch, key, value,  # noqa: ANN001
                                                want) -> None:  # noqa: ANN001
    """A run.json edited or shared with ``"tile_size": "abc"`` (``"mpp": "x"``) was a ValueError (TypeError)
    traceback."""
    import json

    run = tmp_path / "run"
    shutil.copytree(export_run[0], run, ignore=shutil.ignore_patterns("canvases", "checkpoint", "heatmaps"))
    rec = json.loads((run / "run.json").read_text())
    rec["config"][key] = value
    (run / "run.json").write_text(json.dumps(rec))
    monkeypatch.chdir(data)
    with pytest.raises(GigaslideError, match=rf"config has {key} = {value!r}, not {want}"):
        streaming_heatmap(data / "s1.tif", run, tmp_path / "a.png", device="cpu")


def test_damaged_best_weights_are_one_line(tmp_path) -> None:  # noqa: ANN001
    """train-streaming reads each fold's best.safetensors back to test it: a damaged file was a SafetensorError
    traceback."""
    from gigaslide.streaming.train import load_weights

    bad = tmp_path / "best.safetensors"
    bad.write_bytes(bytes(range(100)))
    with pytest.raises(GigaslideError, match="unreadable weights"):
        load_weights(torch.nn.Linear(2, 2), bad)

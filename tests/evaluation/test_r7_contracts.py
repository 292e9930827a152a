"""Round 7: a tile probe trained on one encoder's features is not tested on another's."""

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation.tiles import evaluate_tile_features
from gigaslide.features import store


def _file(path, sha, src, fp, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 4)).astype(np.float32)
    x[:, 0] += 2 * y
    attrs = {"encoder": "resnet18", "source_folder": src, "tiles_fingerprint": fp, "classes": '["0", "1"]'}
    if sha:
        attrs["encoder_weights_sha256"] = sha
    store.save(path, x, labels=y, attrs=attrs)
    return store.load(path)


def test_train_and_test_features_of_other_weights_of_one_encoder_are_refused(tmp_path):
    """Both files said encoder 'resnet18' with other weights (ImageNet vs an SSL run): the probe trained on one and was
    tested on the other, and its AUC was reported as the encoder's."""
    tr = _file(tmp_path / "tr.h5", "a" * 64, "/t/train", "f1", 0)
    te = _file(tmp_path / "te.h5", "b" * 64, "/t/valid", "f2", 1)
    with pytest.raises(GigaslideError, match=r"other weights of encoder 'resnet18' \(aaaaaaaaaaaaaaaa vs bbbb"):
        evaluate_tile_features(tr, te, "linear", n_bootstrap=0)
    same = _file(tmp_path / "te2.h5", "a" * 64, "/t/valid", "f2", 1)
    rep = evaluate_tile_features(tr, same, "linear", n_bootstrap=0)
    assert rep["protocols"]["linear"]["auc"]["value"] > 0.8
    assert rep["train"]["encoder_weights_sha256"] == "a" * 64  # the report names the weights it probed
    other_tool = _file(tmp_path / "te3.h5", None, "/t/valid", "f2", 1)  # no weights recorded: not refused
    evaluate_tile_features(tr, other_tool, "linear", n_bootstrap=0)


def test_predictions_a_newer_gigaslide_wrote_are_refused(tmp_path):
    """read_predictions never looked at the predictions' record: a layout of a newer format was read as this one's."""
    import json

    from gigaslide.evaluation.slides import read_predictions, write_predictions

    p = tmp_path / "predictions.csv"
    write_predictions(p, ["a", "b"], [0, 1], np.array([[0.8, 0.2], [0.3, 0.7]]), 0, record={"seed": 0})
    assert read_predictions(p).slide_ids == ["a", "b"]
    side = tmp_path / "predictions.provenance.json"
    rec = json.loads(side.read_text())
    side.write_text(json.dumps({**rec, "format_version": 99}))
    with pytest.raises(GigaslideError, match="predictions.provenance.json: written in format version 99"):
        read_predictions(tmp_path)
    side.write_text("{")  # damaged record: the CSV's own checks decide
    assert read_predictions(p).slide_ids == ["a", "b"]

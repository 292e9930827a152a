"""`gigaslide pretrain` and `gigaslide embed-tiles` end to end, and their bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gigaslide.cli.main import main
from gigaslide.cli.ssl import parse_duration, parse_mpps
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.testing import make_tile_folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_tile_folder(tmp_path_factory.mktemp("labelled"), 6, size=32, noise=20.0)


def test_durations_and_mpps():
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    assert parse_duration(None) is None
    with pytest.raises(GigaslideError, match="duration"):
        parse_duration("two hours")
    assert parse_mpps("0.5,1.0,2.0") == [0.5, 1.0, 2.0]
    with pytest.raises(GigaslideError, match="mpp"):
        parse_mpps("0.5,-1")


def test_pretrain_then_embed_then_evaluate(labelled, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["pretrain", "--data", str(labelled), "--out", str(run), "--method", "simclr", "--backbone", "test_resnet",
               "--tile-size", "32", "--steps", "2", "--batch-size", "4", "--workers", "0",
               "--method-args", '{"hidden_dim": 16, "out_dim": 8}'])
    assert rc == 0, capsys.readouterr().err
    assert (run / "encoder" / "encoder.json").is_file()
    # --encoder may be the run folder, its checkpoint/ or its encoder/
    for enc in (run, run / "checkpoint", run / "encoder"):
        out = tmp_path / f"{enc.name}.h5"
        assert main(["embed-tiles", str(labelled), "--encoder", str(enc), "--out", str(out)]) == 0
    ff = store.load(tmp_path / "encoder.h5")
    assert ff.features.shape == (12, 96) and sorted(set(ff.labels.tolist())) == [0, 1]
    assert json.loads(ff.attrs["classes"]) == ["normal", "tumor"]
    assert ff.encoder == "test_resnet_simclr" and ff.attrs["encoder_weights_sha256"].startswith("sha256:")
    np.testing.assert_allclose(store.load(tmp_path / "run.h5").features, ff.features, atol=1e-5)
    held_out = make_tile_folder(tmp_path / "held_out", 6, size=32, noise=20.0, seed=1)  # other tiles to test on
    assert main(["embed-tiles", str(held_out), "--encoder", str(run), "--out", str(tmp_path / "test.h5")]) == 0
    rc = main(["evaluate", "tiles", "--train", str(tmp_path / "encoder.h5"), "--test", str(tmp_path / "test.h5"),
               "--protocol", "linear,knn", "--bootstrap", "10", "--out", str(tmp_path / "report")])
    assert rc == 0 and (tmp_path / "report" / "report.json").is_file()
    # the training tiles as test tiles are refused in one line (a probe scored on its own training tiles)
    assert main(["evaluate", "tiles", "--train", str(tmp_path / "encoder.h5"), "--test", str(tmp_path / "encoder.h5"),
                 "--out", str(tmp_path / "leak")]) == 2
    assert "the test tiles are the training tiles" in capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(labelled, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(labelled), "--out", str(tmp_path / "r"), "--steps", "1",
                 "--method-args", "{oops"]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["embed-tiles", str(tmp_path / "empty"), "--encoder", "test_resnet", "--weights", "random",
                 "--out", str(tmp_path / "f.h5")]) == 2
    assert "no images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "x").mkdir(parents=True)
    (broken / "x" / "bad.jpg").write_bytes(b"not a jpeg")
    (broken / "y").mkdir()
    (broken / "y" / "ok.png").write_bytes((labelled / "tumor" / "000.png").read_bytes())
    # an unreadable tile is left out, the others embedded, and the user is told which (it was silent)
    assert main(["embed-tiles", str(broken), "--encoder", "test_resnet", "--weights", "random",
                 "--out", str(tmp_path / "b.h5")]) == 0
    err = capsys.readouterr().err
    assert "warning: x/bad.jpg: cannot read image" in err and "1 unreadable image(s) left out" in err
    assert store.load(tmp_path / "b.h5").features.shape[0] == 1
    # a half-started run (checkpoint folder, no export yet) is named as such
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    assert main(["embed-tiles", str(labelled), "--encoder", str(tmp_path / "run"), "--out", str(tmp_path / "g.h5")]) == 2
    assert "no exported encoder" in capsys.readouterr().err


def test_one_class_folder_embeds_but_cannot_be_evaluated(labelled, tmp_path, capsys):
    one = tmp_path / "one"
    (one / "tumor").mkdir(parents=True)
    for f in (labelled / "tumor").iterdir():
        (one / "tumor" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "one.h5"
    assert main(["embed-tiles", str(one), "--encoder", "test_resnet", "--weights", "random", "--out", str(out)]) == 0
    assert main(["evaluate", "tiles", "--train", str(out), "--test", str(out), "--out", str(tmp_path / "rep")]) == 2
    assert "single class" in capsys.readouterr().err


def test_flat_folder_embeds_without_labels(labelled, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (labelled / "normal").iterdir():
        (flat / f.name).write_bytes(f.read_bytes())
    assert main(["embed-tiles", str(flat), "--encoder", "test_resnet", "--weights", "random", "--out", str(tmp_path / "f.h5")]) == 0
    ff = store.load(tmp_path / "f.h5")
    assert ff.labels is None and len(ff) == 6


def test_dinov2_recipe_flags_reach_the_run(tmp_path, capsys):
    """Roth et al.'s recipe numbers are flags: crop scales, teacher temperature warm-up, mask ratio, loss weights, EMA."""
    tiles = make_tile_folder(tmp_path / "tiles", 4, size=56, noise=20.0)
    run = tmp_path / "run"
    rc = main(["pretrain", "--data", str(tiles), "--out", str(run), "--method", "dinov2", "--backbone", "test_vit_dinov2",
               "--tile-size", "56", "--steps", "1", "--batch-size", "4", "--workers", "0", "--n-local", "2",
               "--monitor-every", "0", "--global-scale", "0.5,1.0", "--local-scale", "0.1,0.4",
               "--teacher-temp", "0.05,0.06", "--mask-ratio", "0.2,0.3", "--ibot-weight", "0.5", "--koleo-weight", "0",
               "--momentum", "0.9", "--method-args", '{"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64}'])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["global_scale"] == [0.5, 1.0] and cfg["local_scale"] == [0.1, 0.4]
    assert cfg["method_args"] == {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "teacher_temp": 0.06,
                                  "warmup_teacher_temp": 0.05, "mask_ratio_min": 0.2, "mask_ratio_max": 0.3,
                                  "ibot_weight": 0.5, "koleo_weight": 0.0, "momentum": 0.9}
    # --method-args still wins over a flag; a flag of another method is refused by that method
    assert main(["pretrain", "--data", str(tiles), "--out", str(tmp_path / "r2"), "--method", "simclr",
                 "--backbone", "test_resnet", "--tile-size", "56", "--steps", "1", "--workers", "0",
                 "--ibot-weight", "1"]) == 2
    assert "unknown option(s) ['ibot_weight']" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--global-scale", "0.32", "give MIN,MAX"), ("--local-scale", "0.4,0.1", "must not exceed"),
    ("--mask-ratio", "0.1,1.5", "must lie in [0, 1]"), ("--teacher-temp", "0,0.07", "must be positive"),
    ("--koleo-weight", "-1", "must be >= 0"), ("--momentum", "1.0", "must lie in [0, 1)"),
    ("--global-scale", "a,b", "cannot read")])
def test_bad_recipe_flags_are_one_line_errors(labelled, tmp_path, capsys, flag, value, message):
    rc = main(["pretrain", "--data", str(labelled), "--out", str(tmp_path / "r"), "--method", "dinov2",
               "--backbone", "test_vit_dinov2", "--tile-size", "32", "--steps", "1", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_pretrain_on_slides_without_mpp_takes_slide_mpp(tmp_path, capsys):
    """A slide whose file has no resolution is skipped with 'give it with --slide-mpp'; pretrain takes that option
    (a number or a CSV slide_id,mpp), records it, and a resume without it is refused (other tiles)."""
    from gigaslide.testing import make_slide

    make_slide(tmp_path / "slides" / "nompp.tiff", (1024, 768), mpp=None)
    args = ["pretrain", "--data", str(tmp_path / "slides"), "--method", "simclr", "--backbone", "test_resnet",
            "--tile-size", "32", "--mpp", "2.0", "--steps", "1", "--batch-size", "4", "--workers", "0",
            "--monitor-every", "0", "--method-args", '{"hidden_dim": 16, "out_dim": 8}']
    assert main(args + ["--out", str(tmp_path / "r0")]) == 2
    assert "--slide-mpp" in capsys.readouterr().err
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\nnompp,0.5\n")
    for k, v in enumerate(("0.5", str(tmp_path / "mpp.csv"))):
        assert main(args + ["--out", str(tmp_path / f"r{k + 1}"), "--slide-mpp", v]) == 0, capsys.readouterr().err
        assert (tmp_path / f"r{k + 1}" / "encoder" / "encoder.json").is_file()
    assert json.loads((tmp_path / "r1" / "run.json").read_text())["identity"]["slide_mpp"] == 0.5
    assert main(args + ["--out", str(tmp_path / "r1"), "--slide-mpp", "0.25"]) == 2  # other tiles: not resumed
    assert "slide_mpp" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "r1"), "--slide-mpp", "-1"]) == 2
    assert "--slide-mpp -1 must be a positive number" in capsys.readouterr().err

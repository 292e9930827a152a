"""The nuclei commands: help with examples, a tiny end-to-end run, one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gigaslide.cli.main import main


@pytest.mark.parametrize("cmd", ["nuclei-train", "nuclei-eval", "nuclei"])
def test_help_has_an_example(cmd: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert f"Example: gigaslide {cmd}" in capsys.readouterr().out


def test_train_then_eval_from_the_command_line(nuclei_folder: Path, capsys: pytest.CaptureFixture) -> None:
    run = nuclei_folder / "run"
    rc = main(["nuclei-train", "--images", str(nuclei_folder / "images"), "--annotations",
               str(nuclei_folder / "annotations"), "--backbone", "test_resnet", "--weights", "random", "--epochs", "1",
               "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--precision", "fp32", "--out", str(run)])
    assert rc == 0 and (run / "model" / "model.safetensors").is_file()
    split = (run / "split.csv").read_text()
    assert ",a," in split and ",b," in split  # organs from organs.csv beside the images
    rc = main(["nuclei-eval", "--model", str(run), "--images", str(nuclei_folder / "images"), "--annotations",
               str(nuclei_folder / "annotations"), "--bootstrap", "20", "--out", str(nuclei_folder / "rep")])
    assert rc == 0
    rep = json.loads((nuclei_folder / "rep" / "report.json").read_text())
    assert rep["subset"] == "test" and len(rep["images"]) == 2
    # the same run folder with another backbone is refused in one line
    capsys.readouterr()
    rc = main(["nuclei-train", "--images", str(nuclei_folder / "images"), "--annotations",
               str(nuclei_folder / "annotations"), "--backbone", "test_vit", "--weights", "random", "--epochs", "1",
               "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--precision", "fp32", "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "backbone: 'test_resnet' -> 'test_vit'" in err and err.count("\n") == 1


def test_missing_annotations_folder_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "im").mkdir()
    rc = main(["nuclei-train", "--images", str(tmp_path / "im"), "--annotations", str(tmp_path / "none"),
               "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "no images" in err and err.count("\n") == 1


def test_eval_reports_an_image_mpp_that_contradicts_the_annotations(tiny_run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The annotations say 0.25 µm/px; --image-mpp 0.2 is used (explicit wins) and named in the warnings and
    the report for every file, instead of silently rescaling."""
    data = tiny_run
    rc = main(["nuclei-eval", "--model", str(tiny_run / "run"), "--images", str(data / "images"), "--annotations",
               str(data / "annotations"), "--subset", "all", "--image-mpp", "0.2", "--bootstrap", "0",
               "--out", str(tmp_path / "rep")])
    assert rc == 0
    out = capsys.readouterr().out
    n = len(list((data / "images").glob("*.png")))
    assert out.count("--image-mpp 0.2 used, the file says 0.25 µm/px") == n
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sum("the file says 0.25" in p for p in report["problems"]) == n
    assert "the file says 0.25" in (tmp_path / "rep" / "report.md").read_text()


def test_a_model_folder_copied_alone_is_not_scored_on_its_training_images(tiny_run: Path, tmp_path: Path) -> None:
    """Without the run's split.csv beside it, --subset auto scored every image, the 4 it trained and selected on
    included, as a test; model.json names them."""
    import shutil

    from gigaslide.nuclei.data import read_split

    shutil.copytree(tiny_run / "run" / "model", tmp_path / "shared" / "model")
    split = read_split(tiny_run / "run" / "split.csv")
    rc = main(["nuclei-eval", "--model", str(tmp_path / "shared" / "model"), "--images", str(tiny_run / "images"),
               "--annotations", str(tiny_run / "annotations"), "--bootstrap", "0", "--out", str(tmp_path / "rep")])
    assert rc == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sorted(report["images"]) == sorted(i for i, s in split.items() if s == "test") and report["subset"] == "test"
    rc = main(["nuclei-eval", "--model", str(tmp_path / "shared" / "model"), "--images", str(tiny_run / "images"),
               "--annotations", str(tiny_run / "annotations"), "--bootstrap", "0", "--subset", "all",
               "--out", str(tmp_path / "rep_all")])
    assert rc == 0 and len(json.loads((tmp_path / "rep_all" / "report.json").read_text())["images"]) == len(split)

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

"""Central checks of command-line values (gigaslide.cli.validate): values that type-check but cannot work are one
line naming the option, before any slide, image or model is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from gigaslide.cli.main import main, parse
from gigaslide.errors import GigaslideError

PRETRAIN = ["pretrain", "--data", "d", "--out", "o"]


@pytest.mark.parametrize(("argv", "message"), [
    # nuclei: a count grid at 0 µm/px failed every slide with a fix naming --mpp
    (["nuclei", "s", "--model", "m", "--out", "o", "--tile-mpp", "0"], "--tile-mpp 0.0 must be positive"),
    # nuclei-eval / nuclei-train: a negative image resolution was scored / trained on
    (["nuclei-eval", "--model", "m", "--images", "i", "--annotations", "a", "--out", "o", "--image-mpp", "-1"],
     "--image-mpp -1.0 must be positive"),
    (["nuclei-train", "--images", "i", "--annotations", "a", "--out", "o", "--image-mpp", "0"],
     "--image-mpp 0.0 must be positive"),
    # nuclei-train: 0 steps per epoch left a run that never trains ("stopped after 0 epochs")
    (["nuclei-train", "--images", "i", "--annotations", "a", "--out", "o", "--steps-per-epoch", "0"],
     "--steps-per-epoch 0 must be at least 1"),
    # pretrain: shares and rates outside [0, 1], a negative lr multiplier or monitor interval ran silently
    ([*PRETRAIN, "--warmup-frac", "2"], "--warmup-frac 2.0 must be between 0 and 1"),
    ([*PRETRAIN, "--drop-path", "1.5"], "--drop-path 1.5 must be between 0 and 1"),
    ([*PRETRAIN, "--patch-embed-lr-mult", "-1"], "--patch-embed-lr-mult -1.0 must not be negative"),
    ([*PRETRAIN, "--monitor-every", "-1"], "--monitor-every -1 must not be negative"),
])
def test_values_no_stage_can_use_are_refused_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(GigaslideError) as e:
        parse(argv)
    assert message in e.value.one_line() and "fix:" in e.value.one_line()


@pytest.mark.parametrize("argv", [
    [*PRETRAIN, "--warmup-frac", "0"], [*PRETRAIN, "--drop-path", "0.1"], [*PRETRAIN, "--patch-embed-lr-mult", "0"],
    [*PRETRAIN, "--monitor-every", "0"], ["nuclei", "s", "--model", "m", "--out", "o", "--tile-mpp", "0.25"],
    ["nuclei-eval", "--model", "m", "--images", "i", "--annotations", "a", "--out", "o", "--image-mpp", "0.2527"],
])
def test_the_values_the_help_names_still_pass(argv: list[str]) -> None:
    parse(argv)


def test_a_bad_tile_mpp_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["nuclei", str(tmp_path), "--model", str(tmp_path / "run"), "--out", str(out), "--tile-mpp", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--tile-mpp 0.0 must be positive" in err
    assert not out.exists()


@pytest.mark.parametrize(("value", "message"), [
    ("inf", "--slide-mpp inf is not a finite number"),  # a float|str option: "inf" stayed text and was accepted
    ("nan", "--slide-mpp nan is not a finite number"),  # read as a CSV path: "nan: mpp table not found"
    ("1e-7", "1e-07 µm/px is outside"),  # in m: tiling failed every slide with "use --tile-size at most 0"
    ("250", "250 µm/px is outside"),  # in nm
])
def test_a_slide_mpp_that_is_no_scan_resolution_is_refused_once_before_any_slide(value: str, message: str) -> None:
    for argv in (["info", "s.svs", "--slide-mpp", value], ["tile", "s.svs", "--out", "o", "--slide-mpp", value]):
        with pytest.raises(GigaslideError) as e:
            parse(argv)
        assert message in e.value.one_line() and "fix:" in e.value.one_line()


def test_a_slide_mpp_csv_path_and_plausible_numbers_pass() -> None:
    for value in ("0.25", "0.5", "mpp.csv", "12"):
        parse(["info", "s.svs", "--slide-mpp", value])


def test_the_fix_line_of_every_checked_option_suggests_a_value_the_same_check_accepts():
    """`--image-mpp -0.25` said "use e.g. --image-mpp 0", which the same check refuses."""
    from gigaslide.cli import validate as v

    names = v.AT_LEAST_ONE | v.NON_NEGATIVE | v.POSITIVE | v.NON_NEGATIVE_FLOAT | v.FRACTION
    for name in sorted(names):
        text = v._example(name, None).removeprefix(f"use e.g. {v._flag(name)} ")
        value = float(text) if name in v.POSITIVE | v.NON_NEGATIVE_FLOAT | v.FRACTION else int(text)
        v._check_number(name, value, None)  # raises for a suggestion the check itself refuses

"""How the command line reads what the docs show: bool options as flags, comma-separated options given twice, and
the command list's summaries (gigaslide.cli.main)."""

from __future__ import annotations

import inspect
import os
import sys

import pytest

from gigaslide.cli.main import Command, _collect, main, parse


def test_a_bool_option_given_as_a_flag_means_true() -> None:
    base = ["--model", "m", "--out", "o"]
    assert parse(["nuclei", "s", *base, "--tissue-only"])[1]["tissue_only"] is True
    assert parse(["nuclei", "s", "--tissue-only", *base])[1]["tissue_only"] is True
    assert parse(["nuclei", "s", "--tissue-only", "false", *base])[1]["tissue_only"] is False
    assert parse(["nuclei", "s", "--tissue-only", "no", *base])[1]["tissue_only"] is False
    kw = parse(["nuclei", "--tissue-only", "s", *base])[1]  # a positional after the flag stays a positional
    assert kw["tissue_only"] is True and kw["slides"] == ["s"]
    kw = parse(["tile", "s", "--out", "o", "--tissue-from", "g", "--tissue-detect"])[1]
    assert kw["tissue_detect"] is True
    kw = parse(["encode", "s", "--out", "o", "--tile-ahead", "--compile"])[1]  # bool | None too
    assert kw["tile_ahead"] is True and kw["compile"] is True
    assert parse(["encode", "s", "--out", "o", "--tile-ahead", "null"])[1]["tile_ahead"] is None
    # --no-X, as other tools spell false (was "unrecognized arguments: --no_tissue_only", a name not typed)
    assert parse(["nuclei", "s", *base, "--no-tissue-only"])[1]["tissue_only"] is False
    assert parse(["encode", "s", "--out", "o", "--no-fold-bn"])[1]["fold_bn"] is False


def test_a_comma_separated_option_given_twice_keeps_both_values() -> None:
    kw = parse(["benchmark", "--encoders", "resnet18", "--encoders=vit_small", "--tiles", "t", "--slides", "s",
                "--out", "o"])[1]
    assert kw["encoders"] == "resnet18,vit_small"
    assert parse(["pretrain", "--data", "d", "--out", "o", "--mpp", "0.5", "--mpp", "1.0"])[1]["mpp"] == "0.5,1.0"
    kw = parse(["evaluate", "tiles", "--train", "a", "--test", "b", "--out", "r", "--protocol", "linear",
                "--protocol", "knn"])[1]
    assert kw["protocol"] == "linear,knn"
    kw = parse(["tile", "s", "--out", "o", "--tissue-from", "g", "--tissue-classes", "Tumor",
                "--tissue-classes", "Stroma"])[1]
    assert kw["tissue_classes"] == "Tumor,Stroma"
    assert parse(["view", "X", "--runs", "A", "--runs", "B"])[1]["runs"] == ["A", "B"]  # list options: appended
    assert parse(["tile", "s", "--out", "a", "--out", "b"])[1]["out"] == "b"  # a single value: the last one wins


def test_the_command_list_shows_each_commands_whole_summary(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for words, cmd in _commands():
        if len(words) == 1:
            first = " ".join((inspect.getdoc(cmd.func) or "").split("\n\n")[0].split())
            assert first in shown, f"`gigaslide --help` cuts the summary of {words[0]}: {first}"


def _commands() -> list[tuple[tuple[str, ...], Command]]:
    return [((name,), c) for name, c in _collect().items() if isinstance(c, Command)]


def test_a_ctrl_c_that_surfaces_as_another_error_is_one_interrupted_line(monkeypatch, capsys):
    # e.g. numpy half-imported when Ctrl-C came: its next import fails with RecursionError, the interrupt as context
    import gigaslide.cli.main as cli_main

    def run(argv):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RecursionError("maximum recursion depth exceeded while importing numpy.exceptions") from None

    def run_os(argv):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError("callback failed")

    monkeypatch.setattr(cli_main, "run", run)
    assert main(["info", "x"]) == 130  # `from None` hides the context from the traceback but keeps __context__
    assert capsys.readouterr().err.strip() == cli_main.INTERRUPTED
    monkeypatch.setattr(cli_main, "run", run_os)
    assert main(["info", "x"]) == 130
    assert capsys.readouterr().err.strip() == cli_main.INTERRUPTED


def test_other_errors_are_not_taken_for_an_interrupt(monkeypatch):
    import gigaslide.cli.main as cli_main

    def run(argv):
        raise RecursionError("a real bug")

    monkeypatch.setattr(cli_main, "run", run)
    with pytest.raises(RecursionError):
        main(["info", "x"])


def test_info_prints_under_an_ascii_locale(synthetic_slide, tmp_path):
    """With an ASCII stdout (LC_ALL=C where Python does not coerce the locale to UTF-8), `info` ended in a
    UnicodeEncodeError traceback at 'µm/px'; characters the stream cannot encode are now written as escapes."""
    import subprocess

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": ""}
    p = subprocess.run([sys.executable, "-m", "gigaslide", "info", str(synthetic_slide)], env=env,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    out = p.stdout.decode("ascii")  # nothing but ASCII on an ASCII stream
    assert "\\xb5m/px" in out and "Traceback" not in p.stderr.decode(errors="replace")


def test_console_error_handler_writes_file_name_bytes_back_and_escapes_the_rest():
    from gigaslide.cli.main import _printable_streams

    _printable_streams()
    assert "caf\udce9.tiff".encode("utf-8", "gigaslide-print") == b"caf\xe9.tiff"  # the name's own bytes
    assert "0.5 µm/px".encode("ascii", "gigaslide-print") == b"0.5 \\xb5m/px"


@pytest.mark.parametrize("value", ["abc", "0", ""])
def test_an_omp_num_threads_openmp_cannot_use_is_one_warning(value, synthetic_slide):
    """OpenMP printed 'libgomp: Invalid value for environment variable OMP_NUM_THREADS' on every command."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "gigaslide", "info", str(synthetic_slide)],
                       env={**os.environ, "OMP_NUM_THREADS": value}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "libgomp" not in p.stderr
    assert p.stderr.count(f"warning: OMP_NUM_THREADS={value!r} is not a positive whole number") == 1


def test_a_usable_omp_num_threads_is_left_alone(monkeypatch, capsys):
    from gigaslide.cli.main import _check_omp_threads

    for value in ("2", "4,2", " 8 "):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        _check_omp_threads()
        assert os.environ["OMP_NUM_THREADS"] == value
    assert capsys.readouterr().err == ""

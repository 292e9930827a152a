"""Fuzzing every command: generated option values and odd paths must end in one ``error:`` line.

Commands are enumerated from ``gigaslide.cli.main._collect`` (a new command is fuzzed without
touching this file). Each generated call either carries one value no command can use (wrong type,
NaN/inf, zero or negative where a count or size is needed, a huge int, an unknown option, a NUL
byte) or points every required input at a path that does not exist (unicode, spaces,
parentheses). Every call must exit non-zero with exactly one ``error:`` line, no traceback, and
write nothing outside its ``--out``. In process (``main(argv)`` + capsys), a fixed example budget
(``GIGASLIDE_FUZZ_EXAMPLES``, default 120), derandomised so every run tries the same calls.
"""

from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gigaslide.cli.main import Command, _collect, main
from gigaslide.cli.validate import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE

N_EXAMPLES = int(os.environ.get("GIGASLIDE_FUZZ_EXAMPLES", "120"))
CALLS: list[list[str]] = []  # every argv tried (the reliability benchmark counts them)


def _commands() -> list[tuple[list[str], Command]]:
    def walk(cmds, prefix):  # noqa: ANN001, ANN202
        for name, c in cmds.items():
            if isinstance(c, dict):
                yield from walk(c, [*prefix, name])
            else:
                yield [*prefix, name], c

    return sorted(walk(_collect(), []), key=lambda pc: pc[0])


COMMANDS = _commands()


def _kind(ann) -> str:  # noqa: ANN001
    """int, float, bool, str or list of the annotation (Optional / unions: the first of those present)."""
    if isinstance(ann, str):
        ann = eval(ann, vars(typing), {})  # noqa: S307 - annotations of our own functions (from __future__)
    args = typing.get_args(ann) or (ann,)
    names = [getattr(a, "__name__", str(a)) for a in args]
    for k in ("bool", "int", "float", "list", "str"):
        if k in names:
            return k
    return "str"


def _params(func) -> dict[str, tuple[str, bool]]:  # noqa: ANN001
    hints = typing.get_type_hints(func)
    return {p.name: (_kind(hints.get(p.name, str)), p.default is inspect.Parameter.empty)
            for p in inspect.signature(func).parameters.values()}


def _bad_values(name: str, kind: str) -> list[str]:
    """Values that no command may accept for an option of this name and type."""
    if kind == "int":
        out = ["abc", "1.5", "nan", "", "[]", "99999999999999999999999", "-99999999999", "1e400", "(1)"]
        if name in AT_LEAST_ONE:
            out += ["0", "-1"]
        if name in NON_NEGATIVE:
            out += ["-1", "-7"]
        return out
    if kind == "float":
        out = ["nan", "inf", "-inf", "1e400", "abc", "[1]", "", "1,5"]
        if name in POSITIVE:
            out += ["0", "-1", "-0.5"]
        return out
    if kind == "bool":
        return ["maybe", "2", "[]"]
    if name == "background":
        return ["purple", "", "DARK"]
    return ["\x00", "a\x00b"]


PATH_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                    min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))
PATH_DECOR = st.sampled_from(["{}", "{} (1)", "a b/{}", "ü é/{}.svs", "((x))/{}.h5", "空 白/{}", "-{}", "{}.tiff"])


@st.composite
def calls(draw) -> tuple[list[str], Command, dict[str, str], str | None]:  # noqa: ANN001
    path, cmd = draw(st.sampled_from(COMMANDS))
    params = _params(cmd.func)
    options = {n: k for n, (k, _) in params.items() if n not in ("out", cmd.positional)}
    values: dict[str, str] = {}
    bad: str | None = None
    with_bad = draw(st.booleans()) or not any(req for n, (_, req) in params.items() if n != "out")
    if with_bad and options:
        name = draw(st.sampled_from(sorted(options)))
        values[name] = draw(st.sampled_from(_bad_values(name, options[name])))
        bad = name
    elif with_bad or draw(st.integers(0, 9)) == 0:
        bad = "no_such_option"
        values[bad] = "1"
    for n, (k, required) in params.items():
        if required and n != "out" and n not in values:
            values[n] = draw(PATH_DECOR).format(draw(PATH_TEXT))  # a path that does not exist
    return path, cmd, values, bad


def _argv(path: list[str], cmd: Command, values: dict[str, str], root: Path, out: Path) -> list[str]:
    argv = list(path)
    for n, v in values.items():
        v = str(root / "in" / v) if n in _params(cmd.func) and _params(cmd.func)[n][1] else v
        if n == cmd.positional:
            argv += [v] if cmd.nargs is None else [v, v + " 2"]
        else:
            argv += [f"--{n.replace('_', '-')}", v]
    if "out" in _params(cmd.func):
        argv += ["--out", str(out)]
    return argv


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip not in (p, *p.parents)}


@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(call=calls())
def test_fuzz_every_command(call, tmp_path_factory, capsys, monkeypatch):
    path, cmd, values, bad = call
    root = tmp_path_factory.mktemp("fuzz")
    out = root / "out dir (ü) 1"
    monkeypatch.chdir(root)  # relative default outputs (embeddings.h5, demo_out, ...) would show up here
    before = _tree(root, out)
    argv = _argv(path, cmd, values, root, out)
    CALLS.append(argv)
    try:
        code = main(argv)
    except SystemExit as e:  # only --help/--version may exit this way, and the fuzz passes neither
        pytest.fail(f"SystemExit({e.code}) for {argv}")
    err = capsys.readouterr().err
    if os.environ.get("GIGASLIDE_FUZZ_LOG"):  # the reliability benchmark counts the calls and their outcomes
        import json

        with open(os.environ["GIGASLIDE_FUZZ_LOG"], "a") as log:
            log.write(json.dumps({"command": " ".join(path), "code": code, "traceback": "Traceback" in err,
                                  "error_lines": sum(ln.startswith("error:") for ln in err.splitlines())}) + "\n")
    assert code != 0, f"exit 0 for {argv} (bad option: {bad})"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"{argv}: {err}"
    assert _tree(root, out) == before, f"{argv} wrote outside --out: {_tree(root, out) - before}"


def test_every_command_is_fuzzed():
    """The strategy reaches every command (the list comes from _collect, so new ones are included)."""
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"tile", "encode", "train-mil", "evaluate slides"} <= names
    for p, c in COMMANDS:
        assert _params(c.func) is not None, p


@pytest.mark.parametrize("argv,must", [
    (["encode", "x.svs", "--out", "o", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["encode", "x.svs", "--out", "o", "--mpp", "nan"], "--mpp"),
    (["encode", "x.svs", "--out", "o", "--mpp", "1e400"], "--mpp inf is not a finite number"),
    (["tile", "x.svs", "--out", "o", "--min-tissue", "1.5"], "--min-tissue 1.5 must be between 0 and 1"),
    (["tile", "x.svs", "--out", "o", "--background", "purple"], "auto, bright, dark"),
    (["train-mil", "--features", "f", "--labels", "l.csv", "--out", "o", "--folds", "-2"], "--folds -2 must be at least 1"),
    (["encode", "x.svs", "--out", "o", "--tile-size", "abc"], "--tile-size"),
    (["encode", "x.svs", "--out", "o", "--seed", "1"], "unrecognized arguments"),
])
def test_known_bad_values_one_line(argv, must, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and must in err and "fix:" in err, err
    assert not (tmp_path / "o").exists()  # refused before anything ran

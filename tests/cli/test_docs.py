"""The docs tell the truth: README.md's command lines and every command's ``--help`` example name real options and
parse as written, and the command line reads flags, repeated options and summaries the way the docs show them."""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from gigaslide.cli.main import Command, _collect, parse

README = Path(__file__).resolve().parents[2] / "README.md"
#: Options every command takes besides its function's parameters.
COMMON = {"config", "print-config", "print_config", "help"}


def _walk(cmds: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Command]]:
    for name, c in cmds.items():
        if isinstance(c, dict):
            yield from _walk(c, (*prefix, name))
        else:
            yield (*prefix, name), c


COMMANDS = dict(_walk(_collect()))


def _options(cmd: Command) -> set[str]:
    return {k.replace("_", "-") for k in inspect.signature(cmd.func).parameters if k != cmd.positional} | COMMON


def _command_at(text: str) -> tuple[tuple[str, ...], str] | None:
    """The command words a README line names (``gigaslide evaluate tiles ...``, ``-m gigaslide encode ...``) and the
    text from there on, without a trailing ``# comment``; None for a line naming no command."""
    m = re.search(r"(?:^|\s)gigaslide\s+([a-z-]+)(?:\s+([a-z-]+))?", text)
    if not m:
        return None
    words = (m.group(1), m.group(2)) if (m.group(1), m.group(2)) in COMMANDS else (m.group(1),)
    return words, re.split(r"\s#\s", text[m.start():])[0]


def _readme_lines() -> list[tuple[tuple[str, ...], str, bool]]:
    """(command words, text, is_comment) for each README ```bash line naming a gigaslide command (continuations
    joined), and for each indented comment line right after one (``#   --baseline ...``: an option of that command;
    options quoted in backticks there belong to other commands and are left out)."""
    out: list[tuple[tuple[str, ...], str, bool]] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        last: tuple[str, ...] | None = None
        for line in block.replace("\\\n", " ").splitlines():
            s = line.strip()
            if s.startswith("#"):
                indented = line.startswith(" ") or s.startswith("#  ")
                if last is not None and indented:
                    out.append((last, re.sub(r"`[^`]*`", "", s), True))
                continue
            found = _command_at(s)
            if found is None:
                last = None
                continue
            last, text = found
            out.append((last, text, False))
    return out


def _examples() -> list[tuple[tuple[str, ...], str]]:
    """Every ``gigaslide ...`` example line of every command's docstring (its ``--help``)."""
    out = []
    for words, cmd in COMMANDS.items():
        doc = inspect.getdoc(cmd.func) or ""
        for line in doc.split("\n\nArgs:")[0].splitlines():
            s = line.strip().removeprefix("Example:").strip()
            if s.startswith("gigaslide "):
                out.append((words, re.split(r"\s#\s", s)[0]))
    return out


def test_the_readme_names_its_commands_and_the_parser_finds_them() -> None:
    lines = _readme_lines()
    named = {w for w, _, _ in lines}
    assert {("pretrain",), ("train-streaming",), ("nuclei",), ("evaluate", "tiles"), ("export", "qupath")} <= named
    assert all(w in COMMANDS for w in named), sorted(named - set(COMMANDS))
    assert any(c and "--koleo-weight" in t for w, t, c in lines if w == ("pretrain",))  # comment lines are read too


@pytest.mark.parametrize(("words", "text", "comment"), _readme_lines(), ids=lambda v: str(v)[:40])
def test_every_readme_option_is_an_option_of_its_command(words: tuple[str, ...], text: str, comment: bool) -> None:
    opts = _options(COMMANDS[words])
    unknown = [f for f in re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", text) if f not in opts]
    assert not unknown, f"README: `gigaslide {' '.join(words)}` has no {unknown} (line: {text})"


def test_every_option_the_readme_prose_quotes_exists() -> None:
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    every = set().union(*(_options(c) for c in COMMANDS.values()))
    quoted = {f for span in re.findall(r"`(--[^`]*)`", prose) for f in re.findall(r"--([a-z][a-z0-9_-]*)", span)}
    assert quoted and not quoted - every, sorted(quoted - every)


def _plain(text: str) -> bool:
    """A README line with no placeholders of alternatives (``[--x]``, ``{a,b}``, ``a|b``, ``...``): literal."""
    return not any(c in text for c in "[]{}|") and "..." not in text


@pytest.mark.parametrize(("words", "text"), [(w, t) for w, t, c in _readme_lines() if not c and _plain(t)],
                         ids=lambda v: str(v)[:50])
def test_readme_command_lines_parse_as_written(words: tuple[str, ...], text: str) -> None:
    cmd, _ = parse(shlex.split(text)[1:])
    assert cmd is COMMANDS[words]


@pytest.mark.parametrize(("words", "text"), _examples(), ids=lambda v: str(v)[:50])
def test_every_help_example_parses_as_written(words: tuple[str, ...], text: str) -> None:
    """``words``: the command whose ``--help`` shows ``text`` (which may name the next command to run)."""
    named = _command_at(text)
    assert named is not None and named[0] in COMMANDS, f"`gigaslide {' '.join(words)} --help`: {text}"
    unknown = [f for f in re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", text) if f not in _options(COMMANDS[named[0]])]
    assert not unknown, f"`gigaslide {' '.join(words)} --help`: {text} has unknown {unknown}"
    if "..." not in text:  # "gigaslide evaluate finetune ... --weights random": options of the line above
        cmd, _ = parse(shlex.split(text)[1:])
        assert cmd is COMMANDS[named[0]]


def test_the_readme_dinov2_recipe_flags_are_the_defaults() -> None:
    from gigaslide.cli.ssl import recipe_flags
    from gigaslide.ssl.tile.dinov2 import DINOv2

    text = README.read_text()
    line = " ".join(re.findall(r"# recipe flags \(defaults = the paper's\):(.*)\n\s*#(.*)\n\s*#(.*)\n", text)[0])
    flags = dict(re.findall(r"--([a-z-]+) (\S+)", line))
    assert len(flags) == 11, flags
    method = recipe_flags(teacher_temp=flags.pop("teacher-temp"), mask_ratio=flags.pop("mask-ratio"),
                          ibot_weight=float(flags.pop("ibot-weight")), koleo_weight=float(flags.pop("koleo-weight")),
                          momentum=float(flags.pop("momentum")))
    assert method == {k: DINOv2.hparams[k] for k in method}
    for flag, value in flags.items():
        want = DINOv2.recipe[flag.replace("-", "_")]
        got = tuple(float(v) for v in value.split(",")) if "," in value else float(value)
        assert got == want, flag

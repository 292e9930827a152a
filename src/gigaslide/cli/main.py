"""The ``gigaslide`` command: one jsonargparse parser, sub-commands collected from each stage.

Each stage's CLI module exposes ``COMMANDS: dict[str, Command | dict[str, Command]]`` (a nested
dict makes a command group, e.g. ``evaluate tiles``). A function's typed signature is the schema;
``--config FILE.yaml`` and ``--print_config`` make every run reproducible. Options may be spelled
with dashes or underscores (``--tile-size`` == ``--tile_size``).
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gigaslide.errors import GigaslideError

#: Stage CLI modules, in data-flow order. Each must define COMMANDS.
STAGE_MODULES = (
    "gigaslide.cli.spine",
    "gigaslide.cli.ssl",
    "gigaslide.cli.slide_ssl",
    "gigaslide.cli.mil",
    "gigaslide.cli.evaluate",
    "gigaslide.cli.streaming",
    "gigaslide.cli.nuclei",
    "gigaslide.cli.viewer",
    "gigaslide.cli.demo",
)


@dataclass(frozen=True)
class Command:
    func: Callable[..., Any]
    positional: str | None = None  # name of a parameter taken from positional values
    nargs: str | None = "+"  # "+" for one or more (a list parameter), None for exactly one


def _formatter():  # noqa: ANN202
    import argparse
    import re

    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the docstring's line breaks (examples) and shows options with dashes."""

        def format_help(self) -> str:
            return re.sub(r"--[a-z0-9_]+", lambda m: m.group(0).replace("_", "-"), super().format_help())

    return Formatter


def _collect() -> dict[str, Any]:
    commands: dict[str, Any] = {}
    for mod_name in STAGE_MODULES:
        mod = importlib.import_module(mod_name)
        for name, cmd in getattr(mod, "COMMANDS", {}).items():
            if name in commands:  # one definition per command (and per group): never overwrite silently
                raise RuntimeError(f"command '{name}' is defined twice ({mod_name} and an earlier stage module)")
            commands[name] = cmd
    return commands


def _summary(func: Callable[..., Any]) -> str:
    """The docstring's first paragraph on one line (a summary wrapped over two lines is kept whole)."""
    doc = inspect.getdoc(func) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _sub_parser(cmd: Command):  # noqa: ANN202
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = inspect.getdoc(cmd.func) or ""
    desc = doc.split("\n\nArgs:")[0]
    p = ArgumentParser(description=desc, formatter_class=_formatter(), exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    skip = set()
    if cmd.positional:
        p.add_argument(cmd.positional, nargs=cmd.nargs, help=_param_help(cmd.func, cmd.positional))
        skip.add(cmd.positional)
    p.add_function_arguments(cmd.func, skip=skip, as_group=False)
    return p


def _param_help(func: Callable[..., Any], name: str) -> str:
    doc = inspect.getdoc(func) or ""
    for line in doc.split("Args:", 1)[-1].splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return name


def _build(commands: dict[str, Any]):  # noqa: ANN202
    from jsonargparse import ArgumentParser

    root = ArgumentParser(prog="gigaslide", formatter_class=_formatter(), exit_on_error=False, description="gigapixel slides -> tiles -> features -> slide predictions. "
                          "Run `gigaslide COMMAND --help` for each command's options and an example.")
    root.add_argument("--version", action="version", version=_version())
    _add(root, commands)
    return root


def _add(parser, commands: dict[str, Any]) -> None:  # noqa: ANN001
    from jsonargparse import ArgumentParser

    sub = parser.add_subcommands(dest="command", required=True)
    for name, cmd in commands.items():
        if isinstance(cmd, dict):
            group = ArgumentParser(description=f"{name}: " + ", ".join(cmd), formatter_class=_formatter(), exit_on_error=False)
            sub.add_subcommand(name, group, help=f"{name} " + "|".join(cmd))
            _add(group, cmd)  # jsonargparse wants levels added top-down
        else:
            sub.add_subcommand(name, _sub_parser(cmd), help=_summary(cmd.func))


def _version() -> str:
    from gigaslide import __version__

    return __version__


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """``--tile-size 3`` / ``--tile-size=3`` -> ``--tile_size ...`` (options only, never values)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            key, eq, val = a[2:].partition("=")
            a = "--" + key.replace("-", "_") + eq + val
        out.append(a)
    return out


def _resolve(commands: dict[str, Any], cfg: Any) -> tuple[Command, Any]:
    node: Any = commands
    sub_cfg = cfg
    while isinstance(node, dict):
        name = sub_cfg["command"]
        node = node[name]
        sub_cfg = sub_cfg[name]
    return node, sub_cfg


def _command_name(commands: dict[str, Any], argv: Sequence[str]) -> str:
    """The (sub)command named in ``argv``, for error messages ("" when none)."""
    node: Any = commands
    words: list[str] = []
    for a in argv:
        if not isinstance(node, dict):
            break
        if a in node:
            words.append(a)
            node = node[a]
        elif not a.startswith("-"):
            break
    return " ".join(words)


def _only(commands: dict[str, Any], name: str) -> dict[str, Any]:
    """Just the branch of ``commands`` leading to the command ``name`` (building every command's parser
    costs ~0.5 s per call); all of them when ``name`` is not a complete command (root help, typos)."""
    words = name.split()
    node = _command_at(commands, name)
    if not words or isinstance(node, dict):
        return commands
    for w in reversed(words):
        node = {w: node}
    return node


def _command_at(commands: dict[str, Any], name: str) -> Any:
    """The :class:`Command` (or command group) the words of ``name`` lead to (``name`` from :func:`_command_name`)."""
    node: Any = commands
    for w in name.split():
        node = node[w]
    return node


def _check_configs(args: Sequence[str]) -> list[str]:
    """``--config`` files pass the safe YAML check (no object tags, no alias bombs) before jsonargparse loads them;
    their option keys may be spelled with dashes, as ``--help`` shows them (``tile-size: 256``), like the command
    line: such a config is handed on as YAML text with the keys spelled with underscores."""
    out = list(args)
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            out[i + 1] = _undashed_config(args[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + _undashed_config(a.split("=", 1)[1])
    return out


def _undashed_config(value: str) -> str:
    """``value`` (checked by :func:`~gigaslide.safe_parse.check_config_arg`) unchanged unless it is a YAML mapping
    with a top-level key spelled with dashes, or a pipe (``--config <(...)``: read once here and checked, so
    handed on as YAML text); then the mapping as YAML text, keys with dashes spelled with underscores (one key given
    both ways is refused)."""
    import yaml

    from gigaslide.safe_parse import check_config_arg, is_pipe

    piped = is_pipe(value)
    loaded = check_config_arg(value)
    if loaded is None:
        return value  # a missing path: jsonargparse's own error names it
    data, path = loaded
    if not isinstance(data, dict) or not any(isinstance(k, str) and "-" in k for k in data):
        return (yaml.safe_dump(data, sort_keys=False) if data is not None else "{}") if piped else value
    fixed: dict[Any, Any] = {}
    for k, v in data.items():
        key = k.replace("-", "_") if isinstance(k, str) else k
        if key in fixed:
            raise GigaslideError(f"the config gives option '{key}' twice (with dashes and with underscores)",
                                 path=path, fix="keep one of the two keys")
        fixed[key] = v
    return yaml.safe_dump(fixed, sort_keys=False)


#: Values jsonargparse reads as a bool (or, for ``bool | None``, as null): ``--flag VALUE`` keeps VALUE.
_BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n", "1", "0", "null", "none", "~"})


def _option_kinds(cmd: Command) -> tuple[set[str], set[str], set[str]]:
    """``cmd``'s options by how a repeated or bare use is read: list parameters, comma-separated strings (their
    help says "comma-separated"), and bools."""
    lists, commas, bools = set(), set(), set()
    for k, prm in inspect.signature(cmd.func).parameters.items():
        if k == cmd.positional:
            continue
        a = prm.annotation  # a string under ``from __future__ import annotations``, else the type itself
        ann = a.__name__ if isinstance(a, type) and not hasattr(a, "__origin__") else str(a)
        if "list[" in ann:
            lists.add(k)
        elif ann.split(" | ")[0] == "str" and "comma-separated" in _param_help(cmd.func, k):
            commas.add(k)
        elif ann in ("bool", "bool | None"):
            bools.add(k)
    return lists, commas, bools


def _append_repeated_lists(commands: dict[str, Any], name: str, args: list[str]) -> list[str]:
    """A list option given more than once (``--runs A --runs B``) keeps every value, as users expect, instead of
    the last one only (jsonargparse's rule): its later occurrences become jsonargparse's append (``--runs+ B``).
    A comma-separated option given more than once (``--encoders a --encoders b``) is read as ``--encoders a,b``.
    A bool option given without a value (``--tissue-only``, as a flag) is read as ``--tissue-only true``, and
    ``--no-tissue-only`` as ``--tissue-only false``."""
    node = _command_at(commands, name)
    if not isinstance(node, Command):
        return args
    lists, commas, bools = _option_kinds(node)
    seen: set[str] = set()
    first: dict[str, int] = {}  # comma option -> index in ``out`` of its first value
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, val = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        nxt = args[i + 1] if i + 1 < len(args) else None
        if key.startswith("no_") and key[3:] in bools and not eq:  # --no-tissue-only, as other tools spell false
            out += [f"--{key[3:]}", "false"]
            i += 1
            continue
        if key in bools and not eq and (nxt is None or nxt.startswith("-") or nxt.lower() not in _BOOL_WORDS):
            out += [a, "true"]
            i += 1
            continue
        if key in commas and (eq or nxt is not None):
            value, step = (val, 1) if eq else (nxt, 2)
            if key in first:
                out[first[key]] += "," + str(value)
            else:
                first[key] = len(out)
                out.append(f"--{key}={value}")  # one token: a value starting with "-" stays a value
            i += step
            continue
        if key in lists:
            if key in seen:
                a = f"--{key}+{eq}{val}"
            seen.add(key)
        out.append(a)
        i += 1
    return out


def _positionals(commands: dict[str, Any]) -> set[str]:
    """The parameter names every command takes from positional values (``slides``, ``slide`` ...)."""
    out: set[str] = set()
    for cmd in commands.values():
        out |= _positionals(cmd) if isinstance(cmd, dict) else {cmd.positional} - {None}
    return out


def parse(argv: Sequence[str] | None = None) -> tuple[Command, dict[str, Any]]:
    """The command and its checked keyword arguments. Every failure here is one :class:`GigaslideError`
    line (wrong type, unknown option, a value no command can use: see :mod:`gigaslide.cli.validate`),
    never a traceback; ``--help`` and ``--version`` still exit 0 through ``SystemExit``."""
    from jsonargparse import ArgumentError

    from gigaslide.cli.validate import check_options, parse_error_line

    args = _check_configs(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    commands = _collect()
    name = _command_name(commands, args)
    args = _append_repeated_lists(commands, name, args)
    try:
        cfg = _build(_only(commands, name)).parse_args(args)
        cmd, sub_cfg = _resolve(commands, cfg)
        params = inspect.signature(cmd.func).parameters
        kwargs = {k: sub_cfg[k] for k in params if k in sub_cfg}
        check_options(cmd.func, kwargs)
    except (GigaslideError, SystemExit, KeyboardInterrupt):
        raise
    except ArgumentError as e:
        raise parse_error_line(str(e), name, _positionals(commands)) from None
    except Exception as e:  # noqa: BLE001 - a parser/validation failure must stay one line
        raise parse_error_line(f"cannot read the command line ({type(e).__name__}: {e})", name) from None
    return cmd, kwargs


def run(argv: Sequence[str] | None = None) -> Any:
    cmd, kwargs = parse(argv)
    return cmd.func(**kwargs)


#: errno values of storage faults: a one-line error naming the file instead of a traceback.
_STORAGE_ERRNOS = {"ENOSPC": "free disk space (or choose another --out) and re-run: finished outputs are kept",
                   "EDQUOT": "free space within your quota (or choose another --out) and re-run",
                   "EROFS": "the file system is read-only: choose a writable --out",
                   "EACCES": "check permissions, or choose an output folder you can write to",
                   "EPERM": "check permissions, or choose an output folder you can write to",
                   "ENOENT": "a file disappeared while the command ran (moved, deleted, share unmounted); restore it and re-run",
                   "EIO": "the disk or network share reported an I/O error; check it and re-run"}


def _storage_error(e: OSError) -> str | None:
    import errno

    name = errno.errorcode.get(e.errno or -1, "")
    if name not in _STORAGE_ERRNOS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or name} -- fix: {_STORAGE_ERRNOS[name]}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    text = " ".join(str(message).split()) or category.__name__
    print(f"warning: {text}", file=sys.stderr)


def _set_threads(value: str | None) -> None:
    """``GIGASLIDE_THREADS``: torch's intra-op threads (a positive integer), else a one-line error."""
    if not value:
        return
    if not value.strip().isdigit() or int(value) < 1:
        raise GigaslideError(f"GIGASLIDE_THREADS={value!r} is not a positive integer",
                             fix="set it to the number of cores to use, e.g. GIGASLIDE_THREADS=2, or unset it")
    import torch

    torch.set_num_threads(int(value))


def _check_omp_threads() -> None:
    """An ``OMP_NUM_THREADS`` that OpenMP cannot use (``0``, ``abc``, empty) is dropped with one warning before torch
    loads OpenMP, which printed its own ``libgomp: Invalid value ...`` line on every command and then ignored it."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None or re.fullmatch(r"\s*[1-9]\d*\s*(,\s*\d+\s*)*", value):  # "4", or per nesting level "4,2"
        return
    del os.environ["OMP_NUM_THREADS"]
    print(f"warning: OMP_NUM_THREADS={value!r} is not a positive whole number: ignored (torch chooses its threads; "
          "set GIGASLIDE_THREADS=N or OMP_NUM_THREADS=N to choose)", file=sys.stderr)


INTERRUPTED = "interrupted; finished outputs are kept and a re-run resumes"


def _interrupted(e: BaseException) -> bool:
    """``e`` was raised while a Ctrl-C was being handled: e.g. a module half-imported when the KeyboardInterrupt
    arrived fails again on its next import (numpy's RecursionError), or a library's callback turned it into its own
    error. The interrupt is in ``e``'s chain of causes and contexts."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _print_errors(err: UnicodeError) -> tuple[str | bytes, int]:
    """Encoding errors of the console streams: a file name's undecodable bytes (lone surrogates) written back as the
    bytes they were, any other character the stream cannot encode as a backslash escape (``\\xb5``)."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    part = err.object[err.start:err.end]
    if all("\udc80" <= c <= "\udcff" for c in part):
        return bytes(ord(c) - 0xDC00 for c in part), err.end
    return codecs.backslashreplace_errors(err)


def _printable_streams() -> None:
    """stdout and stderr that cannot fail on a character: under an ASCII locale (``LC_ALL=C`` where Python does not
    coerce it to UTF-8, e.g. ``PYTHONCOERCECLOCALE=0``) ``info`` ended in a UnicodeEncodeError traceback at
    ``µm/px``. Characters the stream cannot encode are written as escapes, a file name's bytes as they are."""
    codecs.register_error("gigaslide-print", _print_errors)
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "surrogateescape") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="gigaslide-print")
            except (ValueError, OSError):  # a stream in use that cannot change now: left as it is
                pass


def main(argv: Sequence[str] | None = None) -> int:
    _printable_streams()
    _check_omp_threads()
    try:
        _set_threads(os.environ.get("GIGASLIDE_THREADS"))
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line per warning (e.g. a non-H&E slide), no source line
            warnings.filterwarnings("always", message=".*looks like")  # once per slide, also on a second run
            run(argv)
    except GigaslideError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`gigaslide encoders | head`): stop quietly, as Unix tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except OSError as e:
        msg = _storage_error(e)
        if msg is None:
            if _interrupted(e):
                print(INTERRUPTED, file=sys.stderr)
                return 130
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:
        if not _interrupted(e):
            raise
        print(INTERRUPTED, file=sys.stderr)  # Ctrl-C inside an import or a callback surfaced as another error
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

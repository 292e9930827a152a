"""The ``gigaslide`` command: one jsonargparse parser, sub-commands collected from each stage.

Each stage's CLI module exposes ``COMMANDS: dict[str, Command | dict[str, Command]]`` (a nested
dict makes a command group, e.g. ``evaluate tiles``). A function's typed signature is the schema;
``--config FILE.yaml`` and ``--print_config`` make every run reproducible. Options may be spelled
with dashes or underscores (``--tile-size`` == ``--tile_size``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
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
    "gigaslide.cli.streaming",
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
            if name in commands and isinstance(commands[name], dict) and isinstance(cmd, dict):
                commands[name] = {**commands[name], **cmd}
            else:
                commands[name] = cmd
    return commands


def _summary(func: Callable[..., Any]) -> str:
    doc = inspect.getdoc(func) or ""
    return doc.split("\n", 1)[0]


def _sub_parser(cmd: Command):  # noqa: ANN202
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = inspect.getdoc(cmd.func) or ""
    desc = doc.split("\n\nArgs:")[0]
    p = ArgumentParser(description=desc, formatter_class=_formatter())
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

    root = ArgumentParser(prog="gigaslide", formatter_class=_formatter(), description="gigapixel slides -> tiles -> features -> slide predictions. "
                          "Run `gigaslide COMMAND --help` for each command's options and an example.")
    root.add_argument("--version", action="version", version=_version())
    _add(root, commands)
    return root


def _add(parser, commands: dict[str, Any]) -> None:  # noqa: ANN001
    from jsonargparse import ArgumentParser

    sub = parser.add_subcommands(dest="command", required=True)
    for name, cmd in commands.items():
        if isinstance(cmd, dict):
            group = ArgumentParser(description=f"{name}: " + ", ".join(cmd), formatter_class=_formatter())
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


def run(argv: Sequence[str] | None = None) -> Any:
    commands = _collect()
    parser = _build(commands)
    cfg = parser.parse_args(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    cmd, sub_cfg = _resolve(commands, cfg)
    params = inspect.signature(cmd.func).parameters
    kwargs = {k: sub_cfg[k] for k in params if k in sub_cfg}
    return cmd.func(**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    torch_threads = os.environ.get("GIGASLIDE_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    try:
        run(argv)
    except GigaslideError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Parsing files from outside (annotations, configs, label tables) without trusting them.

- XML (Aperio / ImageScope annotations, ...): :func:`parse_xml` goes through ``defusedxml``, which
  refuses DTDs with entities (billion laughs, quadratic blow-up) and external entities / references
  (XXE: reading local files or URLs); a damaged file is one error line naming it.
- YAML: :func:`load_yaml` uses ``yaml.safe_load`` (no Python object construction: ``!!python/...``
  tags are refused) and refuses alias bombs (anchors expanding to more than :data:`MAX_YAML_NODES`
  nodes). jsonargparse's ``--config`` loader is itself a ``SafeLoader`` subclass, but it would expand
  an alias bomb: ``gigaslide.cli.main`` checks ``--config`` values with :func:`check_config_arg` first.
- Identifiers read from metadata (``labels.csv``, HDF5 attrs) end up in file names: :func:`check_slide_id`
  refuses any that could name another folder (``../../etc/x``, ``/abs``, ``a\\b``, NUL, control chars).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from gigaslide.atomic import TMP_PREFIX
from gigaslide.errors import GigaslideError

#: A YAML document may expand (through aliases) to at most this many nodes.
MAX_YAML_NODES = 100_000
#: the largest YAML file (or pipe) read as a ``--config``: options, not data
MAX_CONFIG_BYTES = 16 << 20
#: Longest slide id in bytes, as a file name (file names are limited to 255 bytes; room is left for suffixes).
MAX_ID_LENGTH = 200
_BAD_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


def parse_xml(path: str | os.PathLike) -> Any:
    """``xml.etree.ElementTree.ElementTree`` of ``path``, parsed with defusedxml (no entities, no XXE)."""
    from defusedxml import DefusedXmlException
    from defusedxml import ElementTree as SafeET
    from xml.etree.ElementTree import ParseError

    p = Path(path)
    if not p.is_file():
        raise GigaslideError("XML file not found", path=p, fix="check the path")
    try:
        return SafeET.parse(p)
    except DefusedXmlException as e:
        raise GigaslideError(f"XML refused: it declares entities or external references ({type(e).__name__})", path=p,
                             fix="export the annotations again without a DTD / entities (QuPath, ImageScope)") from None
    except ParseError as e:
        raise GigaslideError(f"not well-formed XML ({e})", path=p, fix="the file is damaged or truncated; export it again") from None
    except (OSError, ValueError) as e:
        raise GigaslideError(f"cannot read XML ({e})", path=p, fix="check the file") from None


def _expanded_size(node: Any, limit: int) -> int:
    """Number of nodes ``node`` stands for once aliases are expanded (stops counting past ``limit``)."""
    import yaml

    memo: dict[int, int] = {}

    def size(n: Any) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        memo[key] = 1  # a recursive alias counts once (safe_load builds it as a cycle)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for c in n.value:
                total += size(c)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        memo[key] = total
        return total

    return size(node)


def load_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of ``path``, refusing object tags and alias bombs with a one-line error."""
    import yaml

    p = Path(path)
    try:
        with open(p, "rb") as f:  # a file, or a pipe (``--config <(...)``) read once, at most MAX_CONFIG_BYTES
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise GigaslideError(f"YAML refused: larger than {MAX_CONFIG_BYTES >> 20} MiB", path=p,
                                 fix="a config holds options; put data (lists of slides, labels) in files it names")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise GigaslideError("YAML file not found", path=p, fix="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GigaslideError(f"cannot read YAML ({e})", path=p, fix="pass a UTF-8 text YAML file") from None
    return load_yaml_text(text, where=p)


def load_yaml_text(text: str, *, where: str | os.PathLike | None = None) -> Any:
    """:func:`load_yaml` of a string (``where`` names it in errors)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise GigaslideError(f"YAML refused: its aliases expand to more than {MAX_YAML_NODES} nodes", path=where,
                                 fix="write the values out instead of nesting anchors / aliases")
        return yaml.safe_load(text)
    except RecursionError:  # PyYAML composes nested collections recursively: "[[[[..." thousands deep
        raise GigaslideError("YAML refused: its collections are nested too deeply", path=where,
                             fix="write the values out with less nesting; check the syntax") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:200]
        raise GigaslideError(f"YAML refused or invalid ({first})", path=where,
                             fix="use plain YAML values (no !!python tags); check the syntax") from None


def check_config_arg(value: str) -> tuple[Any, Path | None] | None:
    """A ``--config`` value (a YAML file, or YAML text) must pass :func:`load_yaml` before any loader sees it.
    Returns what it holds and the file it came from (None for YAML text), or None for a value that is neither (a
    missing path: jsonargparse's own error names it)."""
    p = Path(value)
    try:
        is_file = p.is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file or is_pipe(value):  # a pipe (``--config <(...)``) can be read only once: the caller hands on its text
        return load_yaml(p), p
    if any(c in value for c in ":\n{["):  # inline YAML (jsonargparse accepts it)
        return load_yaml_text(value, where="--config"), None
    return None


def is_number(v: object) -> bool:
    """Whether ``v`` reads as a float at all (``nan``, ``-1`` and ``inf`` included): a number, not a path or a name."""
    try:
        float(str(v))
    except (TypeError, ValueError):
        return False
    return True


def positive_number(v: object) -> float | None:
    """``v`` (text from a file's metadata, or a number) as a finite number above 0, else None (``nan``, ``inf``,
    ``0``, ``-0.25``, text): a resolution or size a file states, where an unusable one means "not stated"."""
    try:
        f = float(str(v))
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def is_pipe(value: str) -> bool:
    """Whether ``value`` names a pipe (``--config <(...)`` passes ``/dev/fd/63``; a FIFO): it can be read only once."""
    import stat

    try:
        return stat.S_ISFIFO(os.stat(value).st_mode)
    except (OSError, ValueError):
        return False


def check_slide_id(slide_id: str, *, path: str | os.PathLike | None = None, what: str = "slide_id") -> str:
    """``slide_id`` unchanged when it is safe as a file name (no folder parts); else a one-line error."""
    sid = str(slide_id)
    try:  # the length that counts is the file name's, in bytes: "é" is two
        n_bytes = len(os.fsencode(sid))
    except UnicodeError:
        if not any("\ud800" <= c <= "\udfff" for c in sid):  # a fine name this locale cannot spell (ASCII)
            raise GigaslideError(f"{what} {sid[:60]!r} cannot be a file name under this locale (file names are "
                                 f"{sys.getfilesystemencoding()})", path=path,
                                 fix="run with a UTF-8 locale (LANG=C.UTF-8, or PYTHONUTF8=1)") from None
        n_bytes = MAX_ID_LENGTH + 1  # a lone surrogate: no file name
    if (not sid or sid in (".", "..") or _BAD_ID.search(sid) or n_bytes > MAX_ID_LENGTH
            or sid != sid.strip() or os.path.isabs(sid) or sid.startswith(TMP_PREFIX)):
        raise GigaslideError(f"unsafe {what} {sid[:60]!r}: ids become file names and may not contain path separators, "
                             f"'..', control characters or edge spaces, start with {TMP_PREFIX!r} (the prefix of "
                             f"temporary files, skipped and cleaned up), or be longer than {MAX_ID_LENGTH} bytes",
                             path=path,
                             fix="rename it to letters, digits, '-', '_' and '.' (as in the slide's file name)")
    return sid


def is_safe_slide_id(slide_id: str) -> bool:
    try:
        check_slide_id(slide_id)
    except GigaslideError:
        return False
    return True


__all__ = ["MAX_CONFIG_BYTES", "MAX_YAML_NODES", "check_config_arg", "check_slide_id", "is_number",
           "is_pipe", "is_safe_slide_id", "load_yaml", "load_yaml_text", "parse_xml", "positive_number"]

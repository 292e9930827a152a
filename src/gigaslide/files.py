"""Walking folders the same way everywhere: slide and tile discovery, and run inputs' fingerprints."""

from __future__ import annotations

import os
from pathlib import Path


def shown_name(s: str) -> str:
    """``s`` as valid UTF-8 text: the undecodable bytes of a file name (which Python holds as lone surrogates, e.g. a
    Latin-1 name from an old share) written ``\\xNN`` (``caf\\xe9.svs``). JSON readers other than Python's, HDF5
    strings and URLs cannot hold a lone surrogate; manifests, error lines, the viewer and the exports show such a name
    this way."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        try:
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is no undecodable byte (from JSON's \\ud800)
            return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _path_order(path: str) -> list[str]:
    """The order ``sorted`` gives :class:`~pathlib.Path` objects on POSIX (part by part), for plain strings."""
    return path.split(os.sep)


def walk_file_paths(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """:func:`walk_files` as plain strings (``str(root)`` joined with each file's path under it), in the same order:
    no :class:`~pathlib.Path` per file (about half the time of fingerprinting a million-tile folder went to them)."""
    root_s = str(Path(root))
    if not recursive:
        with os.scandir(root_s) as it:
            return sorted((e.path for e in it if _is_file(e)), key=_path_order)
    out: list[str] = []

    def walk(d: str, above: frozenset[str]) -> None:
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:  # an unreadable sub-folder, as rglob: skipped
            return
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                continue
            if is_dir:
                real = os.path.realpath(e.path)
                if real not in above:
                    walk(e.path, above | {real})
            elif _is_file(e):
                out.append(e.path)

    walk(root_s, frozenset({os.path.realpath(root_s)}))
    return sorted(out, key=_path_order)


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


def walk_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The files under folder ``root`` (only its own with ``recursive=False``), sorted, each by its path under
    ``root``. Symlinked sub-folders are followed (a cohort or a class folder linked in from other storage;
    ``Path.rglob`` skips them), except a link back to a folder it lies in (a cycle)."""
    return [Path(f) for f in walk_file_paths(root, recursive)]


__all__ = ["shown_name", "walk_file_paths", "walk_files"]

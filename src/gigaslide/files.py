"""Walking folders the same way everywhere: slide and tile discovery, and run inputs' fingerprints."""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The files under folder ``root`` (only its own with ``recursive=False``), sorted, each by its path under
    ``root``. Symlinked sub-folders are followed (a cohort or a class folder linked in from other storage;
    ``Path.rglob`` skips them), except a link back to a folder it lies in (a cycle)."""
    root = Path(root)
    if not recursive:
        return sorted(f for f in root.iterdir() if f.is_file())
    out: list[Path] = []

    def walk(d: Path, above: frozenset[str]) -> None:
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
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
                    walk(Path(e.path), above | {real})
            elif e.is_file():
                out.append(Path(e.path))

    walk(root, frozenset({os.path.realpath(root)}))
    return sorted(out)


__all__ = ["walk_files"]

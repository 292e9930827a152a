"""Turn command-line inputs (files, folders) into a list of slide files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gigaslide.errors import GigaslideError
from gigaslide.slides.ids import SLIDE_EXTENSIONS

#: Whole-slide formats searched for in folders (plain images are accepted only when named directly).
WSI_EXTENSIONS = tuple(e for e in SLIDE_EXTENSIONS if e not in (".png", ".jpg", ".jpeg"))


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


def _is_slide(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(WSI_EXTENSIONS) and not p.name.startswith(".")


def find_slides(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Files are taken as they are; folders are searched for slide files (symlinked sub-folders included).

    A DICOM WSI is a folder of ``.dcm`` files; only its first file (sorted) is listed, since
    OpenSlide opens the whole series from any of them.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise GigaslideError("input not found", path=p, fix="check the path")
        if p.is_file():
            out.append(p)
            continue
        found = [f for f in walk_files(p, recursive) if _is_slide(f)]
        dicom_dirs: set[Path] = set()
        n_before = len(out)
        for f in found:
            if f.suffix.lower() == ".dcm":
                if f.parent in dicom_dirs:
                    continue
                dicom_dirs.add(f.parent)
            out.append(f)
        if len(out) == n_before:
            raise GigaslideError("no slide files in this folder", path=p,
                                 fix=f"put slides ({', '.join(WSI_EXTENSIONS[:6])}, ...) there or pass files directly")
    seen: set[Path] = set()
    unique = []
    for f in out:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique

"""Turn command-line inputs (files, folders) into a list of slide files."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gigaslide.errors import GigaslideError
from gigaslide.files import walk_files
from gigaslide.slides.ids import SLIDE_EXTENSIONS

#: Whole-slide formats searched for in folders (plain images are accepted only when named directly).
WSI_EXTENSIONS = tuple(e for e in SLIDE_EXTENSIONS if e not in (".png", ".jpg", ".jpeg"))


def _is_slide(p: Path) -> bool:
    return p.name.lower().endswith(WSI_EXTENSIONS) and not p.name.startswith(".") and p.is_file()


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
        if not p.is_dir():  # was searched as a folder: "no slide files in this folder"
            raise GigaslideError("input is not a regular file or a folder (a named pipe, socket or device)", path=p,
                                 fix="pass slide files or folders of them")
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
    folders: dict[Path, Path] = {}  # each folder resolved once: resolving every file lstat-ed each part of its path
    for f in out:
        if os.path.islink(f):
            r = f.resolve()
        else:
            if f.parent not in folders:
                folders[f.parent] = f.parent.resolve()
            r = folders[f.parent] / f.name
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique

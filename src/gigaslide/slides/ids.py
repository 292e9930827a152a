"""Slide ids: a slide's id is its file name without the slide format's extension (``x.ome.tiff`` -> ``x``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from gigaslide.errors import GigaslideError

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", ".ome.tif", ".ome.tiff", ".czi", ".png", ".jpg", ".jpeg",
)


def slide_id_from_path(path: Path) -> str:
    """The id of the slide at ``path``: its name less the longest slide extension it ends with (else its stem)."""
    name = path.name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            sid = name[: -len(ext)]
            return sid if sid not in ("", ".", "..") else name  # "..svs" must not become the id ".."
    return path.stem if path.stem not in ("", ".", "..") else name


def by_slide_id(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str | os.PathLike, str, str | None]]:
    """``(path, slide id, None)`` for each of ``paths`` in order, or ``(path, slide id, error line)`` for a path whose
    id an earlier path already has (one output file per id: the second slide would overwrite the first's)."""
    seen: dict[str, str] = {}
    for p in paths:
        sid = slide_id_from_path(Path(p))
        if sid in seen:
            yield p, sid, GigaslideError(f"slide id '{sid}' also used by {seen[sid]}", path=p,
                                         fix="rename one of the slides; ids come from file names").one_line()
            continue
        seen[sid] = str(p)
        yield p, sid, None


__all__ = ["SLIDE_EXTENSIONS", "by_slide_id", "slide_id_from_path"]

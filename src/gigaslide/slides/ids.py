"""Slide ids: a slide's id is its file name without the slide format's extension (``x.ome.tiff`` -> ``x``)."""

from __future__ import annotations

from pathlib import Path

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


__all__ = ["SLIDE_EXTENSIONS", "slide_id_from_path"]

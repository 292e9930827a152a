"""Slide ids: a slide's id is its file name without the slide format's extension (``x.ome.tiff`` -> ``x``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from gigaslide.errors import GigaslideError
from gigaslide.files import shown_name

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
    ".qptiff", ".ome.tif", ".ome.tiff", ".czi", ".png", ".jpg", ".jpeg",
)


def slide_id_from_path(path: str | os.PathLike) -> str:
    """The id of the slide at ``path``: its name less the longest slide extension it ends with (else its stem)."""
    path = Path(path)  # a str raised AttributeError
    name = path.name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            sid = name[: -len(ext)]
            return sid if sid not in ("", ".", "..") else name  # "..svs" must not become the id ".."
    return path.stem if path.stem not in ("", ".", "..") else name


def not_text_path_error(path: str | os.PathLike) -> str | None:
    """The error line for a path that is not valid UTF-8 text (a Latin-1 name from an old share, which Python holds
    with a lone surrogate per undecodable byte), else None: the slide's id and path are recorded in HDF5 attributes
    and JSON, which store text only (writing one failed with a UnicodeEncodeError deep inside tiling)."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        shown = shown_name(s)  # caf\xe9.svs
        return GigaslideError("the path is not valid UTF-8 (its undecodable bytes shown as \\xNN), so it cannot be "
                              "recorded in the outputs", path=shown,
                              fix="rename the file (or folder) to UTF-8, e.g. `convmv -f latin1 -t utf8 --notest -r "
                                  "FOLDER`, or link it under a UTF-8 name (`ln -s`) and pass the link").one_line()
    return None


def by_slide_id(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str | os.PathLike, str, str | None]]:
    """``(path, slide id, None)`` for each of ``paths`` in order, or ``(path, slide id, error line)`` for a path whose
    id an earlier path already has (one output file per id: the second slide would overwrite the first's), or whose
    path is not UTF-8 text (:func:`not_text_path_error`). Two ids that differ only in letter case (``A.svs`` and
    ``a.svs``) are two slides here, but one output file on a case-insensitive file system (macOS, Windows, SMB or
    exFAT shares), where the second silently replaced the first: a warning names both."""
    seen: dict[str, str] = {}
    folded: dict[str, str] = {}
    for p in paths:
        sid = slide_id_from_path(Path(p))
        bad = not_text_path_error(os.path.abspath(p))
        if bad:  # the id as it is shown (caf\xe9): manifests record it, and JSON readers refuse a lone surrogate
            yield p, shown_name(sid), bad
            continue
        if sid in seen:
            yield p, sid, GigaslideError(f"slide id '{sid}' also used by {seen[sid]}", path=p,
                                         fix="rename one of the slides; ids come from file names").one_line()
            continue
        seen[sid] = str(p)
        other = folded.setdefault(sid.casefold(), sid)
        if other != sid:
            warnings.warn(f"{p}: slide id '{sid}' differs from '{other}' ({seen[other]}) only in letter case: on a "
                          "case-insensitive file system (macOS, Windows, SMB / exFAT shares) their outputs are one "
                          "file -- rename one of the slides", stacklevel=2)
        yield p, sid, None


__all__ = ["SLIDE_EXTENSIONS", "by_slide_id", "not_text_path_error", "slide_id_from_path"]

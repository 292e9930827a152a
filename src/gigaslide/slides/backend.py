"""Open a slide file with OpenSlide, falling back to tiffslide, then to a plain-image reader.

All three expose the same small OpenSlide-like surface (dimensions, level_*, properties,
associated_images, read_region). Every failure becomes one :class:`GigaslideError` line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError


def _open_openslide(path: Path) -> Any:
    import openslide

    return openslide.OpenSlide(str(path))


def _open_tiffslide(path: Path) -> Any:
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _open_image(path: Path) -> Any:
    import openslide

    return openslide.ImageSlide(str(path))


def open_backend(path: str | os.PathLike) -> tuple[Any, str]:
    """Return ``(handle, backend_name)``; raise a one-line error when no reader can open the file."""
    p = Path(path)
    if not p.exists():
        raise GigaslideError("slide file not found", path=p, fix="check the path (and that the share is mounted)")
    if p.is_dir():
        raise GigaslideError("is a directory, not a slide", path=p, fix="pass slide files, or the folder to a batch command")
    errors: list[str] = []
    for name, opener in (("openslide", _open_openslide), ("tiffslide", _open_tiffslide), ("image", _open_image)):
        try:
            handle = opener(p)
            if name != "openslide":  # fallbacks open lazily: prove that pixels decode
                last = handle.level_count - 1
                handle.read_region((0, 0), last, (1, 1))
        except Exception as e:  # noqa: BLE001 - every reader's failure is collected
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        return handle, name
    raise GigaslideError(
        "no reader could open this file as a slide (" + "; ".join(errors)[:300] + ")",
        path=p,
        fix="check the file is a complete slide in an OpenSlide format (SVS, TIFF, NDPI, MRXS, DICOM, ...); re-copy it if it was truncated",
    )

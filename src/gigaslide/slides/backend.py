"""Open a slide file with OpenSlide, falling back to tiffslide, then to a plain-image reader.

All three expose the same small OpenSlide-like surface (dimensions, level_*, properties,
associated_images, read_region). Every failure becomes one :class:`GigaslideError` line.

Two kinds of TIFF are refused before any reader opens them (:func:`check_tiff`): a truncated copy (its image data
reaches past the end of the file), and one whose samples are deeper than 8 bits (16-bit fluorescence or grayscale
exports), which none of the readers reads right: OpenSlide keeps the top 8 bits of each sample (a 12-bit image in
16-bit samples reads nearly black) and misplaces the pixels of a 16-bit grayscale image's partial edge tiles;
tiffslide's 16-bit grayscale regions are clipped to white and its thumbnails fail. A plain image (PNG, ...) with
deeper samples is refused as well (the plain-image reader read a 16-bit PNG all white).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.slides.tiled import PageCycleError, tiff_pages


def _open_openslide(path: Path) -> Any:
    import openslide

    return openslide.OpenSlide(str(path))


class _QuietFilter(logging.Filter):
    """Drops the records of the threads inside :func:`_quiet_tifffile` (a depth per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_QUIET = _QuietFilter()


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile's log lines (e.g. ``<tifffile.TiffPages @8> invalid page offset`` on a truncated file) off while a
    reader tries the file: they were printed beside the one-line error (or none: the file is then read).

    Only this thread's, by a filter added to the ``tifffile`` logger once (not setLevel: each call clears the cache of
    every logger, ~1.5 ms): setting ``logger.disabled`` and restoring it left tifffile's logger off for good after
    slides were opened from several threads (one thread restored what another had set)."""
    log = logging.getLogger("tifffile")
    if _QUIET not in log.filters:
        log.addFilter(_QUIET)
    local = _QUIET.local
    local.depth = getattr(local, "depth", 0) + 1
    try:
        yield
    finally:
        local.depth -= 1


def _open_tiffslide(path: Path) -> Any:
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _open_image(path: Path) -> Any:
    import openslide

    return openslide.ImageSlide(str(path))


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def check_tiff(path: Path) -> None:
    """Refuse a TIFF no reader reads right, before any of them tries: samples of more than 8 bits in its first image
    (see the module docstring), or image data (any page's tiles or strips) reaching past the end of the file -- a
    truncated copy, which tiffslide opened and whose region reads then failed deep inside zarr, printing hundreds of
    lines of tracebacks at exit. Another file is checked as a plain image (:func:`_check_plain_image`); a TIFF
    tifffile cannot parse passes (the readers then say why)."""
    try:
        with open(path, "rb") as fh:
            tiff = fh.read(4) in _TIFF_MAGIC
    except OSError:  # unreadable: the readers say so
        return
    if not tiff:
        return _check_plain_image(path)
    try:
        import tifffile

        size = path.stat().st_size
        with _quiet_tifffile(), tifffile.TiffFile(str(path)) as tif:
            first = tif.pages[0]
            bits, samples = int(first.bitspersample), int(first.samplesperpixel)
            end, chunk = 0, (0, "", 0, 0)
            for page in tiff_pages(tif):
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                end = max(end, int(ends.max()) if ends.size else 0)
                if not tif.is_ndpi:  # NDPI's strips are whole-level JPEGs OpenSlide reads by their restart markers
                    chunk = max(chunk, _chunk(page))
    except PageCycleError as e:  # the readers hung (tifffile) or read one page of it
        raise GigaslideError(f"the file is damaged: {e}", path=path,
                             fix="re-copy or re-export the slide from its source") from None
    except Exception:  # noqa: BLE001 - not parseable here: the readers decide
        return
    if end > size:
        raise GigaslideError(f"the file is truncated: its image data reaches byte {end:,}, the file has {size:,}",
                             path=path, fix="re-copy the slide from its source (the copy was cut short)")
    if chunk[0] > MAX_CHUNK_BYTES:
        nbytes, kind, cw, ch = chunk
        raise GigaslideError(
            f"its header says each {kind} is {cw:,} x {ch:,} px ({nbytes / 2**30:.3g} GiB decoded, more than the "
            f"{MAX_CHUNK_BYTES / 2**30:g} GiB a reader decodes at once): a damaged or hostile header, or a TIFF "
            f"written in one huge {kind}, which reading any tile would decode whole", path=path,
            fix="re-save it tiled, e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`, and use "
                "OUT.tif")
    if bits > 8:
        kind = {1: "grayscale", 3: "RGB", 4: "RGBA"}.get(samples, f"{samples}-channel")
        raise GigaslideError(
            f"{kind} TIFF with {bits}-bit samples: the slide readers take 8-bit samples (OpenSlide keeps only the top "
            "8 bits, a 12-bit image reads nearly black), so its tiles would be wrong", path=path,
            fix="convert it to 8 bits with its intensity range scaled to 0-255, e.g. `vips scale IN tmp.v && vips "
                "tiffsave tmp.v OUT.tif --tile --pyramid --compression jpeg`, and use OUT.tif")


#: Largest decoded size of one stored tile or strip (TIFF chunk) a slide may have: reading any pixel decodes a whole
#: chunk, so a header claiming a 65536 x 65536 px tile made OpenSlide abort the process ("GLib-ERROR: failed to allocate
#: 17179869184 bytes", no exception to catch) on a 12 KB file, and a single 20000 x 20000 px strip took 1.2 GB per
#: reader. Slides store tiles of 240-1024 px (at most a few MB each).
MAX_CHUNK_BYTES = 2**30


def _chunk(page) -> tuple[int, str, int, int]:  # noqa: ANN001 - a tifffile page
    """``(decoded bytes, "tile" or "strip", width, height)`` of one stored chunk of ``page``."""
    per_px = int(page.samplesperpixel) * max(1, -(-int(page.bitspersample) // 8))
    if page.is_tiled:
        w, h = int(page.tilewidth), int(page.tilelength) * max(1, int(page.tiledepth))
        return w * h * per_px, "tile", w, h
    w, h = int(page.imagewidth), min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
    return w * h * per_px, "strip", w, h


#: PIL modes of images whose samples are deeper than 8 bits (16-bit PNG, 32-bit integer or float images).
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _check_plain_image(path: Path) -> None:
    """Refuse a plain image (PNG, ...) with samples deeper than 8 bits: the plain-image reader read a 16-bit PNG as
    all white. Files PIL does not recognise pass (a slide format: OpenSlide decides)."""
    try:
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            mode = im.mode
    except Exception:  # noqa: BLE001 - not a plain image
        return
    if mode in DEEP_MODES:
        raise GigaslideError(
            f"image with samples deeper than 8 bits (PIL mode {mode}): the slide readers take 8-bit samples, so its "
            "tiles would be wrong (a 16-bit PNG read all white)", path=path,
            fix="convert it to 8 bits with its intensity range scaled to 0-255 (e.g. `vips scale IN OUT.png`), "
                "and use the converted file")


def _close_quietly(handle: Any) -> None:
    if handle is not None:
        with contextlib.suppress(Exception):
            handle.close()


def open_backend(path: str | os.PathLike) -> tuple[Any, str]:
    """Return ``(handle, backend_name)``; raise a one-line error when no reader can open the file."""
    p = Path(path)
    if not p.exists():
        raise GigaslideError("slide file not found", path=p, fix="check the path (and that the share is mounted)")
    if p.is_dir():
        raise GigaslideError("is a directory, not a slide", path=p, fix="pass slide files, or the folder to a batch command")
    if not p.is_file():  # a named pipe blocked the first read for good (a device read as no slide)
        raise GigaslideError("is not a regular file (a named pipe, socket or device), not a slide", path=p,
                             fix="pass the slide file itself (copy what the pipe delivers to a file first)")
    check_tiff(p)
    errors: list[str] = []
    for name, opener in (("openslide", _open_openslide), ("tiffslide", _open_tiffslide), ("image", _open_image)):
        handle = None
        try:
            with _quiet_tifffile():
                handle = opener(p)
                if name != "openslide":  # fallbacks open lazily: prove that pixels decode
                    last = handle.level_count - 1
                    handle.read_region((0, 0), last, (1, 1))
        except Exception as e:  # noqa: BLE001 - every reader's failure is collected
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            _close_quietly(handle)  # its file stayed open until a garbage collection: one descriptor per slide
            continue
        return handle, name
    raise GigaslideError(
        "no reader could open this file as a slide (" + "; ".join(errors)[:300] + ")",
        path=p,
        fix="check the file is a complete slide in an OpenSlide format (SVS, TIFF, NDPI, MRXS, DICOM, ...); re-copy it if it was truncated",
    )

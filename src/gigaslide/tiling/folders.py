"""Folders of tiles that already exist as image files (PCam, NCT-CRC, a JPEG dump).

The one place that lists, reads and labels them: the class of a tile is its first-level
sub-folder (sorted names -> labels 0, 1, ...); a flat folder has no labels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.slides.discover import walk_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (sorted; symlinked sub-folders, e.g. class folders linked in, are followed); a
    clear error when it is missing or holds none."""
    d = Path(folder)
    if not d.exists():
        raise GigaslideError("image folder not found", path=d, fix="check the --data path")
    if not d.is_dir():
        raise GigaslideError("not a folder", path=d, fix="pass a folder of tiles (jpg/png/tif) or of slides")
    files = [p for p in walk_files(d, recursive) if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    if not files:
        raise GigaslideError("no images (jpg/png/tif) in this folder", path=d,
                             fix="point --data at a folder of tiles, or at a folder of slides")
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]: grayscale as three equal channels, transparency composited on white (glass, as the slide
    readers do; dropping alpha made a transparent background black). GigaslideError naming the file when it cannot be
    decoded, is larger than PIL's decompression-bomb limit, or has samples deeper than 8 bits (PIL read a 16-bit
    grayscale PNG as nearly white)."""
    from PIL import Image, UnidentifiedImageError

    from gigaslide.slides.backend import DEEP_MODES
    from gigaslide.slides.slide import to_rgb

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in DEEP_MODES:
                alpha = mode in ("LA", "PA", "La") or (mode == "P" and "transparency" in im.info)
                return to_rgb(im.convert("RGBA") if alpha else im)
    except Image.DecompressionBombError as e:
        raise GigaslideError(f"image too large for a tile ({str(e).splitlines()[0][:120]})", path=path,
                             fix="cut it into tiles first (a slide: `gigaslide tile`), or leave it out") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise GigaslideError(f"cannot read image ({str(e).splitlines()[0][:120]})", path=path,
                             fix="delete or re-export the file") from None
    raise GigaslideError(f"image with samples deeper than 8 bits (PIL mode {mode}) would be read clipped to white",
                         path=path, fix="convert it to 8 bits with its intensity range scaled to 0-255 "
                                        "(e.g. `vips scale IN OUT.png`) and use the converted file")


def labelled_images(folder: str | os.PathLike) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """(files, labels, class names): class = first-level sub-folder. A flat folder gives labels None."""
    d = Path(folder)
    files = list_images(d)
    top = sorted({f.relative_to(d).parts[0] for f in files if len(f.relative_to(d).parts) > 1})
    if not top:
        return files, None, []
    loose = [f for f in files if len(f.relative_to(d).parts) == 1]
    if loose:
        raise GigaslideError(f"{len(loose)} image(s) lie beside the class sub-folders (e.g. {loose[0].name})", path=d,
                             fix="move every image into its class sub-folder")
    index = {c: i for i, c in enumerate(top)}
    labels = np.array([index[f.relative_to(d).parts[0]] for f in files], dtype=np.int64)
    return files, labels, top


def file_digest(path: str | os.PathLike) -> bytes:
    """SHA-256 of a file's content (the part of :func:`tiles_fingerprint` that reads it)."""
    return hashlib.sha256(Path(path).read_bytes()).digest()


def tiles_fingerprint(folder: str | os.PathLike, files: list[Path], labels: np.ndarray | None,
                      digests: list[bytes] | None = None) -> str:
    """A tile set's identity: its files (name relative to ``folder`` and content) and labels, in order. Two
    results are compared paired only when their test tiles' fingerprints agree.

    ``digests``: the files' :func:`file_digest`, when the caller has them already (the fingerprint of a subset of
    files hashed once, e.g. those that could be read); else each file is read and hashed."""
    if digests is not None and len(digests) != len(files):
        raise ValueError(f"{len(digests)} digests for {len(files)} files")
    h = hashlib.sha256()
    folder = Path(folder)
    for i, f in enumerate(files):
        y = -1 if labels is None else int(labels[i])
        h.update(f"{Path(f).relative_to(folder).as_posix()}\t{y}\n".encode())
        h.update(file_digest(f) if digests is None else digests[i])
    return h.hexdigest()[:16]


def subsample(files: list[Path], labels: np.ndarray | None, *, limit: int | None = None,
              max_per_class: int | None = None, seed: int = 0) -> tuple[list[Path], np.ndarray | None]:
    """A random subset fixed by ``seed``, in the original order: at most ``limit`` in all and/or
    ``max_per_class`` per class."""
    rng = np.random.default_rng(seed)
    keep = np.arange(len(files))
    if max_per_class is not None and labels is not None:
        keep = np.concatenate([idx if len(idx) <= max_per_class else rng.choice(idx, max_per_class, replace=False)
                               for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))])
    if limit is not None and limit < len(keep):
        keep = rng.choice(keep, size=limit, replace=False)
    keep = np.sort(keep)
    return [files[i] for i in keep], None if labels is None else labels[keep]


__all__ = ["IMAGE_EXTENSIONS", "file_digest", "labelled_images", "list_images", "read_image", "subsample",
           "tiles_fingerprint"]

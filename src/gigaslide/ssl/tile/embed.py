"""``gigaslide embed-tiles``: embed a labelled tile folder with a registry encoder or a pretrain run.

A pretrain run folder (or its ``checkpoint``) stands for its exported encoder; the work itself is
:func:`gigaslide.features.tiles.embed_tile_folder`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from PIL import Image

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.features.tiles import embed_arrays, embed_tile_folder
from gigaslide.tiling.folders import IMAGE_EXTENSIONS, labelled_images

log = logging.getLogger("gigaslide.ssl.tile")


def resolve_encoder_arg(name: str) -> str:
    """``RUN_DIR`` or ``RUN_DIR/checkpoint`` (a pretrain run) -> ``RUN_DIR/encoder``; anything else unchanged."""
    p = Path(name)
    if p.is_dir() and not (p / "encoder.json").is_file():
        run = p.parent if p.name == "checkpoint" else p
        if (run / "encoder" / "encoder.json").is_file():
            return str(run / "encoder")
        if (run / "checkpoint").is_dir() or p.name == "checkpoint":
            raise GigaslideError("this run has no exported encoder yet", path=run,
                                 fix="re-run the same `gigaslide pretrain` command; it resumes and exports RUN_DIR/encoder")
    return name


def warn_resized(first: Path, spec: Any) -> int | None:
    """Warn once when the tiles are not the encoder's input size: each is resized to it, so the encoder sees them at
    another magnification than their own (an export trained on 224 px tiles at 0.5 µm/px sees 96 px PCam tiles,
    ~1 µm/px, zoomed 2.3x). Returns the tiles' side (the first tile's), or None when it cannot be read."""
    try:
        with Image.open(first) as im:
            side = max(im.size)
    except OSError:
        return None
    if side != spec.input_size:
        mpp = f"; it was made for {spec.native_mpp} µm/px" if spec.native_mpp else ""
        log.warning("tiles are %d px (%s) but encoder %s takes %d px: each tile is resized by %.2fx, so the encoder "
                    "sees it at another magnification than its own%s", side, first.name, spec.name, spec.input_size,
                    spec.input_size / side, mpp)
    return side


@runs.keeps_caller_rng
def embed_folder(folder: str | os.PathLike, encoder_name: str, out: str | os.PathLike, *, weights: str = "default",
                 batch_size: int = 128, limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Embed ``folder`` (class-per-subfolder) with an encoder and write ``out`` (.h5); returns a summary."""
    from gigaslide.encoders import build_encoder

    encoder_name = resolve_encoder_arg(encoder_name)
    files, _, _ = labelled_images(folder)  # a clear error for a missing/empty folder before any model is built
    enc = build_encoder(encoder_name, weights, seed=seed)
    if files:
        warn_resized(files[0], enc.spec)
    return embed_tile_folder(enc, folder, out, batch_size=batch_size, limit=limit, seed=seed, source=str(encoder_name))


__all__ = ["IMAGE_EXTENSIONS", "embed_arrays", "embed_folder", "labelled_images", "resolve_encoder_arg", "warn_resized"]

"""``gigaslide embed-tiles``: embed a labelled tile folder with a registry encoder or a pretrain run.

A pretrain run folder (or its ``checkpoint``) stands for its exported encoder; the work itself is
:func:`gigaslide.features.tiles.embed_tile_folder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError
from gigaslide.features.tiles import embed_arrays, embed_tile_folder
from gigaslide.tiling.folders import IMAGE_EXTENSIONS, labelled_images


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


def embed_folder(folder: str | os.PathLike, encoder_name: str, out: str | os.PathLike, *, weights: str = "default",
                 batch_size: int = 128, limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Embed ``folder`` (class-per-subfolder) with an encoder and write ``out`` (.h5); returns a summary."""
    from gigaslide.encoders import build_encoder

    encoder_name = resolve_encoder_arg(encoder_name)
    labelled_images(folder)  # a clear error for a missing/empty folder before any model is built
    enc = build_encoder(encoder_name, weights, seed=seed)
    return embed_tile_folder(enc, folder, out, batch_size=batch_size, limit=limit, seed=seed, source=str(encoder_name))


__all__ = ["IMAGE_EXTENSIONS", "embed_arrays", "embed_folder", "labelled_images", "resolve_encoder_arg"]

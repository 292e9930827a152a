"""Embed a labelled tile folder (one sub-folder per class) into a feature file with ``labels``.

The output is a ``gigaslide.features.store`` file (``features``, zero ``coords``, ``labels``) with
attrs ``classes`` (JSON list, index = label), ``encoder``, ``encoder_weights_sha256``, ``tile_size``,
``source_folder`` and provenance; ``gigaslide evaluate tiles`` reads it directly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.data import IMAGE_EXTENSIONS, list_images, read_image


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


@torch.no_grad()
def embed_arrays(encoder, images: np.ndarray | list[np.ndarray], batch_size: int = 128) -> np.ndarray:  # noqa: ANN001
    """Features of uint8 RGB tiles ``[N, H, W, 3]`` (or a list of them, each its own size)."""
    device = next(encoder.parameters()).device
    out = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if isinstance(chunk, list):
            if len({a.shape for a in chunk}) > 1:  # mixed sizes: resize via the encoder one by one
                feats = [encoder(torch.from_numpy(np.ascontiguousarray(a))[None].to(device)).float() for a in chunk]
                out.append(torch.cat(feats).cpu().numpy())
                continue
            chunk = np.stack(chunk)
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
        with amp:
            out.append(encoder(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, encoder.embed_dim), np.float32)


def embed_folder(folder: str | os.PathLike, encoder_name: str, out: str | os.PathLike, *, weights: str = "default",
                 batch_size: int = 128, limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Embed ``folder`` (class-per-subfolder) with an encoder and write ``out`` (.h5); returns a summary."""
    from gigaslide.encoders import build_encoder
    from gigaslide.features import store

    encoder_name = resolve_encoder_arg(encoder_name)
    files, labels, classes = labelled_images(folder)
    if limit is not None and limit < len(files):  # stratified-enough random subset, fixed by seed
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in keep]
        labels = None if labels is None else labels[keep]
    enc = build_encoder(encoder_name, weights, seed=seed)
    if torch.cuda.is_available():
        enc = enc.cuda()
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, len(files), batch_size):  # stream: only one batch of pixels in memory
        imgs = []
        for f in files[i:i + batch_size]:
            try:
                imgs.append(read_image(f))
            except GigaslideError as e:
                raise GigaslideError(f"unreadable image ({e.what})", path=f,
                                     fix="delete or re-export it, then re-run") from None
        chunks.append(embed_arrays(enc, imgs, batch_size))
    feats = np.concatenate(chunks) if chunks else np.zeros((0, enc.embed_dim), np.float32)
    dt = time.perf_counter() - t0
    attrs = {"encoder": enc.spec.name, "encoder_weights_sha256": enc.weights_id, "encoder_source": str(encoder_name),
             "tile_size": int(enc.spec.input_size), "mpp": enc.spec.native_mpp, "source_folder": str(Path(folder).resolve()),
             "classes": json.dumps(classes), "slide_id": Path(out).stem, "seed": seed, "n_tiles": len(files)}
    store.save(out, feats, attrs=attrs, labels=labels)
    return {"out": str(out), "n": len(files), "dim": int(feats.shape[1]), "classes": classes,
            "images_per_s": round(len(files) / dt, 1) if dt > 0 else None, "encoder": enc.spec.name}


__all__ = ["IMAGE_EXTENSIONS", "embed_arrays", "embed_folder", "labelled_images"]

"""Features of tile images (a labelled tile folder or arrays), for tile-level probes and benchmarks.

:func:`embed_tile_folder` writes a ``gigaslide.features.store`` file (``features``, zero ``coords``,
``labels``) with attrs ``classes`` (JSON list, index = label), ``encoder``,
``encoder_weights_sha256``, ``tile_size``, ``source_folder``, ``tiles_fingerprint`` (the tiles' names,
labels and content, in order: two encoders' results are compared paired only on the same tiles) and
provenance; ``gigaslide evaluate tiles`` reads it directly. A file already made by the same encoder
weights from the same tiles (same fingerprint) is reused (resume). An image that cannot be read is left
out and named (attrs ``n_skipped``, ``skipped_files``; the summary's ``skipped``), and the job goes on: the
fingerprint and labels are those of the tiles embedded, so two encoders' files of one folder still pair.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gigaslide.devices import autocast_ctx, resolve_precision
from gigaslide.encoders.inference import for_inference, nonfinite_error
from gigaslide.errors import GigaslideError
from gigaslide.tiling.folders import file_digest, labelled_images, read_image, subsample, tiles_fingerprint


@torch.no_grad()
def embed_arrays(encoder, images: np.ndarray | list[np.ndarray], batch_size: int = 128) -> np.ndarray:  # noqa: ANN001
    """Features of uint8 RGB tiles ``[N, H, W, 3]`` (or a list of them, each its own size)."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        with autocast_ctx(device, "auto"):
            if isinstance(chunk, list):
                if len({a.shape for a in chunk}) > 1:  # mixed sizes: resize via the encoder one by one
                    feats = [encoder(torch.from_numpy(np.array(a))[None].to(device)).float() for a in chunk]  # writable
                    out.append(torch.cat(feats).cpu().numpy())
                    continue
                chunk = np.stack(chunk)
            out.append(encoder(torch.from_numpy(np.ascontiguousarray(chunk)).to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, encoder.embed_dim), np.float32)


def _first_side(files: list[Path]) -> int | None:
    """Side of the first image (header only), for the reuse check; None when it is not square."""
    if not files:
        return None
    try:
        with Image.open(files[0]) as im:
            w, h = im.size
    except OSError:
        return None
    return int(w) if w == h else None


def read_tile(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 tile; an unreadable file is a GigaslideError naming it (a batch job stops on it)."""
    try:
        return read_image(path)
    except GigaslideError as e:
        raise GigaslideError(f"unreadable image ({e.what})", path=path, fix="delete or re-export it, then re-run") from None


#: Most unreadable file names kept in a feature file's ``skipped_files`` attr (all are counted in ``n_skipped``).
MAX_SKIPPED_NAMES = 100


def embed_tile_folder(encoder, folder: str | os.PathLike, out: str | os.PathLike, *, batch_size: int = 128,  # noqa: ANN001
                      limit: int | None = None, max_per_class: int | None = None, seed: int = 0,
                      source: str | None = None, mpp: float | None = None) -> dict[str, Any]:
    """Embed ``folder`` (class-per-subfolder, or flat: no labels) with a built ``encoder`` into ``out``
    (.h5); returns a summary (``skipped``: ``{file: why}`` of the images that could not be read and were left
    out). Only one batch of pixels is in memory at a time.

    Provenance records what the tiles are: ``tile_size`` is the side of the images read (absent when
    they differ or are not square), ``mpp`` only when the caller knows it (absent otherwise, never 0).
    """
    from gigaslide.features import store

    files, labels, classes = labelled_images(folder)
    files, labels = subsample(files, labels, limit=limit, max_per_class=max_per_class, seed=seed)
    out = Path(out)
    digests = [file_digest(f) for f in files]  # each file hashed once: the listing's and the kept tiles' fingerprints
    attrs = {"encoder": encoder.spec.name, "encoder_weights_sha256": encoder.weights_id,
             "encoder_source": source or encoder.spec.name, "tile_size": _first_side(files),
             "mpp": mpp, "source_folder": str(Path(folder).resolve()), "classes": json.dumps(classes),
             "slide_id": out.stem, "seed": seed, "n_listed": len(files),
             "listing_fingerprint": tiles_fingerprint(folder, files, labels, digests)}  # every file chosen, read or not
    if out.is_file():
        try:
            old = store.load(out)
        except GigaslideError:
            old = None
        # the encoder too, not only its weights: one weights file under two entries (vit_small, lunit_dino_vits16)
        # is two preprocessings (mean / std, input size), so other features
        if old is not None and all(str(old.attrs.get(k)) == str(attrs[k])
                                   for k in ("encoder", "encoder_source", "encoder_weights_sha256", "source_folder",
                                             "n_listed", "seed", "listing_fingerprint")):
            skipped = json.loads(old.attrs.get("skipped_files") or "{}")
            return {"out": str(out), "n": int(old.features.shape[0]), "dim": int(old.features.shape[1]),
                    "classes": classes, "images_per_s": None, "encoder": encoder.spec.name, "reused": True,
                    "skipped": skipped}
    if torch.cuda.is_available() and next(encoder.parameters()).device.type == "cpu":
        encoder = encoder.cuda()
    encoder = for_inference(encoder)  # batch norms folded: inference only
    t0 = time.perf_counter()
    chunks, shapes, kept, skipped = [], set(), [], {}
    for i in range(0, len(files), batch_size):
        tiles = []
        for j in range(i, min(i + batch_size, len(files))):
            try:
                tiles.append(read_image(files[j]))
            except GigaslideError as e:  # a broken tile is named and left out; the job goes on
                skipped[Path(files[j]).relative_to(folder).as_posix()] = e.what
                continue
            kept.append(j)
        shapes.update(t.shape[:2] for t in tiles)
        if tiles:
            chunks.append(embed_arrays(encoder, tiles, batch_size))
    if files and not kept:
        raise GigaslideError(f"none of the {len(files)} images could be read (e.g. {next(iter(skipped.values()))})",
                             path=folder, fix="check the folder holds PNG/JPEG/TIFF tiles")
    feats = np.concatenate(chunks) if chunks else np.zeros((0, encoder.embed_dim), np.float32)
    dt = time.perf_counter() - t0
    files, labels = [files[j] for j in kept], None if labels is None else labels[kept]
    (h, w), = shapes if len(shapes) == 1 else ((0, 1),)
    # the tiles embedded, from the digests taken above (not hashed again); a file changed since is caught by the
    # listing fingerprint of the next run, which reads every file
    fingerprint = tiles_fingerprint(folder, files, labels, [digests[j] for j in kept]) if skipped \
        else attrs["listing_fingerprint"]
    precision = resolve_precision(next(encoder.parameters()).device, "auto")  # embed_arrays' autocast
    bad = nonfinite_error(feats, precision, what="the folder", path=folder, names=files,
                          in_fp32="run on a GPU with native bf16 (Ampere or later) or on the CPU")
    if bad is not None:  # NaN / Inf features are never written
        raise bad
    attrs.update(tile_size=int(h) if h == w else None, n_tiles=len(files), n_skipped=len(skipped),
                 precision=precision,
                 tiles_fingerprint=fingerprint,
                 skipped_files=json.dumps(dict(list(skipped.items())[:MAX_SKIPPED_NAMES])) if skipped else None)
    store.save(out, feats, attrs={k: v for k, v in attrs.items() if v is not None}, labels=labels)
    return {"out": str(out), "n": len(files), "dim": int(feats.shape[1]), "classes": classes, "skipped": skipped,
            "images_per_s": round(len(files) / dt, 1) if dt > 0 else None, "encoder": encoder.spec.name, "reused": False}


__all__ = ["embed_arrays", "embed_tile_folder", "read_tile"]

"""Batched feature extraction: slides -> tiles -> encoder -> one HDF5 feature file per slide.

Reading and JPEG decoding run in DataLoader worker processes while the model runs in the main
process (channels_last; bf16 autocast on CPU when it agrees with fp32 to cosine >= 0.999; AMP on
CUDA). A batch never spans two slides. A broken slide is reported in the manifest and the batch
goes on; finished slides are skipped on a re-run; every file is written atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic
from gigaslide.devices import autocast_ctx, pick_device
from gigaslide.encoders import Encoder
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.manifest import Manifest
from gigaslide.slides import open_slide, slide_id_from_path
from gigaslide.tiling import TileGrid, TilingParams, layout, tile_slide

#: bf16 is used on CPU only when its features agree with fp32 at least this well (min cosine).
BF16_MIN_COSINE = 0.999


@dataclass
class SlideJob:
    path: str
    slide_id: str
    coords: np.ndarray
    tile_size: int
    mpp: float
    slide_mpp: float | str | None


class TileBatches(torch.utils.data.Dataset):
    """Item i = one batch of tiles of one slide, read in a worker: ``(job_index, start, uint8 [B,H,W,3] | error)``."""

    def __init__(self, jobs: Sequence[SlideJob], batch_size: int):
        self.jobs = list(jobs)
        self.index: list[tuple[int, int, int]] = []
        for j, job in enumerate(self.jobs):
            for s in range(0, len(job.coords), batch_size):
                self.index.append((j, s, min(s + batch_size, len(job.coords))))
        self._open: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _slide(self, j: int):  # noqa: ANN202
        if self._open is None or self._open[0] != j:
            if self._open is not None:
                self._open[1].close()
            job = self.jobs[j]
            s = open_slide(job.path, mpp=job.slide_mpp, slide_id=job.slide_id)
            self._open = (j, s, s.choose_level(job.mpp))
        return self._open

    def __getitem__(self, i: int) -> tuple[int, int, torch.Tensor | str]:
        j, start, stop = self.index[i]
        job = self.jobs[j]
        try:
            _, slide, level = self._slide(j)
            ts = job.tile_size
            out = np.empty((stop - start, ts, ts, 3), np.uint8)
            for k, (x, y) in enumerate(job.coords[start:stop]):
                out[k] = slide.read_region((int(x), int(y)), (ts, ts), job.mpp, level=level)
            return j, start, torch.from_numpy(out)
        except GigaslideError as e:
            return j, start, e.one_line()
        except Exception as e:  # noqa: BLE001 - a damaged slide must not stop the batch
            return j, start, f"{job.path}: cannot read tiles ({type(e).__name__}: {str(e)[:200]})"


@dataclass
class EncodeResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    bf16_cosine: float | None = None


def _reader_init(worker_id: int) -> None:
    """Readers decode JPEG tiles; they need no torch threads of their own."""
    torch.set_num_threads(1)


def choose_precision(encoder: Encoder, sample: torch.Tensor, device: torch.device, precision: str) -> tuple[str, float | None]:
    """``auto``: AMP on CUDA; on CPU bf16 only if it agrees with fp32 (min cosine >= 0.999) on ``sample``."""
    if precision != "auto":
        return precision, None
    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    with torch.inference_mode():
        a = encoder(sample.to(device)).float()
        with autocast_ctx(device, "bf16"):
            b = encoder(sample.to(device)).float()
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
    return ("bf16" if cos >= BF16_MIN_COSINE else "fp32"), cos


def _feature_attrs(encoder: Encoder, params: TilingParams, grid: TileGrid, precision: str, seed: int | None) -> dict:
    return {
        "encoder": encoder.spec.name, "encoder_weights_sha256": encoder.weights_id, "embed_dim": encoder.embed_dim,
        "mpp": params.mpp, "tile_size": params.tile_size, "overlap": params.overlap, "min_tissue": params.min_tissue,
        "slide_id": grid.slide_id, "slide_path": grid.slide_path, "slide_mpp": grid.slide_mpp, "precision": precision,
        "encoder_input_size": encoder.spec.input_size, "seed": seed,
    }


def _coords_attrs(grid: TileGrid) -> dict:
    return {"patch_size": grid.tile_size, "patch_size_level0": grid.tile_size_level0, "patch_level": grid.read_level,
            "target_mpp": grid.target_mpp, "level0_mpp": grid.slide_mpp, "level_dim": list(grid.slide_dimensions),
            "name": grid.slide_id}


def is_finished(path: Path, encoder: Encoder, params: TilingParams) -> bool:
    if not path.is_file():
        return False
    try:
        ff = store.load(path)
    except GigaslideError:
        return False
    a = ff.attrs
    return (a.get("encoder") == encoder.spec.name and a.get("encoder_weights_sha256") == encoder.weights_id
            and abs(float(a.get("mpp", -1)) - params.mpp) < 1e-9 and int(a.get("tile_size", -1)) == params.tile_size
            and int(a.get("overlap", -1)) == params.overlap)


def encode_slides(slides: Sequence[str | os.PathLike], out: str | os.PathLike, encoder: Encoder, params: TilingParams, *,
                  batch_size: int = 64, workers: int = 1, precision: str = "auto", device: str = "auto",
                  slide_mpp: float | str | None = None, overlays: bool = True, seed: int | None = 0,
                  progress: Callable[[str, int, int], None] | None = None) -> EncodeResult:
    """Tile (or reuse tiles) and encode every slide into ``out/features/<slide_id>.h5``."""
    out = atomic.ensure_writable_dir(out)
    for sub in ("features", "patches"):
        atomic.clean_stale_tmp(out / sub)
    dev = pick_device(device)
    encoder = encoder.to(dev).eval()
    if encoder.spec.family == "cnn":
        encoder = encoder.to(memory_format=torch.channels_last)
    manifest = Manifest(out / "manifest.json", {
        "command": "encode", "encoder": encoder.spec.name, "weights": encoder.weights_id, **params.as_dict(),
        "batch_size": batch_size, "workers": workers, "precision": precision, "device": str(dev)})
    res = EncodeResult()
    t_start = time.perf_counter()
    jobs: list[SlideJob] = []
    grids: list[TileGrid] = []
    seen: dict[str, str] = {}
    for p in slides:
        sid = slide_id_from_path(Path(p))
        try:
            with open_slide(p, mpp=slide_mpp) as s:  # opened once: id, then tissue + grid
                sid = s.id
                if sid in seen:
                    raise GigaslideError(f"slide id '{sid}' also used by {seen[sid]}", path=p,
                                         fix="rename one of the slides; ids come from file names")
                seen[sid] = str(p)
                if is_finished(layout(out, sid)["features"], encoder, params):
                    res.skipped.append(sid)
                    manifest.set(sid, "done", path=str(p), note="already encoded (skipped)")
                    continue
                grid = tile_slide(s, out, params, overlays=overlays)
        except GigaslideError as e:
            res.failed[sid] = e.one_line()
            manifest.set(sid, "failed", path=str(p), error=e.one_line())
            if progress:
                progress(f"failed {sid}", 0, 0)
            continue
        jobs.append(SlideJob(str(p), grid.slide_id, grid.coords, params.tile_size, params.mpp, slide_mpp))
        grids.append(grid)
    if not jobs:
        res.seconds = time.perf_counter() - t_start
        return res

    ds = TileBatches(jobs, batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers > 0 else None, pin_memory=dev.type == "cuda",
                                         persistent_workers=False, worker_init_fn=_reader_init if workers > 0 else None)
    bufs: dict[int, list[np.ndarray]] = {}
    t_slide: dict[int, float] = {}
    failed_jobs: set[int] = set()
    chosen: str | None = None
    total_tiles = sum(len(j.coords) for j in jobs)
    done_tiles = 0
    for j, start, batch in loader:
        if j in failed_jobs:
            continue
        job, grid = jobs[j], grids[j]
        t_slide.setdefault(j, time.perf_counter())
        if isinstance(batch, str):
            failed_jobs.add(j)
            bufs.pop(j, None)
            res.failed[job.slide_id] = batch
            manifest.set(job.slide_id, "failed", path=job.path, error=batch)
            continue
        x = batch.to(dev, non_blocking=True)
        if chosen is None:
            chosen, res.bf16_cosine = choose_precision(encoder, x[:8], dev, precision)
            res.precision = chosen
        with torch.inference_mode(), autocast_ctx(dev, chosen):
            f = encoder(x)
        bufs.setdefault(j, []).append(f.float().cpu().numpy())
        done_tiles += len(batch)
        if progress:
            progress(job.slide_id, done_tiles, total_tiles)
        if start + len(batch) >= len(job.coords):
            feats = np.concatenate(bufs.pop(j), axis=0)
            store.save(layout(out, job.slide_id)["features"], feats, grid.coords,
                       attrs=_feature_attrs(encoder, params, grid, chosen, seed), coords_attrs=_coords_attrs(grid))
            secs = time.perf_counter() - t_slide[j]
            manifest.set(job.slide_id, "done", path=job.path, tiles=len(feats), seconds=round(secs, 3),
                         precision=chosen, bf16_cosine=res.bf16_cosine)
            res.done.append(job.slide_id)
            res.tiles += len(feats)
    res.seconds = time.perf_counter() - t_start
    return res

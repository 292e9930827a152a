"""One peer measurement for ``bench_reader.py``, run with the peers' own python (``setup.sh``); prints one JSON line.

    python read_peer.py tile PEER SLIDE --tile 224 --mpp 0.5 --min-tissue 0.25 --mpp0 M
    python read_peer.py read PEER SLIDE --coords C.npy --tile 224 --level L --mpp0 M --procs P

PEER is ``hs2p`` (6.1.0, libvips backend) or ``tiatoolbox``.

* ``tile``: the peer's own tissue segmentation + tiling (hs2p ``tile_slide`` with HSV segmentation;
  TIAToolbox ``SlidingWindowPatchExtractor`` with its Otsu tissue mask), min tissue 0.25 as gigaslide's;
  reports seconds, tiles and peak RSS of this process.
* ``read``: the given level-0 top-left corners (gigaslide's grid), ``tile`` px at pyramid level ``level``,
  read the way the library reads tiles: hs2p's own tile stream (``iter_tile_records_from_result``:
  grouped region reads, cropped) on a tiling result whose coordinates are replaced by the given ones;
  TIAToolbox ``WSIReader.read_rect`` per tile. Every tile is an RGB uint8 array. With ``--procs 2`` the
  coordinates are split into two contiguous halves read by two forked processes. Timed from opening the
  slide to the last tile; reports tiles/s, CPU seconds (user+sys, this process and its workers), peak RSS
  (this process + its largest worker; and this process after the imports alone) and the largest difference
  to OpenSlide on a few interior tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CHECK = 8  # tiles compared with OpenSlide


def _rss_mb() -> float:
    """Peak RSS of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hs2p_tiling(a: argparse.Namespace):
    from hs2p import DEFAULT_MASK_SAMPLING, SegmentationConfig, SlideSpec, TilingConfig, tile_slide

    spec = SlideSpec(sample_id=Path(a.slide).stem, image_path=Path(a.slide), spacing_at_level_0=a.mpp0)
    tiling = TilingConfig(backend="vips", mask_backend="vips", requested_spacing_um=a.mpp,
                          requested_tile_size_px=a.tile, tolerance=0.05, overlap=0.0)
    masks = dataclasses.replace(DEFAULT_MASK_SAMPLING, min_coverage={"tissue": a.min_tissue})
    return tile_slide(spec, tiling=tiling, segmentation=SegmentationConfig(method="hsv"), masks=masks)


def tia_open(a: argparse.Namespace):
    """``WSIReader.open``; where that falls back to a flat in-memory image (``VirtualWSIReader``: it does for a
    generic pyramidal TIFF, which its TIFF reader rejects before OpenSlide is tried), TIAToolbox's OpenSlide reader."""
    import openslide
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, VirtualWSIReader, WSIReader

    wsi = WSIReader.open(a.slide, mpp=(a.mpp0, a.mpp0))
    if isinstance(wsi, VirtualWSIReader) and openslide.OpenSlide.detect_format(a.slide):
        wsi = OpenSlideWSIReader(a.slide, mpp=(a.mpp0, a.mpp0))
    return wsi


def tia_tiling(a: argparse.Namespace):
    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor

    wsi = tia_open(a)
    return SlidingWindowPatchExtractor(wsi, (a.tile, a.tile), stride=(a.tile, a.tile), resolution=a.mpp, units="mpp",
                                       input_mask="otsu", min_mask_ratio=a.min_tissue)


def _import(peer: str) -> None:
    """Import the peer's modules before any timing (TIAToolbox imports lazily: seconds on first use)."""
    mods = ("hs2p", "hs2p.wsi.streaming.stream") if peer == "hs2p" else \
        ("tiatoolbox.tools.patchextraction", "tiatoolbox.wsicore.wsireader")
    for m in mods:
        importlib.import_module(m)


def tile(a: argparse.Namespace) -> dict:
    _import(a.peer)
    base, t = _rss_mb(), time.perf_counter()
    n = len(hs2p_tiling(a).x) if a.peer == "hs2p" else len(tia_tiling(a))
    return {"seconds": time.perf_counter() - t, "tiles": n, "peak_rss_mb": _rss_mb(), "import_rss_mb": base,
            "reader": _reader_name(a)}


_CTX: dict = {}  # set before forking: the hs2p tiling result, the arguments


def _read(coords: np.ndarray) -> tuple[int, dict, float]:
    """Read every tile of ``coords``; returns (tiles read, {(x, y): tile} for the checked ones, peak RSS MB)."""
    a, want, keep, n = _CTX["args"], _CTX["want"], {}, 0
    if a.peer == "hs2p":
        from hs2p.wsi.streaming.stream import iter_tile_records_from_result

        res = _CTX["result"]
        res = dataclasses.replace(res, tiles=dataclasses.replace(
            res.tiles, x=coords[:, 0].copy(), y=coords[:, 1].copy(), tissue_fractions=np.ones(len(coords)),
            tile_index=None))
        for rec in iter_tile_records_from_result(result=res):
            px = np.asarray(rec.tile_arr)
            n += 1
            if (rec.x, rec.y) in want:
                keep[(rec.x, rec.y)] = px.copy()
    else:
        wsi = tia_open(a)
        for x, y in coords.tolist():
            px = np.asarray(wsi.read_rect((x, y), (a.tile, a.tile), resolution=a.level, units="level"))
            n += 1
            if (x, y) in want:
                keep[(x, y)] = px
    for px in keep.values():
        assert px.dtype == np.uint8 and px.shape == (a.tile, a.tile, 3), (px.dtype, px.shape)
    return n, keep, _rss_mb()


def read(a: argparse.Namespace) -> dict:
    import openslide

    coords = np.load(a.coords).astype(np.int64)
    o = openslide.OpenSlide(a.slide)
    ds = o.level_downsamples[a.level]
    w, h = o.level_dimensions[0]
    span = a.tile * ds
    inner = [i for i, (x, y) in enumerate(coords.tolist()) if x + span < w and y + span < h]
    picks = [inner[int(i)] for i in np.linspace(0, len(inner) - 1, min(CHECK, len(inner)))] if inner else []
    _CTX.update(args=a, want={tuple(coords[i].tolist()) for i in picks})
    if a.peer == "hs2p":
        # not timed: the stream reads from a tiling result, made in a spawned process because libvips
        # is not fork-safe once it has run (forked workers would hang)
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            res = ex.submit(hs2p_tiling, a).result()
        if int(res.read_level) != a.level or int(res.read_tile_size_px) != a.tile:
            raise RuntimeError(f"hs2p reads {res.read_tile_size_px} px at level {res.read_level}, "
                               f"not {a.tile} px at level {a.level}")
        _CTX["result"] = dataclasses.replace(res, step_px_lv0=int(round(span)))
    _import(a.peer)
    base, t0, c0 = _rss_mb(), time.perf_counter(), os.times()
    if a.procs == 1:
        parts = [_read(coords)]
    else:
        with mp.get_context("fork").Pool(a.procs) as pool:
            parts = pool.map(_read, np.array_split(coords, a.procs))
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = sum(c1[i] - c0[i] for i in range(4))
    n = sum(p[0] for p in parts)
    if n != len(coords):
        raise RuntimeError(f"{a.peer} returned {n} tiles for {len(coords)} coordinates")
    diff = 0
    for part in parts:
        for (x, y), px in part[1].items():
            ref = np.asarray(o.read_region((x, y), a.level, (a.tile, a.tile)).convert("RGB"))
            diff = max(diff, int(np.abs(px.astype(np.int16) - ref).max()))
    rss = _rss_mb() + (max(p[2] for p in parts) if a.procs > 1 else 0)  # this process + its largest worker
    return {"tiles_per_s": n / wall, "cpu_s": cpu, "wall_s": wall, "tiles": n, "peak_rss_mb": rss,
            "import_rss_mb": base, "max_abs_diff": diff, "checked": sum(len(p[1]) for p in parts), "reader": _reader_name(a)}


def _reader_name(a: argparse.Namespace) -> str:
    return "VIPSReader" if a.peer == "hs2p" else type(tia_open(a)).__name__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("tile", "read"))
    ap.add_argument("peer", choices=("hs2p", "tiatoolbox"))
    ap.add_argument("slide")
    ap.add_argument("--coords")
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--mpp0", type=float, required=True, help="level-0 µm/px (gigaslide's reading)")
    ap.add_argument("--min-tissue", type=float, default=0.25)
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--procs", type=int, default=1)
    a = ap.parse_args()
    out = tile(a) if a.mode == "tile" else read(a)
    print("PEER_JSON " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())

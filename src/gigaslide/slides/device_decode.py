"""Tiles decoded and cut on a torch device: the stored JPEG tiles of a TIFF/SVS level decoded in batches
(nvJPEG on CUDA, through ``torchvision.io.decode_jpeg``), for ``gigaslide encode --decode-device cuda`` on
machines with few CPU cores per GPU.

:class:`DeviceTileReader` reads what :class:`~gigaslide.slides.reader.TileReader` reads, as a uint8
``[B, T, T, 3]`` tensor on the device: per batch, the stored tiles under its tiles that are not cached yet are
decoded in one call (:meth:`~gigaslide.slides.tiled.TiffLevel.jpeg_stream` makes each a self-contained JPEG),
laid on a canvas of the background (white, black for a dark one; clipped to the level, as the CPU reader
clips), and every tile is gathered from the canvas in one indexing operation; the /2, /4, /8 cases are
box-averaged on the device with PIL's rounding.
Tiles the direct path cannot cut (a sub-pixel offset on a level with a non-integer downsample) and slides
that are not JPEG-tiled TIFFs are read by the CPU reader and copied over. At open, a check batch is read both
ways; if the device's pixels differ from the CPU reader's by more than 2 per channel (a decoder that ignores
the colour-transform marker, say), every tile goes through the CPU reader (``on_device`` False).
Whether this pays is measured, not assumed: ``benchmarks/gpu_check.sh``'s encode section times it against
the CPU reader processes on a lent GPU.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch

from gigaslide.slides.reader import CHECK_MAX_DIFF, TileReader
from gigaslide.slides.slide import SCALE_TOLERANCE, Slide
from gigaslide.slides.tiled import split_offset

#: Largest canvas (bytes) one gather reads from; a batch whose tiles span more is read in parts.
MAX_CANVAS_BYTES = 256 * 2**20
#: Decoded stored tiles kept on the device between batches (the rows a batch shares with the next).
CACHE_TILES = 1024


def _decode_jpeg():  # noqa: ANN202
    """torchvision's batch JPEG decoder (deprecated since torchvision 0.29 for TorchCodec's, not in the pinned set)."""
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
    from torchvision.io import decode_jpeg

    return decode_jpeg


class DeviceTileReader:
    """``tile_size`` tiles at ``mpp`` (level-0 top-left corners) as uint8 ``[B, T, T, 3]`` on ``device``."""

    def __init__(self, slide: Slide, tile_size: int, mpp: float, device: str | torch.device, *,
                 tolerance: float = SCALE_TOLERANCE, cache_tiles: int = CACHE_TILES,
                 background: str | None = "bright"):
        self.cpu = TileReader(slide, tile_size, mpp, tolerance=tolerance, background=background)
        self.device = torch.device(device)
        self.tile_size, self.factor = int(tile_size), self.cpu.factor
        self._level = self.cpu.tiff_level
        self._cache: OrderedDict[int, torch.Tensor | None] = OrderedDict()
        self.cache_tiles = max(16, int(cache_tiles))
        self.decoded = 0  # stored tiles decoded on the device
        self.cpu_tiles = 0  # tiles read by the CPU reader (sub-pixel offsets, or everything when not on_device)
        self.on_device = self._level is not None and self._level.is_jpeg
        if self.on_device:
            self._decode = _decode_jpeg()
            try:
                self.on_device = self._check()
            except RuntimeError:  # the device decoder refuses these streams: the CPU reader reads the slide
                self.on_device = False

    @property
    def direct(self) -> bool:
        return self.cpu.direct

    def read_mpp(self) -> float:
        return self.cpu.read_mpp()

    def _check(self) -> bool:
        W, H = self.cpu.slide.dimensions
        n0 = int(self.tile_size * self.cpu.level.level_downsample * self.factor)
        coords = np.array([[W // 2, H // 2], [0, 0], [max(0, W - n0 // 2), max(0, H - n0 // 3)]])
        mine = self._read_on_device(coords).cpu().numpy()
        ref = self.cpu.read_batch(coords)
        self._cache.clear()
        self.decoded = self.cpu_tiles = 0
        return int(np.abs(mine.astype(np.int16) - ref).max()) <= CHECK_MAX_DIFF

    def _stored(self, indices: list[int]) -> None:
        """Decode the stored tiles of ``indices`` that are not cached, in one batch."""
        lv = self._level
        missing = [i for i in indices if i not in self._cache]
        for i in indices:
            if i in self._cache:
                self._cache.move_to_end(i)
        streams = [(i, lv.jpeg_stream(i)) for i in missing]
        data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for _, s in streams if s is not None]
        if data and self.device.type == "cuda":
            # nvJPEG's hardware path can write its outputs before work already queued on the caller's stream has
            # run, into blocks the caching allocator recycled from tensors that work still reads (pytorch/vision
            # #9606, meta-pytorch/torchcodec #1634): let the queued work finish first
            torch.cuda.current_stream(self.device).synchronize()
        decoded = iter(self._decode(data, device=self.device) if data else [])
        for i, s in streams:
            self._cache[i] = None if s is None else next(decoded).permute(1, 2, 0)  # None: a sparse tile (glass)
        self.decoded += len(data)
        while len(self._cache) > max(self.cache_tiles, len(indices)):
            self._cache.popitem(last=False)

    def _gather(self, corners: list[tuple[int, int]]) -> torch.Tensor:
        """Level pixels ``[B, n, n, 3]`` (n = tile_size x factor) at integer level corners, the CPU reader's fill
        (white, or black on a dark background) outside."""
        lv, n = self._level, self.tile_size * self.factor
        inside = [(x, y) for x, y in corners if x < lv.width and y < lv.height and x + n > 0 and y + n > 0]
        out = torch.full((len(corners), n, n, 3), self.cpu.fill, dtype=torch.uint8, device=self.device)
        if not inside:
            return out
        tx0 = max(0, min(x for x, _ in inside)) // lv.tile_w
        ty0 = max(0, min(y for _, y in inside)) // lv.tile_h
        tx1 = (min(lv.width, max(x for x, _ in inside) + n) - 1) // lv.tile_w
        ty1 = (min(lv.height, max(y for _, y in inside) + n) - 1) // lv.tile_h
        ch, cw = (ty1 - ty0 + 1) * lv.tile_h + 2 * n, (tx1 - tx0 + 1) * lv.tile_w + 2 * n
        if ch * cw * 3 > MAX_CANVAS_BYTES and len(corners) > 1:  # tiles far apart: two smaller canvases
            h = len(corners) // 2
            return torch.cat([self._gather(corners[:h]), self._gather(corners[h:])])
        need = sorted({t for x, y in inside for t in lv.tiles_under(x, y, x + n, y + n)})  # (index, x, y)
        self._stored([i for i, _, _ in need])
        canvas = torch.full((ch, cw, 3), self.cpu.fill, dtype=torch.uint8, device=self.device)
        ox, oy = tx0 * lv.tile_w - n, ty0 * lv.tile_h - n  # level coordinate of the canvas' corner
        for i, bx, by in need:
            t = self._cache[i]
            if t is None:  # a sparse tile: the canvas' fill
                continue
            w, h = min(lv.tile_w, lv.width - bx), min(lv.tile_h, lv.height - by)  # edge tiles are padded: clip
            canvas[by - oy:by - oy + h, bx - ox:bx - ox + w] = t[:h, :w]
        inside_set = set(inside)
        keep = [k for k, c in enumerate(corners) if c in inside_set]
        xs = torch.tensor([corners[k][0] - ox for k in keep], device=self.device)
        ys = torch.tensor([corners[k][1] - oy for k in keep], device=self.device)
        ar = torch.arange(n, device=self.device)
        # an overhang lies within n of the stored tiles (filled border); one past it is clamped onto the fill
        rows, cols = (ys[:, None] + ar).clamp_(0, ch - 1), (xs[:, None] + ar).clamp_(0, cw - 1)
        out[keep] = canvas[rows[:, :, None], cols[:, None, :]]
        return out

    def _reduce(self, px: torch.Tensor) -> torch.Tensor:
        """``factor`` x ``factor`` box averages, rounded as PIL's ``reduce`` (what the CPU reader uses)."""
        k = self.factor
        if k == 1:
            return px
        b, n = px.shape[0], self.tile_size
        s = px.view(b, n, k, n, k, 3).sum((2, 4), dtype=torch.int32)
        return ((s + k * k // 2) // (k * k)).to(torch.uint8)

    def read_batch(self, coords: np.ndarray) -> torch.Tensor:
        """Tiles of ``coords`` [N, 2] (level-0 px), in order: uint8 ``[N, T, T, 3]`` on the device."""
        coords = np.asarray(coords).reshape(-1, 2)
        if self.on_device:
            try:
                return self._read_on_device(coords)
            except RuntimeError:  # a stream the device decoder refuses (nvJPEG's errors are RuntimeErrors)
                self.on_device = False  # the rest of the slide, and this batch, through the CPU reader
                self._cache.clear()
        self.cpu_tiles += len(coords)
        px = torch.from_numpy(self.cpu.read_batch(coords))
        return px.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else px

    def _read_on_device(self, coords: np.ndarray) -> torch.Tensor:
        ts = self.tile_size
        ds = self.cpu.level.level_downsample
        whole, shifted = [], []  # (position, level corner); positions read by the CPU reader
        for k, (x, y) in enumerate(coords.tolist()):
            (ix, wx), (iy, wy) = split_offset(x / ds), split_offset(y / ds)
            if wx == 0 and wy == 0:
                whole.append((k, (ix, iy)))
            else:
                shifted.append(k)
        out = torch.empty((len(coords), ts, ts, 3), dtype=torch.uint8, device=self.device)
        if whole:
            pos = torch.tensor([k for k, _ in whole], device=self.device)
            out[pos] = self._reduce(self._gather([c for _, c in whole]))
        if shifted:
            self.cpu_tiles += len(shifted)
            out[torch.tensor(shifted, device=self.device)] = torch.from_numpy(
                self.cpu.read_batch(coords[shifted])).to(self.device)
        return out

    def close(self) -> None:
        self._cache.clear()
        self.cpu.close()

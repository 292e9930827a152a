"""Whole-slide canvases for streaming training, and whole-image augmentation.

A slide is read at ``mpp`` over the bounding box of its tissue (from :func:`segment_tissue`); a box
larger than ``image_size`` is centre-cropped to it; the canvas is padded with the slide's background on the
right/bottom to a multiple of the trunk's stride so feature-map positions map to fixed level-0
boxes: white glass (:data:`GLASS`), black on a dark-background (fluorescence) slide, whose pixels outside the slide
are read black too, as ``encode`` reads them. Canvases are uint8 ``[3, H, W]`` (4 x smaller than float) and cached
as ``.npy``; the cache records the fill (``edge_fill``), and a dark slide's canvas cached before it was padded
black is read again. ``background`` (``--background``: ``auto``, detected from the thumbnail, ``bright`` or ``dark``)
forces the background of tissue detection and of the fill; a canvas cached with another value (the cache's
``background_option``; none: ``auto``) is read again.

Memory: a training step holds the canvas once. :meth:`Canvas.pixels` reads the cached ``.npy`` into
one array (a plain read, not a memory map whose touched pages would count in the process's RSS on
top of the copy); whole-image augmentation (flips, rot90) is applied *per crop* by
:class:`AugmentedImage`, never to a second full-size copy; the light stain jitter is a per-image affine
colour change applied crop by crop in the streamer's ``transform`` together with the encoder's own
normalisation (:class:`Normalize`, mean/std from the encoder spec). All of it is exact under streaming.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gigaslide import atomic
from gigaslide.slides.slide import fill_value

GLASS = 245  # padding value on bright-field slides (white glass, as background)


@dataclass
class Canvas:
    """A slide region read at ``mpp``; ``origin`` is its top-left in level-0 px."""

    slide_id: str
    array: np.ndarray | None  # uint8 [3, H, W] in memory; None: held by the cache file ``path`` (see :attr:`image`)
    origin: tuple[int, int]
    mpp: float
    slide_mpp: float
    content_size: tuple[int, int]  # (h, w) before padding
    path: Path | None = None  # the cached .npy, when the canvas comes from the cache
    read_mpp: float | None = None  # the pixels' own µm/px (:meth:`Slide.read_mpp`, within 1 % of ``mpp``); None: mpp
    background: str = "bright"  # the slide's (tissue detection's): ``dark`` pads black, outside the slide and after
    tissue: bool = True  # tissue was found; False: none (a blank slide), the canvas is the whole slide's box

    def pixels(self) -> torch.Tensor:
        """The canvas as a uint8 tensor [3, H, W], held once: read from the cache file (no memory map), or
        the in-memory array itself (no copy)."""
        if self.path is not None:
            return torch.from_numpy(np.load(self.path))
        arr = self.image if self.image.flags.writeable else np.array(self.image)
        return torch.from_numpy(np.ascontiguousarray(arr))

    tensor = pixels  # older name

    @property
    def image(self) -> np.ndarray:
        """uint8 [3, H, W]: the array in memory, or the cache file memory-mapped anew at each use. (A memory map
        holds a file descriptor while it lives: a cohort's canvases each keeping theirs open ran a run out of
        descriptors -- 'Too many open files' from about 1000 slides on with the common ``ulimit -n 1024``.)"""
        if self.array is None:
            return np.load(self.path, mmap_mode="r")  # type: ignore[arg-type]
        return self.array

    @image.setter
    def image(self, value: np.ndarray | None) -> None:
        self.array = value

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the padded canvas."""
        shape = self.image.shape
        return int(shape[1]), int(shape[2])

    @property
    def level0_per_px(self) -> float:
        """Level-0 px per canvas px: from the resolution the pixels were read at, which differs from ``mpp`` where
        the slide's level is read at a whole multiple and box-averaged (a 0.504 µm/px scan read 1:1 for 0.5 µm/px:
        scaling by ``mpp`` would place a position 0.8 % of its distance from the origin too close to it)."""
        return (self.read_mpp or self.mpp) / self.slide_mpp

    def position_coords(self, fmap_hw: tuple[int, int], stride: int) -> np.ndarray:
        """Level-0 top-left (x, y) of every feature-map position (row-major), as int64 [h*w, 2]."""
        h, w = fmap_hw
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        step = stride * self.level0_per_px
        x = self.origin[0] + xs.ravel() * step
        y = self.origin[1] + ys.ravel() * step
        return np.stack([x, y], 1).round().astype(np.int64)


def tissue_box(slide, pad_frac: float = 0.02, background: str = "auto") -> tuple[int, int, int, int]:  # noqa: ANN001
    """Level-0 (x0, y0, x1, y1) of the slide's tissue (the whole slide if none is found)."""
    return _tissue_box(slide, pad_frac, background)[0]


def _tissue_box(slide, pad_frac: float = 0.02,  # noqa: ANN001
                background: str = "auto") -> tuple[tuple[int, int, int, int], str, bool]:
    """(:func:`tissue_box`, the slide's background as tissue detection used it: ``bright`` or ``dark``; ``background``
    ``auto`` detects it; whether any tissue was found)."""
    from gigaslide.tiling import segment_tissue

    tm, _ = segment_tissue(slide, background=background)
    bg = tm.info["background"]
    W, H = slide.dimensions
    if not tm.mask.any():
        return (0, 0, W, H), bg, False
    rows = np.flatnonzero(tm.mask.any(1))
    cols = np.flatnonzero(tm.mask.any(0))
    d = tm.downsample
    pad = pad_frac * max(W, H)
    x0, x1 = max(0, cols[0] * d - pad), min(W, (cols[-1] + 1) * d + pad)
    y0, y1 = max(0, rows[0] * d - pad), min(H, (rows[-1] + 1) * d + pad)
    return (int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))), bg, True


def read_canvas(path: str | os.PathLike, mpp: float, image_size: int, multiple: int, *, slide_mpp: float | None = None,
                background: str = "auto") -> Canvas:
    """Read the tissue box of slide ``path`` at ``mpp`` (at most ``image_size`` px a side), padded to ``multiple``
    with the slide's background (``background``: ``auto`` detects it; see the module docstring)."""
    from gigaslide.slides import open_slide
    from gigaslide.tiling.tissue import check_background

    check_background(background)
    with open_slide(path, mpp=slide_mpp) as slide:
        slide.check_target_mpp(mpp)
        (x0, y0, x1, y1), bg, found = _tissue_box(slide, background=background)
        scale = slide.mpp / mpp  # target px per level-0 px
        w, h = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
        if w > image_size:  # centre-crop the tissue box to image_size
            x0 += int(round((w - image_size) / 2 / scale))
            w = image_size
        if h > image_size:
            y0 += int(round((h - image_size) / 2 / scale))
            h = image_size
        level = slide.choose_level(mpp)
        rgb = slide.read_region((x0, y0), (w, h), mpp, level=level, background=bg)
        sid, smpp, rmpp = slide.id, slide.mpp, slide.read_mpp(mpp, level=level)
    ph, pw = _round_up(h, multiple), _round_up(w, multiple)
    img = np.full((3, ph, pw), fill_value(bg) if bg == "dark" else GLASS, np.uint8)
    img[:, :h, :w] = rgb.transpose(2, 0, 1)
    return Canvas(sid, img, (x0, y0), float(mpp), float(smpp), (h, w), read_mpp=float(rmpp), background=bg,
                  tissue=found)


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def cached_canvas(path: str | os.PathLike, cache_dir: str | os.PathLike, mpp: float, image_size: int, multiple: int,
                  *, slide_mpp: float | None = None, background: str = "auto") -> Canvas:
    """:func:`read_canvas`, cached as ``<cache>/<slide_id>.npy`` + ``.json`` (atomic; keyed by mpp/size/multiple and
    the slide's scan: a cache read at another level-0 mpp -- a new ``slide_mpp`` -- or from another file under the
    same name (other dimensions, or another file of the same size: its identity, ``slide_identity``) is read again; so is a
    dark-background slide's canvas cached before it was padded black: one without ``edge_fill``; and one cached with
    another ``background`` option: ``background_option``).

    The returned image is memory-mapped from the cache when used, so a training set of large canvases does not
    have to fit in RAM (one slide is copied in per step), nor hold a file descriptor per slide."""
    from gigaslide.slides import slide_id_from_path
    from gigaslide.tiling import IDENTITY_KEY, Scan
    from gigaslide.tiling.tissue import check_background

    check_background(background)
    sid = slide_id_from_path(Path(path))
    npy, meta = Path(cache_dir) / f"{sid}.npy", Path(cache_dir) / f"{sid}.json"
    key = {"mpp": float(mpp), "image_size": int(image_size), "multiple": int(multiple)}
    scan = Scan.read(path, slide_mpp)  # None: unreadable (read_canvas says why)
    if npy.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        if (all(m.get(k) == v for k, v in key.items()) and scan is not None
                and scan.made(m.get("slide_mpp"), m.get("slide_dimensions"), m.get(IDENTITY_KEY),
                              written=meta.stat().st_mtime)  # the same file (an older cache: unchanged since)
                and m.get("background_option", "auto") == background and _edge_fill_ok(m, path, slide_mpp)
                and _readable(npy)):
            return Canvas(m["slide_id"], None, tuple(m["origin"]), m["mpp"], m["slide_mpp"],
                          tuple(m["content_size"]), npy, m.get("read_mpp"), m.get("background", "bright"),
                          bool(m.get("tissue", True)))
    c = read_canvas(path, mpp, image_size, multiple, slide_mpp=slide_mpp, background=background)
    with atomic.atomic_path(npy, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(_Writes(f), c.image)  # a full disk: the file's own OSError (ENOSPC), one line naming the cache file
    atomic.write_json(meta, {**key, "slide_id": c.slide_id, "origin": list(c.origin), "mpp": c.mpp, "slide_mpp": c.slide_mpp,
                             "content_size": list(c.content_size), "read_mpp": c.read_mpp,
                             "slide_dimensions": list(scan.dimensions) if scan is not None else None,
                             "background": c.background, "edge_fill": c.background, "background_option": background,
                             "tissue": c.tissue,
                             IDENTITY_KEY: scan.identity if scan is not None else None})
    c.array, c.path = None, npy  # memory-mapped from the cache when used (:attr:`Canvas.image`): no descriptor held
    return c


def _readable(npy: Path) -> bool:
    """The cached canvas opens whole (uint8 [3, H, W] of its full size): a truncated or damaged file (a disk fault, a
    half copy) is read again -- it was a ValueError traceback ('mmap length is greater than file size')."""
    try:
        a = np.load(npy, mmap_mode="r")  # the header and the file's size only; closed when dropped
    except (OSError, ValueError):
        return False
    return a.dtype == np.uint8 and a.ndim == 3 and a.shape[0] == 3


class _Writes:
    """Only ``write`` of a file: :func:`numpy.save` then writes the array in buffered chunks through it, so a full disk
    raises the file's ``OSError`` (ENOSPC) -- into a real file numpy writes with ``tofile``, whose short write on a
    full disk is an ``OSError`` without an errno ('36864 requested and 36736 written'): a traceback."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self.write = f.write


def _edge_fill_ok(meta: dict, path: str | os.PathLike, slide_mpp: float | None) -> bool:
    """A cached canvas padded as :func:`read_canvas` pads it now: one that records its ``edge_fill``, or one cached
    before it was recorded on a slide whose background is not dark (those were padded white glass, as now)."""
    from gigaslide.tiling.tissue import slide_background

    # a slide that cannot be opened (None) is read again, which reports what is wrong with it
    return "edge_fill" in meta or slide_background(path, slide_mpp) == "bright"


@dataclass(frozen=True)
class Augment:
    """One draw of whole-image augmentation."""

    flip: bool = False
    rot90: int = 0
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @staticmethod
    def draw(rng: np.random.Generator, stain: float = 0.05) -> Augment:
        return Augment(bool(rng.random() < 0.5), int(rng.integers(4)),
                       tuple(float(v) for v in 1 + rng.uniform(-stain, stain, 3)),  # type: ignore[arg-type]
                       tuple(float(v) for v in rng.uniform(-stain, stain, 3) * 255 * 0.5))  # type: ignore[arg-type]

    def geometric(self, image: torch.Tensor) -> torch.Tensor:
        """Flip / rotate a whole [.., H, W] tensor (a copy; training uses :class:`AugmentedImage` instead)."""
        x = image.flip(-1) if self.flip else image
        return torch.rot90(x, self.rot90, dims=(-2, -1)).contiguous() if self.rot90 else x.contiguous()

    def shape(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an image of ``hw`` after the augmentation."""
        return (hw[1], hw[0]) if self.rot90 % 2 else hw

    def source_box(self, hw: tuple[int, int], rows: slice, cols: slice) -> tuple[slice, slice]:
        """The box of the *original* image (of ``hw``) that holds the augmented image's ``[rows, cols]``:
        ``geometric(x)[..., rows, cols] == geometric(x[..., box])``."""
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        h, w = hw
        shapes = [(h, w)]
        for _ in range(self.rot90 % 4):
            shapes.append((shapes[-1][1], shapes[-1][0]))
        for k in range(self.rot90 % 4, 0, -1):  # undo each rot90: out[i, j] = z[j, W_z - 1 - i]
            wz = shapes[k - 1][1]
            r0, r1, c0, c1 = c0, c1, wz - r1, wz - r0
        if self.flip:
            r0, r1, c0, c1 = r0, r1, w - c1, w - c0
        return slice(r0, r1), slice(c0, c1)


class AugmentedImage:
    """A crop source (see :mod:`gigaslide.streaming.stream`): the geometric augmentation of ``image``
    ([B, C, H, W] or [C, H, W]), made crop by crop so the image is held once."""

    def __init__(self, image: torch.Tensor, aug: Augment | None = None):
        self.image = image if image.dim() == 4 else image[None]
        self.aug = aug or Augment()
        h, w = self.aug.shape((int(self.image.shape[-2]), int(self.image.shape[-1])))
        self.shape = (*self.image.shape[:2], h, w)

    def crop(self, rows: slice, cols: slice) -> torch.Tensor:
        r, c = self.aug.source_box(tuple(self.image.shape[-2:]), rows, cols)
        return self.aug.geometric(self.image[..., r, c])


class Normalize:
    """uint8 crop -> float: light stain jitter (per-channel gain/bias), then the encoder's normalisation
    (``mean``/``std`` in [0, 1] units, from its :class:`~gigaslide.encoders.EncoderSpec`). Pixel-wise."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float], aug: Augment | None = None,
                 dtype: torch.dtype = torch.float32):
        a = aug or Augment()
        self.gain = torch.tensor(a.gain).view(1, 3, 1, 1)
        self.bias = torch.tensor(a.bias).view(1, 3, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.dtype = dtype

    def __call__(self, crop: torch.Tensor) -> torch.Tensor:
        dev = crop.device
        x = crop.float() * self.gain.to(dev) + self.bias.to(dev)
        x = (x.clamp(0, 255) - self.mean.to(dev)) / self.std.to(dev)
        return x.to(self.dtype)

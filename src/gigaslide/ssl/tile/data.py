"""Unlabelled tiles for SSL: an image folder, or random tissue tiles read straight from slides.

A *source* returns one RGB uint8 tile for an index and a generator; :class:`ViewDataset` turns it
into augmented views. :class:`StepSampler` draws each step's batch from ``(seed, step)`` alone, so
a resumed run sees exactly the batches it would have seen and workers need no shared state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from gigaslide.errors import GigaslideError
from gigaslide.locks import socket_safe_tempdir
from gigaslide.slides.discover import walk_files
from gigaslide.tiling.folders import IMAGE_EXTENSIONS, list_images, read_image  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


class ImageFolderSource:
    """Every image under a folder (recursive). Unreadable files are skipped (logged once each)."""

    def __init__(self, folder: str | os.PathLike, tile_size: int | None = None):
        self.folder = Path(folder)
        self.files = list_images(folder)
        self.tile_size = tile_size
        self._bad: set[int] = set()
        # fail fast on an obviously broken folder: the first readable of its first images (an unreadable first
        # file is skipped, as every other one is, not the end of the run)
        first = self.load(0, torch.Generator())
        i = next(i for i in range(len(self.files)) if i not in self._bad)
        h, w = first.shape[:2]
        if tile_size and (h, w) != (tile_size, tile_size):  # e.g. PCam's 96 px tiles under the default 224
            log.warning("tiles in %s are %dx%d px (the first, %s) but --tile-size is %d: training crops resample them "
                        "and the exported encoder embeds at %d px; give --tile-size %d to train and embed at the "
                        "tiles' own size", self.folder, w, h, self.files[i].name, tile_size, tile_size, max(h, w))

    def __len__(self) -> int:
        return len(self.files)

    def load(self, idx: int, g: torch.Generator) -> np.ndarray:
        first = None
        for k in range(min(20, len(self.files))):
            i = (idx + k) % len(self.files)
            if i in self._bad:
                continue
            try:
                return read_image(self.files[i])
            except GigaslideError as e:
                self._bad.add(i)
                first = first or e
                log.warning("skipping %s", e.one_line())
        why = f" (the first: {Path(first.path or '').name}: {first.what})" if first is not None else ""
        raise GigaslideError(f"too many unreadable images in a row{why}", path=self.folder,
                             fix="delete or re-export the unreadable files")

    def describe(self) -> dict:
        return {"kind": "image_folder", "path": str(self.folder), "n_images": len(self.files)}


class SlideSource:
    """Random tissue tiles across slides and magnifications, read on the fly (no JPEG dump).

    At construction each slide is segmented once (thumbnail) and its tissue grid at every ``mpp``
    is kept as level-0 coordinates; slides are re-opened lazily in each worker. An index picks a
    grid cell; the tile is shifted by a random offset of up to half a tile so crops vary across epochs.
    What a tile at the slide's edge reads outside the slide is the slide's background, as tissue detection found it
    (white glass; black on a dark-background, fluorescence slide, as ``encode`` reads it); ``background`` (``auto``:
    detected from each slide's thumbnail) forces it, ``bright`` or ``dark``, as ``tile --background``.
    """

    def __init__(self, slides: Sequence[str | os.PathLike], mpps: Sequence[float], tile_size: int,
                 min_tissue: float = 0.5, slide_mpp: float | None = None, background: str = "auto"):
        from gigaslide.slides import open_slide
        from gigaslide.tiling import make_grid, segment_tissue
        from gigaslide.tiling.tissue import check_background

        check_background(background)
        self.paths = [str(p) for p in slides]
        self.mpps = [float(m) for m in mpps]
        self.tile_size = int(tile_size)
        self.slide_mpp = slide_mpp
        entries = []  # (slide index, mpp index, x0, y0)
        self.skipped: list[str] = []
        self.backgrounds: list[str] = ["bright"] * len(self.paths)  # per slide: what outside the slide reads as
        for si, p in enumerate(self.paths):
            try:
                with open_slide(p, mpp=slide_mpp) as s:
                    tissue, _ = segment_tissue(s, background=background)
                    self.backgrounds[si] = tissue.info["background"]
                    for mi, m in enumerate(self.mpps):
                        grid = make_grid(s, tissue, target_mpp=m, tile_size=self.tile_size, min_tissue=min_tissue)
                        for x, y in grid.coords:
                            entries.append((si, mi, int(x), int(y)))
            except GigaslideError as e:
                self.skipped.append(e.one_line())
                log.warning("skipping slide: %s", e.one_line())
        if not entries:
            why = f" ({self.skipped[0]})" if self.skipped else ""
            raise GigaslideError(f"no tissue tiles at {self.mpps} µm/px in {len(self.paths)} slide(s){why}",
                                 fix="check the slides, lower --min-tissue, or use a smaller --tile-size / finer --mpp")
        self.entries = np.asarray(entries, dtype=np.int64)
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _slide(self, si: int):  # noqa: ANN202
        from gigaslide.slides import open_slide

        if si not in self._open:
            self._open[si] = open_slide(self.paths[si], mpp=self.slide_mpp)
        return self._open[si]

    def load(self, idx: int, g: torch.Generator) -> np.ndarray:
        si, mi, x, y = (int(v) for v in self.entries[idx % len(self.entries)])
        s = self._slide(si)
        m = self.mpps[mi]
        tile0 = self.tile_size * m / s.mpp
        W, H = s.dimensions
        dx, dy = ((torch.rand(2, generator=g) - 0.5) * tile0).tolist()
        x = int(min(max(0, x + dx), max(0, W - tile0)))
        y = int(min(max(0, y + dy), max(0, H - tile0)))
        return s.read_region((x, y), (self.tile_size, self.tile_size), m, background=self.backgrounds[si])

    def __getstate__(self) -> dict:  # open handles stay in their process
        d = dict(self.__dict__)
        d["_open"] = {}
        return d

    def describe(self) -> dict:
        return {"kind": "slides", "n_slides": len(self.paths), "mpps": self.mpps, "n_tiles": len(self),
                "skipped": self.skipped}


def looks_like_slide(path: str | os.PathLike) -> bool:
    """A whole-slide format, or a TIFF that is pyramidal or larger than 8k px (not a tile)."""
    from gigaslide.slides.discover import WSI_EXTENSIONS

    p = Path(path)
    name = p.name.lower()
    if not name.endswith(WSI_EXTENSIONS) or name.startswith("."):
        return False
    if p.suffix.lower() not in (".tif", ".tiff"):
        return True
    try:
        import tifffile

        with tifffile.TiffFile(p) as t:
            s = t.series[0]
            return len(s.levels) > 1 or max(s.shape[:2]) > 8192
    except Exception:  # noqa: BLE001 - unreadable: let the tile reader report it
        return False


def build_source(data: str | os.PathLike, mpps: Sequence[float], tile_size: int, min_tissue: float = 0.5,
                 kind: str = "auto", slide_mpp: float | str | None = None, background: str = "auto"):  # noqa: ANN201
    """Slides (a slide file or a folder of slides) -> :class:`SlideSource`; tiles -> :class:`ImageFolderSource`.

    ``kind``: ``auto`` (slides when the folder holds whole-slide files), ``slides`` or ``tiles``. ``slide_mpp``: the
    level-0 µm/px of slides whose files do not say (a number, or a CSV ``slide_id,mpp``), as ``--slide-mpp`` elsewhere;
    ``background``: the slides' (``auto``, ``bright`` or ``dark``), as ``--background`` elsewhere.
    """
    p = Path(data)
    if not p.exists():
        raise GigaslideError("--data not found", path=p, fix="pass a folder of tiles or of slides (or a slide file)")
    if kind not in ("auto", "slides", "tiles"):
        raise GigaslideError(f"unknown data kind '{kind}'", fix="use auto, slides or tiles")
    if p.is_file():
        return SlideSource([p], mpps, tile_size, min_tissue, slide_mpp, background)
    if kind == "tiles":
        return ImageFolderSource(p, tile_size)
    slides = [f for f in walk_files(p) if looks_like_slide(f)]  # symlinked sub-folders too (a cohort linked in)
    if slides or kind == "slides":
        if not slides:
            raise GigaslideError("no slide files in this folder", path=p, fix="pass a folder of slides or use --data-kind tiles")
        return SlideSource(slides, mpps, tile_size, min_tissue, slide_mpp, background)
    return ImageFolderSource(p, tile_size)


class ViewDataset(torch.utils.data.Dataset):
    """``dataset[(index, sample_seed)] -> list of views`` (float [3, h, w] each)."""

    def __init__(self, source, views, tile_size: int):  # noqa: ANN001
        self.source = source
        self.views = views
        self.tile_size = tile_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        idx, sample_seed = key
        g = torch.Generator().manual_seed(int(sample_seed))
        rgb = torch.from_numpy(np.array(self.source.load(int(idx), g), dtype=np.uint8, copy=True))
        return self.views(rgb, g)


class StepSampler(torch.utils.data.Sampler):
    """Yields, for steps ``start_step, start_step+1, ...``, a batch of ``(index, sample_seed)``.

    Indices run through a fresh permutation per epoch (drawn from ``(seed, epoch)``); sample seeds
    come from ``(seed, step, position)``. Nothing depends on what ran before, so resume is exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, num_steps: int | None = None,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.num_steps = start_step, num_steps
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the indices (from ``(seed, epoch)`` alone), kept for the epoch's next steps:
        drawing it anew for every step cost O(n) per step (1.7 s a step for 10 million tiles)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a batch may span two epochs
            self._perms[epoch] = perm
        return perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        gb = self.batch_size * self.world_size
        lo = (step * gb + self.rank * self.batch_size)
        out = []
        for j in range(lo, lo + self.batch_size):
            epoch, pos = divmod(j, self.n)
            sample_seed = int(np.random.SeedSequence([self.seed, step, j]).generate_state(1)[0])
            out.append((int(self.permutation(epoch)[pos]), sample_seed))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        return self.num_steps if self.num_steps is not None else 2**31


def collate_views(batch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([sample[v] for sample in batch]) for v in range(len(batch[0]))]


#: Batches each data-loader worker reads ahead.
PREFETCH = 4


def fit_shared_memory(workers: int, prefetch: int, batch_bytes: int) -> tuple[int, int]:
    """``(workers, prefetch)`` whose batches in flight fit in the free shared memory (``/dev/shm``).

    Data-loader workers hand each batch over in shared memory: ``workers * prefetch`` batches read ahead plus the
    one in use. Docker gives a container 64 MB of ``/dev/shm`` by default; a worker that could not allocate its
    batch there died in torch's queue thread while the main process waited for that batch forever (a hang).
    Fewer batches read ahead (then fewer workers) when they do not fit, none (``workers`` 0: read in this process)
    when not even one does, with a warning naming ``/dev/shm`` and the fix."""
    from gigaslide.slides.pool import SHM_DIR, SHM_FIX, shm_batches

    room = shm_batches(batch_bytes) if workers > 0 and batch_bytes > 0 else None
    if room is None:
        return workers, prefetch
    free, fit = room[0], room[1] - 1  # batches that may be read ahead beside the one in use
    if fit >= workers * prefetch:
        return workers, prefetch
    need = (workers * prefetch + 1) * batch_bytes
    what = (f"{workers * prefetch + 1} batches of {batch_bytes / 2**20:.1f} MB need {need / 2**20:.0f} MB of shared "
            f"memory, {SHM_DIR} has {free / 2**20:.0f} MB free")
    if fit < 1:
        log.warning("%s: tiles are read in this process, not in %d data-loader workers (slower); %s", what, workers,
                    SHM_FIX)
        return 0, prefetch
    new_workers = min(workers, fit)
    new_prefetch = max(1, min(prefetch, fit // new_workers))
    log.warning("%s: %d batches are read ahead by %d data-loader workers instead of %d by %d; %s",
                what, new_workers * new_prefetch, new_workers, workers * prefetch, workers, SHM_FIX)
    return new_workers, new_prefetch


def batch_nbytes(dataset: ViewDataset, batch_size: int) -> int:
    """Bytes of one collated batch of ``dataset``'s views (float32 [3, size, size] each); 0 when unknown."""
    sizes = [int(getattr(r, "size", 0) or 0) for r in getattr(dataset.views, "recipes", [])]
    if not sizes or min(sizes) <= 0:
        return 0
    return batch_size * sum(3 * s * s * 4 for s in sizes)


def make_loader(dataset: ViewDataset, sampler: StepSampler, workers: int = 0) -> torch.utils.data.DataLoader:
    prefetch = PREFETCH
    if workers > 0:
        workers, prefetch = fit_shared_memory(workers, prefetch, batch_nbytes(dataset, sampler.batch_size))
    kw = {"persistent_workers": False, "prefetch_factor": prefetch} if workers > 0 else {}
    if workers > 0:
        socket_safe_tempdir()  # the workers hand batches back through sockets in multiprocessing's temp folder
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_views,
                                       pin_memory=torch.cuda.is_available(), **kw)

"""Tile many slides at once: one slide per process, results as each slide finishes.

Tissue segmentation + tiling costs a fraction of a second per slide in one process (thumbnail read, mask,
grid, overlays). Done one slide after another before a batch's first forward pass, it was a large share of
``encode``'s wall time with a fast model (a proxy for a GPU; ``benchmarks/results/tiling_parallel.md``), and
a GPU that embeds thousands of tiles a second waits on it. :func:`tile_many` spreads the slides over ``workers`` processes
(forked; each slide's files are written atomically by :func:`~gigaslide.tiling.job.tile_slide` in the
worker); the caller gets each slide's :class:`TileGrid` -- loaded in the calling process, where a stain
warning is raised once as for a slide tiled there -- or its one-line error. A slide that cannot be tiled
never stops the others. ``workers <= 1`` tiles in the calling process.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Generic, TypeVar

from gigaslide.errors import GigaslideError
from gigaslide.locks import exit_with_parent, socket_safe_tempdir
from gigaslide.slides import slide_id_from_path
from gigaslide.tiling.grid import TileGrid
from gigaslide.tiling.job import TilingParams, _warn_stain, layout, tile_slide
from gigaslide.tiling.store import load_grid

T = TypeVar("T")


def _tile_quietly(path: str, out: str, params: TilingParams, slide_mpp: float | str | None, overlays: bool) -> str | None:
    """In a worker: tile one slide; None when done, else its one-line error (the caller warns, not the worker)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _tile_here(path, out, params, slide_mpp, overlays)[1]


def _tile_here(path: str, out: str, params: TilingParams, slide_mpp: float | str | None,
               overlays: bool) -> tuple[TileGrid | None, str | None]:
    try:
        return tile_slide(path, out, params, slide_mpp=slide_mpp, overlays=overlays), None
    except GigaslideError as e:
        return None, e.one_line()
    except Exception as e:  # noqa: BLE001 - a damaged slide must not stop the batch
        return None, f"{path}: cannot tile this slide ({type(e).__name__}: {str(e)[:200]})"


def _load_tiled(path: str, out: str) -> tuple[TileGrid | None, str | None]:
    try:
        grid = load_grid(layout(out, slide_id_from_path(Path(path)))["coords"])
    except GigaslideError as e:
        return None, e.one_line()
    _warn_stain(grid)
    return grid, None


def tile_many(items: Iterable[T], path_of: Callable[[T], str | os.PathLike], out: str | os.PathLike, params: TilingParams, *,
              slide_mpp: float | str | None = None, overlays: bool = True, workers: int = 1, start: str = "fork"
              ) -> Iterator[tuple[T, TileGrid | None, str | None]]:
    """``(item, grid, None)`` or ``(item, None, error line)`` for every item, in the order they finish.

    ``items`` is consumed lazily, at most ``2 * workers`` ahead of the results (e.g. a generator that takes
    each slide's lock as it is drawn). ``start``: how worker processes start; ``spawn`` from a thread of a
    process whose other threads may hold locks a forked child would inherit locked (h5py's, the allocator's)."""
    out_s = str(out)
    if workers <= 1:
        for item in items:
            yield (item, *_tile_here(str(path_of(item)), out_s, params, slide_mpp, overlays))
        return
    import multiprocessing as mp

    it = iter(items)
    pending: dict[Future, T] = {}
    left: list[T] = []  # drawn, not finished when the pool broke: tiled here instead
    ctx = mp.get_context(start if os.name == "posix" else "spawn")
    socket_safe_tempdir()  # a forkserver listens on a socket in multiprocessing's temp folder
    try:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))
    except OSError as e:  # its queues' semaphores live in /dev/shm: full (a container's 64 MB) or not writable
        warnings.warn(f"cannot start {workers} tiling processes ({e.strerror or e}: their semaphores live in "
                      "/dev/shm, full or not writable): the slides are tiled one after another in this process "
                      "(slower); give the container more shared memory (docker run --shm-size 1g)", stacklevel=2)
        yield from tile_many(it, path_of, out, params, slide_mpp=slide_mpp, overlays=overlays, workers=1)
        return
    with pool:
        while True:
            while len(pending) < 2 * workers and not left and (item := next(it, _END)) is not _END:
                try:
                    pending[pool.submit(_tile_quietly, str(path_of(item)), out_s, params, slide_mpp, overlays)] = item
                except BrokenProcessPool:
                    left.append(item)
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                try:
                    err = fut.result()
                except BrokenProcessPool:
                    left.append(item)
                    continue
                if err is not None:
                    yield item, None, err
                else:  # the worker wrote the coords file: load it here (and warn here, once), as for a slide tiled here
                    yield (item, *_load_tiled(str(path_of(item)), out_s))
    for item in left + list(it):  # a worker died (e.g. a crash inside a C reader): the rest here, one by one
        yield (item, *_tile_here(str(path_of(item)), out_s, params, slide_mpp, overlays))


_END = object()


def tiling_workers(slides: int, *, ranks_per_node: int = 1) -> int:
    """Processes for tiling ``slides`` slides: this rank's share of the cores, at most one per slide."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(slides, cores // max(1, ranks_per_node)))


class TileAhead(Generic[T]):
    """:func:`tile_many` in a background thread, so slides are tiled while earlier ones are encoded.

    ``wait(key)`` blocks until that item is answered: ``(grid, None)``, ``(None, error line)``, or None when it
    was not tiled here (``claim(item)`` refused it, e.g. another process holds its lock; or the tiler stopped).
    ``claim`` runs before an item is tiled, ``release`` after its answer. With ``workers > 1`` the worker processes
    are spawned, not forked (this thread's process runs other threads); with 1 the thread tiles each slide itself."""

    def __init__(self, items: list[T], key: Callable[[T], str], path_of: Callable[[T], str | os.PathLike],
                 out: str | os.PathLike, params: TilingParams, *, slide_mpp: float | str | None = None,
                 overlays: bool = True, workers: int = 1, claim: Callable[[T], bool] = lambda item: True,
                 release: Callable[[T], None] = lambda item: None):
        self._key, self._claim, self._release = key, claim, release
        self._answers: dict[str, tuple[TileGrid | None, str | None] | None] = {}
        self._pending = {key(i) for i in items}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        args = (items, path_of, out, params, slide_mpp, overlays, workers)
        self._thread = threading.Thread(target=self._work, args=args, name="gigaslide-tile-ahead", daemon=True)
        self._thread.start()

    def _answer(self, k: str, value: tuple[TileGrid | None, str | None] | None) -> None:
        with self._cond:
            self._answers[k] = value
            self._pending.discard(k)
            self._cond.notify_all()

    def _work(self, items: list[T], path_of, out, params, slide_mpp, overlays, workers) -> None:  # noqa: ANN001
        held: dict[str, T] = {}

        def claimed() -> Iterator[T]:
            for item in items:
                if self._stop.is_set():
                    return
                if self._claim(item):
                    held[self._key(item)] = item
                    yield item
                else:
                    self._answer(self._key(item), None)

        try:
            for item, grid, err in tile_many(claimed(), path_of, out, params, slide_mpp=slide_mpp, overlays=overlays,
                                             workers=workers, start="spawn"):
                self._release(held.pop(self._key(item)))  # before the answer: the waiter takes the same lock next
                self._answer(self._key(item), (grid, err))
        finally:  # stopped or failed: what is still claimed is released, and whoever waits tiles its slide itself
            for item in held.values():
                self._release(item)
            with self._cond:
                self._pending.clear()
                self._cond.notify_all()

    def wait(self, key: str) -> tuple[TileGrid | None, str | None] | None:
        with self._cond:
            while key in self._pending:
                self._cond.wait()
            return self._answers.pop(key, None)

    def close(self) -> None:
        """Stop drawing new slides; returns once the slides being tiled are done (and released)."""
        self._stop.set()
        self._thread.join()


__all__ = ["TileAhead", "tile_many", "tiling_workers"]


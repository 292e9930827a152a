"""A persistent pool of reader processes: batches of tiles of many slides, returned in submission order.

One pool serves a whole batch job, so there is no start-up per slide and the next slide's batches
are read while the current one is encoded. Each worker keeps its last two slides open (a
:class:`~gigaslide.slides.reader.TileReader` each, with its decoded-tile cache) and fills a
uint8 ``[B, T, T, 3]`` tensor in shared memory, so a batch crosses processes without a copy. The
shared buffers ("slots", ``slot_bytes`` each) are made once and reused: on this VM first-touching
fresh memory costs about as much as decoding the JPEG (~1 ms per 224² tile). A batch returned by
:meth:`ReaderPool.get` stays valid until the next ``get``. ``workers=0`` reads in the calling process. A task whose slide cannot be read returns a one-line
error instead of pixels; a worker that dies (e.g. a crash inside a C reader) fails its tasks and is
replaced. ``decode_device`` (e.g. ``"cuda"``): read in the calling process with a
:class:`~gigaslide.slides.device_decode.DeviceTileReader` instead, stored JPEG tiles decoded and cut on that
device; batches are then tensors on the device.
"""

from __future__ import annotations

import os
import queue
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as tmp

from gigaslide.errors import GigaslideError
from gigaslide.locks import exit_with_parent, socket_safe_tempdir
from gigaslide.memory import set_malloc_thresholds
from gigaslide.slides.device_decode import DeviceTileReader
from gigaslide.slides.reader import TileReader
from gigaslide.slides.slide import SCALE_TOLERANCE, Slide


@dataclass(frozen=True)
class ReadTask:
    key: Any  # returned with the result (e.g. (job index, start))
    path: str
    coords: np.ndarray  # [B, 2] level-0
    tile_size: int
    mpp: float
    slide_mpp: float | str | None = None
    slide_id: str | None = None
    tolerance: float = SCALE_TOLERANCE
    direct: bool = True
    downsample: str = "box"  # /2, /4, /8 reads: box averages, or the JPEG decoder's DCT scaling (TileReader)
    background: str | None = "bright"  # outside the slide: white glass, or black for "dark" (the grid's background)


class _Readers:
    """The open slides of one process (at most ``keep``), keyed by what they read."""

    def __init__(self, keep: int = 2, decode_device: str | torch.device | None = None):
        self.keep = keep
        self.decode_device = decode_device
        self.open: OrderedDict[tuple, tuple[Slide, TileReader | DeviceTileReader]] = OrderedDict()

    def get(self, t: ReadTask) -> TileReader | DeviceTileReader:
        k = (t.path, t.slide_mpp, t.tile_size, t.mpp, t.tolerance, t.direct, t.downsample, t.background)
        if k in self.open:
            self.open.move_to_end(k)
            return self.open[k][1]
        slide = Slide(t.path, mpp=t.slide_mpp, slide_id=t.slide_id)
        if self.decode_device is not None and t.direct:
            r = DeviceTileReader(slide, t.tile_size, t.mpp, self.decode_device, tolerance=t.tolerance,
                                 background=t.background)
        else:
            r = TileReader(slide, t.tile_size, t.mpp, tolerance=t.tolerance, direct=t.direct, downsample=t.downsample,
                           background=t.background)
        self.open[k] = (slide, r)
        while len(self.open) > self.keep:
            _, (s, r) = self.open.popitem(last=False)
            r.close()
            s.close()
        return self.open[k][1]

    def read(self, t: ReadTask, buf: torch.Tensor | None, shared: bool) -> tuple[Any, dict]:
        """Read ``t`` into ``buf`` (a flat uint8 slot) or a fresh tensor; (pixels or error line, info)."""
        try:
            r = self.get(t)
            if isinstance(r, DeviceTileReader):
                return r.read_batch(t.coords), {"direct": r.direct, "read_mpp": r.read_mpp(), "decoded": r.decoded,
                                                "decode_device": str(r.device) if r.on_device else None,
                                                "fallback": r.cpu.fallback_tiles, "cpu_tiles": r.cpu_tiles}
            shape = (len(t.coords), t.tile_size, t.tile_size, 3)
            n = shape[0] * shape[1] * shape[2] * 3
            if buf is not None and buf.numel() >= n:
                out = buf[:n].view(shape)
            else:
                out = torch.empty(shape, dtype=torch.uint8)
                if shared:
                    out.share_memory_()
            r.read_batch(t.coords, out=out.numpy())
            return out, {"direct": r.direct, "read_mpp": r.read_mpp(), "decoded": r.decoded_tiles,
                         "fallback": r.fallback_tiles, "downsample": r.downsample}
        except GigaslideError as e:
            return e.one_line(), {}
        except Exception as e:  # noqa: BLE001 - a damaged slide must not stop the batch
            return f"{t.path}: cannot read tiles ({type(e).__name__}: {str(e)[:200]})", {}

    def close(self) -> None:
        for s, r in self.open.values():
            r.close()
            s.close()
        self.open.clear()


def _keep_heap() -> None:
    """glibc: serve the decoder's ~200 KB buffers from a heap that is never trimmed, instead of fresh
    mmaps that must be faulted in page by page (slow on VMs; +15-20 % tiles/s measured here, noisy)."""
    set_malloc_thresholds(64 << 20, 512 << 20)  # Linux / glibc only; elsewhere a no-op


def _worker(tasks, results, slots, parent: int) -> None:  # noqa: ANN001 - multiprocessing queues, shared tensors
    exit_with_parent(parent)  # a reader left by a killed encode held ~450 MB, waiting for tasks, for good
    torch.set_num_threads(1)  # readers decode JPEG; they need no torch threads of their own
    _keep_heap()
    readers = _Readers()
    while True:
        item = tasks.get()
        if item is None:
            break
        seq, task, slot = item
        px, info = readers.read(task, None if slot is None else slots[slot], shared=True)
        if slot is not None and not isinstance(px, str):
            px = ("slot", slot, tuple(px.shape))  # the pixels are in the shared slot already
        results.put((seq, px, info))
    readers.close()


#: Where the reader processes' shared batch buffers live (POSIX shared memory, as torch makes it on Linux).
SHM_DIR = "/dev/shm"
#: Share of :data:`SHM_DIR`'s free space left to others (data-loader workers, other ranks) when buffers are made.
SHM_HEADROOM = 0.1
#: The fix named wherever worker processes' batches do not fit in the shared memory.
SHM_FIX = ("give the container more shared memory (docker run --shm-size 1g; Kubernetes: an emptyDir with medium "
            "Memory at /dev/shm), or use a smaller --batch-size or fewer --workers")


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes free in the shared-memory file system at ``path`` (None where there is none to measure)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # no /dev/shm (macOS), or no statvfs (Windows)
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def shm_batches(batch_bytes: int) -> tuple[int, int] | None:
    """``(bytes free in SHM_DIR, batches of batch_bytes that fit in them less SHM_HEADROOM)``; None where there is
    nothing to measure. What reader pools and data loaders size their batches in flight by."""
    free = shm_free_bytes()
    return None if free is None else (free, int(free * (1 - SHM_HEADROOM) // batch_bytes))


def max_pending(workers: int) -> int:
    """Batches a :class:`ReaderPool` of ``workers`` reader processes keeps in flight (1 when reading inline)."""
    return 1 if workers == 0 else 2 * workers + 2


def pool_slots(workers: int) -> int:
    """Reusable batch buffers a :class:`ReaderPool` of ``workers`` makes by default: one per batch in flight, plus
    the one being consumed."""
    return max_pending(workers) + 1


class ReaderPool:
    """``submit`` tasks, then :meth:`get` results in submission order; ``close`` when done.

    ``slot_bytes``: size of the reusable shared buffers (a batch that does not fit gets fresh memory).
    """

    def __init__(self, workers: int = 1, *, slot_bytes: int = 0, slots: int | None = None,
                 decode_device: str | torch.device | None = None):
        self.workers = 0 if decode_device is not None else max(0, int(workers))
        slot_bytes = 0 if decode_device is not None else slot_bytes  # batches are made on the device
        self.max_pending = max_pending(self.workers)
        n_slots = pool_slots(self.workers) if slots is None else slots
        if self.workers and slot_bytes and n_slots:
            n_slots = self._fit_shared_memory(n_slots, slot_bytes)
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(n_slots if slot_bytes else 0)]
        self._free = list(range(len(self._slots)))
        self._seq = 0
        self._next = 0
        self._tasks: dict[int, ReadTask] = {}
        self._slot_of: dict[int, int | None] = {}
        self._owner: dict[int, int] = {}
        self._done: dict[int, tuple[Any, dict]] = {}
        self._held: int | None = None  # slot of the batch the caller has now
        self._local = _Readers(decode_device=decode_device) if self.workers == 0 else None
        self._procs: list[Any] = []
        if self.workers:
            try:
                for t in self._slots:
                    t.share_memory_()  # before the workers fork: they write into these very pages
            except RuntimeError as e:  # /dev/shm filled by another process since it was measured
                self._slots = []
                raise GigaslideError(f"no shared memory for the reader processes' batches ({str(e).splitlines()[0]})",
                                     path=SHM_DIR, fix=SHM_FIX) from None
            socket_safe_tempdir()  # a batch too large for a slot comes back through a socket in its temp folder
            self._ctx = tmp.get_context("fork" if os.name == "posix" else "spawn")
            self._results = self._ctx.Queue()
            self._queues = [self._ctx.Queue() for _ in range(self.workers)]
            self._procs = [self._start(i) for i in range(self.workers)]

    def _fit_shared_memory(self, n_slots: int, slot_bytes: int) -> int:
        """How many of ``n_slots`` batch buffers to make in shared memory: all when they fit in what
        :data:`SHM_DIR` has free (less :data:`SHM_HEADROOM`); else as many as fit, fewer batches kept in flight
        (``max_pending``) by as many reader processes at most, with a warning; fewer than two: the tiles are read in
        this process instead (``workers`` 0). Docker gives a container 64 MB of ``/dev/shm`` by default, and 15
        readers' buffers of 64-tile batches of 224 px take 320 MB: allocating them failed with a torch traceback."""
        room = shm_batches(slot_bytes)
        if room is None or n_slots <= room[1]:
            return n_slots
        free, fit = room
        mb = (f"{n_slots} batches of {slot_bytes / 2**20:.1f} MB need {n_slots * slot_bytes / 2**20:.1f} MB of shared "
              f"memory, {SHM_DIR} has {free / 2**20:.1f} MB free")
        if fit < 2:
            warnings.warn(f"{mb}: tiles are read in this process, not in {self.workers} reader processes (slower); "
                          f"{SHM_FIX}", stacklevel=3)
            self.workers = 0
            self.max_pending = max_pending(0)
            return pool_slots(0)
        workers = min(self.workers, fit - 1)  # more would wait for a buffer, each holding its open slides
        warnings.warn(f"{mb}: {fit - 1} batches are read ahead by {workers} reader processes instead of "
                      f"{self.max_pending} by {self.workers}; {SHM_FIX}", stacklevel=3)
        self.workers = workers
        self.max_pending = min(self.max_pending, fit - 1)
        return fit

    def _start(self, i: int):  # noqa: ANN202
        p = self._ctx.Process(target=_worker, args=(self._queues[i], self._results, self._slots, os.getpid()),
                              daemon=True)
        p.start()
        return p

    @property
    def pending(self) -> int:
        return self._seq - self._next

    def submit(self, task: ReadTask) -> None:
        seq = self._seq
        self._seq += 1
        self._tasks[seq] = task
        slot = self._free.pop() if self._free else None
        self._slot_of[seq] = slot
        if self.workers:
            w = seq % self.workers
            self._owner[seq] = w
            self._queues[w].put((seq, task, slot))

    def get(self) -> tuple[ReadTask, Any, dict]:
        """The next result in submission order: ``(task, uint8 tensor [B, T, T, 3] | error str, info)``.

        The tensor may live in a reused buffer: it is valid until the next ``get``."""
        if self._next >= self._seq:
            raise RuntimeError("no task pending")
        if self._held is not None:
            self._free.append(self._held)
            self._held = None
        seq = self._next
        slot = self._slot_of.pop(seq)
        if self._local is not None:
            px, info = self._local.read(self._tasks[seq], None if slot is None else self._slots[slot], shared=False)
        else:
            while seq not in self._done:
                try:
                    s, px, info = self._results.get(timeout=2.0)
                    self._done[s] = (px, info)
                except queue.Empty:
                    self._check_workers()
            px, info = self._done.pop(seq)
            if isinstance(px, tuple):  # ("slot", index, shape)
                shape = px[2]
                px = self._slots[px[1]][: int(np.prod(shape))].view(shape)
        self._held = slot
        self._next += 1
        self._owner.pop(seq, None)
        return self._tasks.pop(seq), px, info

    def _check_workers(self) -> None:
        for i, p in enumerate(self._procs):
            if p.is_alive():
                continue
            lost = [s for s, w in self._owner.items() if w == i and s not in self._done]
            for s in lost:
                t = self._tasks[s]
                self._done[s] = (f"{t.path}: reader process died (exit code {p.exitcode}) while reading tiles", {})
            self._queues[i] = self._ctx.Queue()
            self._procs[i] = self._start(i)

    def results(self) -> Iterator[tuple[ReadTask, Any, dict]]:
        while self.pending:
            yield self.get()

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
        for q in getattr(self, "_queues", []):
            q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self._procs = []

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

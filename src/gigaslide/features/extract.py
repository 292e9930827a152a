"""Batched feature extraction: slides -> tiles -> encoder -> one HDF5 feature file per slide.

Reading runs in a persistent pool of reader processes (:class:`gigaslide.slides.pool.ReaderPool`,
the decode-limited path of :func:`gigaslide.slides.iter_tiles`) that serves every slide of the job:
the next slide's batches are read while the current one is encoded. Where the model's torch threads
already use every CPU core, reading runs in the main process between forward passes instead
(``workers=0``, chosen by :func:`~gigaslide.features.parallel.auto_workers`). The model runs in the main
process on uint8 batches (pinned and copied ``non_blocking`` on CUDA, normalised on the device),
channels_last for CNNs, with the precision policy of :func:`gigaslide.devices.choose_precision`
(recorded per slide), optionally ``torch.compile``-d. A batch never spans two slides; a finished
slide's file and manifest entry are written by a thread while the next slide is encoded.

Several processes may encode into one folder (two ``gigaslide encode`` runs, or ``torchrun`` /
SLURM ranks, see :mod:`gigaslide.features.parallel`): each slide is tiled and encoded under a lock
file (:mod:`gigaslide.locks`), so no two processes ever write the same file, and a dead process's
slides are taken over. A broken slide is reported in the manifest and the batch goes on; finished
slides are skipped on a re-run; every file is written atomically. Among ranks, a slide one rank failed is
not tried again by the others, and rank 0 stays until every other rank's slides are settled, then reports
the whole job (its exit status is the job's): torchrun stops every rank as soon as one exits with an error,
so the other ranks exit with success whatever failed on them (each prints its own failures).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic
from gigaslide.devices import PrecisionChoice, autocast_ctx, choose_precision, pick_device
from gigaslide.encoders import Encoder
from gigaslide.encoders.inference import for_inference, nonfinite_error
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.manifest import Manifest
from gigaslide.features.parallel import RankInfo, auto_workers, rank_device, rank_info, rank_order
from gigaslide.locks import ItemLock
from gigaslide.memory import available_memory
from gigaslide.slides import by_slide_id
from gigaslide.slides.pool import ReaderPool, ReadTask, pool_slots
from gigaslide.slides.reader import DOWNSAMPLE_MODES
from gigaslide.tiling import GRID_RULE, Scan, TileGrid, TilingParams, layout, reusable_grid
from gigaslide.tiling.annotations import tissue_attrs
from gigaslide.tiling.job import IDENTITY_KEY
from gigaslide.tiling.parallel import TileAhead, tile_many, tiling_workers
from gigaslide.tiling.store import coords_attrs, level0_dimensions

#: Seconds between heartbeats on a held slide lock (other hosts judge staleness by them).
HEARTBEAT_S = 30.0
#: Seconds between rank 0's looks at the slides other ranks still hold, once it has nothing left of its own.
WAIT_S = 1.0
_WAIT = object()  # from the claims: nothing to take now, but other ranks still hold slides (rank 0 waits)


@dataclass
class SlideJob:
    path: str
    slide_id: str
    grid: TileGrid | None = None  # None: not tiled yet (another process was tiling it), or parked on disk
    n_tiles: int | None = None  # a parked grid's tile count (see :meth:`park`)
    lock: ItemLock | None = None
    feats: list[torch.Tensor] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    failed: bool = False
    t0: float = 0.0

    @property
    def n(self) -> int:
        return len(self.grid) if self.grid is not None else (self.n_tiles or 0)

    @property
    def tiled(self) -> bool:
        return self.grid is not None or self.n_tiles is not None

    def park(self) -> None:
        """Keep only the tile count of a grid saved in ``patches/`` until this slide is encoded: a job of thousands of
        slides held every slide's grid (coordinates, tissue and padding: 24 bytes a tile, gigabytes for a cohort)."""
        if self.grid is not None:
            self.n_tiles, self.grid = len(self.grid), None


@dataclass
class EncodeResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)  # slides another live process holds: who
    failed_elsewhere: dict[str, str] = field(default_factory=dict)  # slides another rank of this job failed: error
    rank: int = 0  # this process's rank among ``world`` (torchrun / SLURM); rank 0 of several reports the job
    world: int = 1
    tiles: int = 0
    seconds: float = 0.0
    tiling_seconds: float = 0.0  # of ``seconds``: tiling done before the first forward pass (none with tile_ahead)
    precision: str = "fp32"
    bf16_cosine: float | None = None
    precision_choice: dict[str, Any] = field(default_factory=dict)
    bn_folded: bool = False  # the encoder ran with its batch norms folded into its convolutions
    #: slides not in this job whose features in the folder another encoder, weights, mpp or tile size made (as the
    #: manifest records them): what made them. MIL and slide SSL refuse such a mixed folder.
    mixed: dict[str, str] = field(default_factory=dict)


def _decode_device(name: str, dev: torch.device) -> torch.device:
    """The device ``--decode-device`` names; ``cuda`` is the encode device (each rank's own GPU) when that is CUDA."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GigaslideError(f"--decode-device {name}: no CUDA device here",
                             fix="leave --decode-device unset: reader processes decode the tiles on the CPU")
    try:
        return dev if name == "cuda" and dev.type == "cuda" else pick_device(name)
    except GigaslideError:
        raise GigaslideError(f"--decode-device {name}: not a device", fix="use cuda, cuda:N or cpu") from None


def _reader_name(info: dict[str, Any]) -> str:
    """How the tiles were read: ``direct`` (stored tiles decoded once), ``direct, decoded on cuda`` (on a device),
    or ``openslide``."""
    if not info.get("direct"):
        return "openslide"
    return f"direct, decoded on {info['decode_device']}" if info.get("decode_device") else "direct"


def _feature_attrs(encoder: Encoder, params: TilingParams, grid: TileGrid, choice: PrecisionChoice, seed: int | None,
                   info: dict[str, Any], downsample: str, *, slide_path: str | os.PathLike, bn_folded: bool,
                   identity: str | None = None) -> dict:
    """The feature file's attributes. ``slide_path``: the file the tiles were read from (recorded absolute: the
    grid's may be older); ``bn_folded``: the encoder ran with its batch norms folded; ``identity``: that file's
    :func:`~gigaslide.tiling.job.slide_identity` (``slide_identity``; None: not recorded)."""
    return {
        "encoder": encoder.spec.name, "encoder_weights_sha256": encoder.weights_id, "embed_dim": encoder.embed_dim,
        "mpp": params.mpp, "read_mpp": info.get("read_mpp"), "tile_size": params.tile_size, "overlap": params.overlap,
        "min_tissue": params.min_tissue, "slide_id": grid.slide_id,
        "slide_path": os.path.abspath(slide_path),
        "slide_mpp": grid.slide_mpp, IDENTITY_KEY: identity, "bn_folded": bn_folded,
        "precision": choice.resolved, "precision_requested": choice.requested,
        "bf16_cosine": choice.bf16_cosine, "encoder_input_size": encoder.spec.input_size, "seed": seed,
        "reader": _reader_name(info), "grid_rule": grid.extra.get("grid_rule"),
        "downsample_option": downsample, "downsample": info.get("downsample", "box"),
        "background_option": params.background, "background": grid.extra.get("background"),
        "edge_fill": grid.edge_fill,
        "stain": grid.extra.get("stain"), "stain_warning": grid.extra.get("stain_warning"),
        **tissue_attrs(grid.extra),
    }


def file_stamp(path: Path) -> list[int]:
    """``[size, mtime_ns]``: recorded in the manifest when encode writes a feature file."""
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def is_finished(path: Path, encoder: Encoder, params: TilingParams, *, stamp: Sequence[int] | None = None,
                downsample: str = "box", scan: Scan | None = None, precision: str = "auto") -> bool:
    """``path`` holds this encoder's features at these tiling settings (of this scan, with ``scan``).

    ``stamp``: the :func:`file_stamp` this job's manifest recorded when encode wrote the file. A file that still
    has it is one encode wrote whole (atomically) and nothing has touched since: its attributes are enough. Any
    other file (no record, or changed since: replaced, damaged, written by another tool) is read in full with
    its checksums verified, so a damaged file is encoded again (benchmarks/results/manifest.md measures both). Bits
    that rot on disk without changing size or mtime are caught where the features are read (``store.load``: a
    checksum error naming the file and the fix).

    ``scan``: the slide's resolution and dimensions now (:class:`~gigaslide.tiling.Scan`); features made from another
    scan (their ``slide_mpp``, level-0 size -- coords ``level0_width``/``level0_height`` -- or ``slide_identity``
    differ: a corrected ``--slide-mpp``, another file under the same name, even one of the same size and resolution)
    are not finished. An attribute the file lacks is not compared (None: neither is); a file without
    ``slide_identity`` (written before it was recorded) is finished only where the slide file has not changed or been
    put in place since the feature file was written (:meth:`~gigaslide.tiling.Scan.made`).

    ``precision``: the ``--precision`` asked for; one other than ``auto`` must be the one the features were computed
    in (their ``precision`` attribute, when recorded): a re-run with ``--precision fp32`` does not keep bf16
    features (``auto`` keeps whatever an earlier run resolved)."""
    if not path.is_file():
        return False
    try:
        if stamp is not None and list(stamp) == file_stamp(path):
            a, ca = store.read_all_attrs(path)
        else:
            ff = store.load(path)
            a, ca = ff.attrs, ff.coords_attrs
        written = path.stat().st_mtime
    except (GigaslideError, OSError):
        return False
    try:  # attrs of the wrong type (another tool's, hand-edited: tile_size "abc"): not this job's, encoded again
        if scan is not None and not scan.made(a.get("slide_mpp", ca.get("level0_mpp")), level0_dimensions(ca),
                                              a.get(IDENTITY_KEY), written=written):
            return False
        same_grid = (abs(float(a.get("mpp", -1)) - params.mpp) < 1e-9
                     and int(a.get("tile_size", -1)) == params.tile_size and int(a.get("overlap", -1)) == params.overlap
                     and abs(float(a.get("min_tissue", -1)) - params.min_tissue) < 1e-9)
    except (TypeError, ValueError):
        return False
    return (same_grid and a.get("encoder") == encoder.spec.name
            and a.get("encoder_weights_sha256") == encoder.weights_id
            and a.get("grid_rule") == GRID_RULE and a.get("background_option", "auto") == params.background
            and (a.get("background") != "dark" or a.get("edge_fill") == "dark")  # white-padded before the fix
            and a.get("downsample_option", "box") == downsample
            and (precision == "auto" or a.get("precision") in (None, precision))
            and params.tissue_matches(a, str(a.get("slide_id", path.stem)), a.get("slide_path")))


def _clean_own_tmp(out: Path, slide_id: str, lock: ItemLock) -> None:
    """Temporary files of this slide left by a dead run (others' slides' temporaries may be in use). Each folder is
    listed once per process (``atomic.clean_stale_tmp_for(cached=True)``), not once per slide, so a batch stays
    linear; a slide taken over from a run that died after that listing is looked up afresh."""
    for sub in ("features", "patches"):
        atomic.clean_stale_tmp_for(out / sub / f"{slide_id}.h5", cached=not lock.took_over)


class _Run:
    """One encode job's state: the slides, their locks, the manifest and the result."""

    def __init__(self, out: Path, encoder: Encoder, params: TilingParams, manifest: Manifest, slide_mpp, overlays: bool,  # noqa: ANN001
                 rank: RankInfo, progress: Callable[[str, int, int], None] | None, tile_workers: int | None = None,
                 downsample: str = "box", precision: str = "auto"):
        self.out, self.encoder, self.params, self.manifest = out, encoder, params, manifest
        self.downsample, self.precision = downsample, precision
        self.tile_workers = tile_workers
        self.slide_mpp, self.overlays, self.rank, self.progress = slide_mpp, overlays, rank, progress
        self.res = EncodeResult(rank=rank.rank, world=rank.world)
        self.locks = out / "locks"
        self._scans: dict[str, Scan | None] = {}
        self.ids: list[str] = []  # every slide id of this job
        self.started = time.time()  # failure marks newer than this are this job's (see failed_elsewhere)

    @property
    def waits(self) -> bool:
        """Rank 0 of several waits for the other ranks' slides before it ends (see the module docstring)."""
        return self.rank.world > 1 and self.rank.rank == 0

    def failed_mark(self, slide_id: str) -> Path:
        return self.locks / f"{slide_id}.failed"

    def failed_elsewhere(self, slide_id: str) -> bool:
        """With several ranks: whether another rank of this job has failed the slide (then recorded in the result).

        A rank that fails a slide leaves a mark beside its lock (``locks/<slide_id>.failed``, removed when the slide
        is encoded later) naming the launcher's job id (:class:`RankInfo` ``job``): a mark of the same id is this
        job's, of another id an earlier job's (tried again), whatever the clocks of the nodes and the file server
        say. Where the launcher gives no id, a mark newer than this process's start is this job's (then a rank that
        starts after another has already failed a slide, a node that came up late, tries it again, as a new job
        does; and clocks skewed across nodes can misjudge a mark)."""
        if self.rank.world == 1:
            return False
        mark = self.failed_mark(slide_id)
        newer = True  # a mark that cannot be looked at counts, as one of this job's
        try:
            newer = mark.stat().st_mtime > self.started
            rec = json.loads(mark.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            rec = {}
        rec = rec if isinstance(rec, dict) else {}
        if not (rec.get("job") == self.rank.job if self.rank.job and rec.get("job") else newer):
            return False
        if (rec.get("pid"), rec.get("host")) == (os.getpid(), socket.gethostname()):  # this process's own
            return False
        self.res.failed_elsewhere[slide_id] = str(rec.get("error") or f"failed on another rank (see {mark})")
        return True

    def settle(self) -> None:
        """At the end of rank 0 of several: every slide of this job that another rank failed."""
        for sid in self.ids:
            if sid not in self.res.failed and sid not in self.res.done:
                self.failed_elsewhere(sid)

    def scan(self, job: SlideJob) -> Scan | None:
        """``job``'s slide's resolution (after ``--slide-mpp``) and dimensions, read once (opening is cheap: metadata
        only); None when it cannot be opened."""
        if job.slide_id not in self._scans:
            self._scans[job.slide_id] = Scan.read(job.path, self.slide_mpp)
        return self._scans[job.slide_id]

    def finished(self, job: SlideJob) -> bool:
        """``job``'s features are on disk, made by this encoder at these settings from the slide as it is now."""
        path = layout(self.out, job.slide_id)["features"]
        if not path.is_file():
            return False
        entry = self.manifest.data["slides"].get(job.slide_id) or {}
        stamp = entry.get("file_stamp") if entry.get("status") == "done" else None
        scan = self.scan(job)
        return scan is not None and is_finished(path, self.encoder, self.params, stamp=stamp,
                                                downsample=self.downsample, scan=scan, precision=self.precision)

    def fail(self, job: SlideJob, msg: str) -> None:
        job.failed = True
        job.feats.clear()
        self.res.failed[job.slide_id] = msg
        self.manifest.set(job.slide_id, "failed", path=job.path, error=msg, rank=self.rank.rank)
        if self.rank.world > 1:  # marked before the lock is released, so no other rank of this job tries it again
            with contextlib.suppress(OSError):
                atomic.write_json(self.failed_mark(job.slide_id), {"error": msg, "rank": self.rank.rank,
                                                                   "pid": os.getpid(), "host": socket.gethostname(),
                                                                   "job": self.rank.job})
        if job.lock is not None:
            job.lock.release()
        if self.progress:
            self.progress(f"failed {job.slide_id}", 0, 0)

    def skip(self, job: SlideJob, note: str) -> None:
        self.res.skipped.append(job.slide_id)
        self.manifest.set(job.slide_id, "done", keep_done=True, path=job.path, note=note, made_with=self.made_with)

    @property
    def made_with(self) -> dict[str, Any]:
        """What makes this job's features (recorded in each slide's manifest entry: the config is the last job's)."""
        return {"encoder": self.encoder.spec.name, "weights": self.encoder.weights_id, "mpp": self.params.mpp,
                "tile_size": self.params.tile_size}

    def find_mixed(self) -> None:
        """Slides outside this job whose features on disk another encoder / weights / mpp / tile size made
        (``EncodeResult.mixed``); entries of manifests written before ``made_with`` was recorded are not judged."""
        ours, ids = self.made_with, set(self.ids)
        for sid, entry in sorted(self.manifest.data["slides"].items()):
            other = entry.get("made_with") if isinstance(entry, dict) and entry.get("status") == "done" else None
            if sid in ids or not isinstance(other, dict) or not layout(self.out, sid)["features"].is_file():
                continue
            diff = [k for k in ours if other.get(k) != ours[k]]
            if diff:
                self.res.mixed[sid] = ", ".join(f"{k} {other.get(k)} (this job: {ours[k]})" for k in diff)

    def tile(self, job: SlideJob) -> bool:
        """Tile ``job`` (its lock held); False when the slide failed."""
        for _, grid, err in tile_many([job], lambda j: j.path, self.out, self.params, slide_mpp=self.slide_mpp,
                                      overlays=self.overlays):
            if err is not None:
                self.fail(job, err)
                return False
            job.grid = grid
        return True

    def collect(self, slides: Sequence[str | os.PathLike], tile: bool = True) -> list[SlideJob]:
        """Slide ids, finished slides skipped, every free slide tiled (this rank's round-robin share first; with
        ``tile=False`` they are left to :meth:`claims`)."""
        jobs: list[SlideJob] = []
        for p, sid, taken in by_slide_id(slides):  # = the opened slide's id; one that cannot be opened fails when tiled
            job = SlideJob(str(p), sid)
            self.ids.append(sid)
            if taken:
                self.fail(job, taken)
                continue
            if self.finished(job):
                self.skip(job, "already encoded (skipped)")
                continue
            jobs.append(job)
        r, w = self.rank.rank, self.rank.world
        untiled: list[SlideJob] = []
        for job in [j for i, j in enumerate(jobs) if i % w == r] + [j for i, j in enumerate(jobs) if i % w != r]:
            job.grid = reusable_grid(layout(self.out, job.slide_id)["coords"], self.params, lambda: self.scan(job))
            if job.grid is None:
                untiled.append(job)
            job.park()
        if not tile:
            return jobs
        locks: dict[str, ItemLock] = {}

        def free(todo: list[SlideJob]) -> Iterator[SlideJob]:  # each slide locked as it is drawn; others' are left
            yield from (job for job in todo
                        if not self.failed_elsewhere(job.slide_id) and self._lock_to_tile(job, locks))

        workers = self.tile_workers
        if workers is None:  # the model has not started: every core of this rank can tile
            workers = tiling_workers(len(untiled), ranks_per_node=self.rank.local_world)
        try:
            for job, grid, err in tile_many(free(untiled), lambda j: j.path, self.out, self.params,
                                            slide_mpp=self.slide_mpp, overlays=self.overlays, workers=workers):
                with locks.pop(job.slide_id):
                    if err is not None:
                        self.fail(job, err)
                    job.grid = grid
                    job.park()
        finally:  # interrupted (Ctrl-C, a full disk): the slides being tiled are free for the next run
            for lock in locks.values():
                lock.release()
        return [j for j in jobs if not j.failed and j.slide_id not in self.res.failed_elsewhere]

    def claims(self, jobs: list[SlideJob], tile_ahead: int = 0) -> Iterator[Any]:
        """Jobs this process locks, in rank order (longest first); retried while others' locks go stale. Rank 0 of
        several yields ``_WAIT`` (nothing to take now) while other ranks still hold slides, instead of ending.

        ``tile_ahead > 0``: slides without a tile grid are tiled by that many processes in the background, in this
        order, while the slides before them are encoded (each under its lock while it is tiled)."""
        order = [jobs[i] for i in rank_order([j.n for j in jobs], self.rank)]
        ahead = self._tile_ahead([j for j in order if not j.tiled], tile_ahead)
        try:
            yield from self._claim_in_order(order, ahead)
        finally:
            if ahead is not None:
                ahead.close()

    def _tile_ahead(self, untiled: list[SlideJob], workers: int) -> TileAhead | None:
        if workers <= 0 or not untiled:
            return None
        locks: dict[str, ItemLock] = {}
        return TileAhead(untiled, lambda j: j.slide_id, lambda j: j.path, self.out, self.params, slide_mpp=self.slide_mpp,
                         overlays=self.overlays, workers=workers,
                         claim=lambda j: not self.finished(j) and not self.failed_elsewhere(j.slide_id)
                         and self._lock_to_tile(j, locks),
                         release=lambda j: locks.pop(j.slide_id).release())

    def _lock_to_tile(self, job: SlideJob, locks: dict[str, ItemLock]) -> bool:
        """Take ``job``'s lock for tiling (kept in ``locks``) and clear its dead temporaries; False if another holds it."""
        lock = ItemLock(self.locks, job.slide_id)
        if not lock.acquire():
            return False
        locks[job.slide_id] = lock
        _clean_own_tmp(self.out, job.slide_id, lock)
        return True

    def _claim_in_order(self, order: list[SlideJob], ahead: TileAhead | None) -> Iterator[Any]:
        while order:
            rest, took = [], False
            for job in order:
                if not job.tiled and ahead is not None and (answer := ahead.wait(job.slide_id)) is not None:
                    if answer[1] is not None:
                        self.fail(job, answer[1])
                        continue
                    job.grid = answer[0]
                if self.finished(job):
                    self.skip(job, "encoded by another process")
                    continue
                if self.failed_elsewhere(job.slide_id):
                    continue
                lock = ItemLock(self.locks, job.slide_id)
                if not lock.acquire():
                    rest.append(job)
                    continue
                if self.finished(job):  # finished between the check and the lock
                    lock.release()
                    self.skip(job, "encoded by another process")
                    continue
                job.lock = lock
                _clean_own_tmp(self.out, job.slide_id, lock)
                if job.grid is None and job.n_tiles is not None:  # parked: read back (None if it is gone or stale)
                    job.grid = reusable_grid(layout(self.out, job.slide_id)["coords"], self.params,
                                             lambda job=job: self.scan(job))
                if job.grid is None and not self.tile(job):
                    continue
                took = True
                yield job
            if not took:
                if rest and self.waits:  # other ranks still hold these: look again (a dead rank's are taken over)
                    yield _WAIT
                    order = rest
                    continue
                for job in rest:
                    self.res.others[job.slide_id] = ItemLock(self.locks, job.slide_id).describe()
                return
            order = rest

    def release_all(self, jobs: Sequence[SlideJob]) -> None:
        for j in jobs:
            if j.lock is not None:
                j.lock.release()


def _check_batch_memory(batch_size: int, tile_size: int, workers: int, available: int | None) -> None:
    """Refuse, before any tile is read, batches of pixels that cannot fit in the memory available: the reader
    pool's buffers (a batch each), the batch being encoded and its float copy (4 batches' bytes)."""
    if available is None:
        return
    batches = pool_slots(workers) + 1 + 4
    per_tile = tile_size * tile_size * 3 * batches
    if batch_size * per_tile <= available:
        return
    gb = f"{batch_size * per_tile / 1e9:.1f} GB for batches of {batch_size} tiles of {tile_size} px"
    fits = available // per_tile
    fix = (f"use --batch-size {fits} or less" if fits >= 1
           else f"use a --tile-size below {int((available / batches / 3) ** 0.5)} px (the encoder sees "
                "its own input size anyway)")
    raise GigaslideError(f"{gb}; {available / 1e9:.1f} GB of memory is available", fix=fix)


@contextlib.contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Processes forked inside (the reader pool's) ignore SIGINT: Ctrl-C reaches the terminal's whole process group,
    and a reader waiting for its next batch printed a ``KeyboardInterrupt`` traceback of its own beside the command's
    one line. The main process, interrupted, stops them as it unwinds (``ReaderPool.close``). Only in the main thread
    with Python's own handlers (elsewhere handlers cannot be changed: nothing changes)."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old is None or old is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _prepare(encoder: Encoder, dev: torch.device, compile_model: bool, fold_bn: bool = True
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder on ``dev`` for inference: batch norms folded (unless ``fold_bn`` is False), channels_last for
    CNNs (see :func:`gigaslide.encoders.inference.for_inference`), optionally ``torch.compile``-d."""
    encoder = for_inference(encoder.to(dev), fold=fold_bn)
    return torch.compile(encoder, dynamic=True) if compile_model else encoder


def encode_slides(slides: Sequence[str | os.PathLike], out: str | os.PathLike, encoder: Encoder, params: TilingParams, *,
                  batch_size: int = 64, workers: int | None = None, precision: str = "auto", device: str = "auto",
                  slide_mpp: float | str | None = None, overlays: bool = True, seed: int | None = 0,
                  progress: Callable[[str, int, int], None] | None = None, compile_model: bool = False,
                  direct: bool = True, rank: RankInfo | None = None, tile_workers: int | None = None,
                  tile_ahead: bool | None = None, fold_bn: bool | None = None,
                  decode_device: str | None = None, downsample: str = "box") -> EncodeResult:
    """Tile (or reuse tiles) and encode every slide into ``out/features/<slide_id>.h5``.

    ``workers``: reader processes (0: read in this process; None: sized to the machine, see
    :func:`~gigaslide.features.parallel.auto_workers`). ``direct=False`` reads through OpenSlide
    only. ``rank`` defaults to the torchrun / SLURM environment. ``tile_workers``: processes that tile the
    slides without a tile grid (None: this rank's cores before encoding starts, half of them while it runs;
    0 or 1: one after another here). ``tile_ahead``: tile those slides while earlier ones are encoded instead of
    all before the first forward pass (None: on CUDA with one rank, where the cores are free while the GPU works;
    on a CPU the model's threads use them, and a second busy process slows every OpenMP region). ``fold_bn``: run
    the encoder with its batch norms folded into its convolutions (:mod:`gigaslide.encoders.inference`; faster per
    tile, the same features within float rounding); None (default): folded, whatever the run's size, so a slide
    gets bit-identical features whatever else the run holds (folding costs tens of ms once per job); False: not.
    Each feature file's ``bn_folded`` attribute, ``EncodeResult.bn_folded`` and the manifest's config say which ran.
    ``decode_device``: decode the stored JPEG tiles on this device (``"cuda"``: nvJPEG) in this process instead of
    reader processes (:mod:`gigaslide.slides.device_decode`; slides it cannot decode are read on the CPU); the
    features' ``reader`` attribute says which ran. ``benchmarks/gpu_check.sh`` measures whether it pays.
    ``downsample``: ``box`` (default) or ``dct`` -- how reads at 2, 4 or 8 times a pyramid level's resolution are
    reduced (:mod:`gigaslide.slides.reader`); features record the option and what each slide got, and features
    made with the other option are encoded again.
    """
    t_start = time.perf_counter()
    out = atomic.ensure_writable_dir(out)
    rank = rank or rank_info()
    dev = rank_device(device, rank)
    workers = auto_workers(dev, rank) if workers is None else workers
    if downsample not in DOWNSAMPLE_MODES:
        raise GigaslideError(f"--downsample {downsample}: unknown", fix="use box (the default) or dct")
    if downsample == "dct" and decode_device is not None:
        raise GigaslideError("--downsample dct decodes on the CPU: the GPU decoder has no DCT scaling",
                             fix="drop --decode-device, or use --downsample box")
    dec = None if decode_device is None else _decode_device(decode_device, dev)
    if dec is not None:
        workers = 0  # tiles are decoded on the device, in this process
    manifest = Manifest(out / "manifest.json", {
        "command": "encode", "encoder": encoder.spec.name, "weights": encoder.weights_id, **params.as_dict(),
        "batch_size": batch_size, "workers": workers, "precision": precision, "device": str(dev), "world": rank.world,
        "decode_device": decode_device, "downsample": downsample,
        "bn_folded": None})  # set below, once the model is prepared (an encoder without batch norms: False)
    run = _Run(out, encoder, params, manifest, slide_mpp, overlays, rank, progress, tile_workers, downsample, precision)
    res = run.res
    # one rank only: ranks order slides by tile count (longest first), which needs every slide tiled first
    ahead = (dev.type == "cuda" and rank.world == 1) if tile_ahead is None else bool(tile_ahead)
    t_tiling = time.perf_counter()
    jobs = run.collect(slides, tile=not ahead)
    res.tiling_seconds = time.perf_counter() - t_tiling
    untiled = {id(j) for j in jobs if not j.tiled}
    if jobs:  # a batch never spans two slides: at most the largest slide's tiles (any size while some are untiled)
        per_batch = batch_size if untiled else min(batch_size, max(j.n for j in jobs))
        _check_batch_memory(per_batch, params.tile_size, workers, available_memory())
    total = sum(j.n for j in jobs)  # grows as untiled slides are tiled
    model = _prepare(encoder, dev, compile_model, fold_bn is not False)
    res.bn_folded = manifest.data["config"]["bn_folded"] = bool(getattr(model, "bn_folded", False))
    ahead_workers = 0
    if ahead:
        ahead_workers = tile_workers if tile_workers is not None else max(
            1, tiling_workers(len(jobs), ranks_per_node=rank.local_world) // 2)
    claims = run.claims(jobs, tile_ahead=ahead_workers)
    held: list[SlideJob] = []  # claimed, by key
    with _children_ignore_ctrl_c():
        pool = ReaderPool(workers, slot_bytes=batch_size * params.tile_size**2 * 3, decode_device=dec)
    inflight = pool.max_pending
    cur: list[Any] = [None, 0]  # job being submitted, next start
    waiting = False  # the claims said: others still hold slides (rank 0 of several)

    def top_up() -> None:
        nonlocal total, waiting
        while pool.pending < inflight:
            job, start = cur
            if job is None or start >= job.n:
                job = next(claims, None)
                waiting = job is _WAIT
                if job is None or waiting:
                    return
                held.append(job)
                total += job.n if id(job) in untiled else 0
                job.t0 = time.perf_counter()
                cur[:] = [job, 0]
                start = 0
            stop = min(start + batch_size, job.n)
            pool.submit(ReadTask((len(held) - 1, start), job.path, job.grid.coords[start:stop], params.tile_size, params.mpp,
                                 slide_mpp, job.slide_id, direct=direct, downsample=downsample,
                                 background=job.grid.edge_fill))
            cur[1] = stop

    choice: PrecisionChoice | None = None
    done_tiles, beat = 0, time.monotonic()
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gigaslide-write")
    writes: list[Future] = []
    try:
        top_up()
        while pool.pending or waiting:
            if not pool.pending:  # nothing of this rank's left: the other ranks' slides are settled or taken over
                time.sleep(WAIT_S)
                top_up()
                continue
            task, px, info = pool.get()  # px is valid until the next get
            top_up()  # keep the readers busy while the model runs
            k, start = task.key
            job = held[k]
            if job.failed:
                continue
            if isinstance(px, str):
                run.fail(job, px)
                continue
            job.info = job.info or info
            on_host = dev.type == "cuda" and px.device.type == "cpu"  # else made on the device (--decode-device)
            x = px.pin_memory().to(dev, non_blocking=True) if on_host else px.to(dev)
            if choice is None:
                choice = choose_precision(dev, precision, probe=lambda: model(x[:8]))
                res.precision, res.bf16_cosine, res.precision_choice = choice.resolved, choice.bf16_cosine, choice.record()
            with torch.inference_mode(), autocast_ctx(dev, choice.resolved):
                job.feats.append(model(x))
            done_tiles += len(px)
            if progress:
                progress(job.slide_id, done_tiles, max(total, done_tiles))
            if time.monotonic() - beat > HEARTBEAT_S:
                beat = time.monotonic()
                for j in held:
                    if j.lock is not None and j.lock.held:
                        j.lock.refresh()
            if start + len(px) >= job.n:  # written by a thread while the next slide is encoded
                feats = torch.cat(job.feats).float().cpu().numpy()
                job.feats.clear()
                bad = nonfinite_error(feats, choice.resolved, what=f"slide {job.slide_id}", path=job.path,
                                      coords=job.grid.coords)
                if bad is not None:  # NaN / Inf features are never written: the slide fails, the others go on
                    run.fail(job, bad.one_line())
                    continue
                for f in [f for f in writes if f.done()]:
                    writes.remove(f)
                    f.result()  # a write that failed (e.g. a full disk) stops the job here
                writes.append(writer.submit(_finish, run, job, feats, choice, seed))
        for f in writes:
            f.result()
    finally:
        claims.close()  # stops the background tiler, if any (its slides' locks released)
        writer.shutdown(wait=True)
        pool.close()
        run.release_all(held)
        manifest.flush()
    if run.waits:
        run.settle()
    run.find_mixed()
    res.seconds = time.perf_counter() - t_start
    return res


def _finish(run: _Run, job: SlideJob, feats: np.ndarray, choice: PrecisionChoice, seed: int | None) -> None:
    grid = job.grid
    scan = run.scan(job)  # the identity the slide's grid and features were checked against
    attrs = _feature_attrs(run.encoder, run.params, grid, choice, seed, job.info, run.downsample, slide_path=job.path,
                           bn_folded=run.res.bn_folded, identity=None if scan is None else scan.identity)
    path = store.save(layout(run.out, job.slide_id)["features"], feats, grid.coords, attrs=attrs,
                      coords_attrs=coords_attrs(grid))
    secs = time.perf_counter() - job.t0
    run.manifest.set(job.slide_id, "done", path=job.path, tiles=len(feats), seconds=round(secs, 3), file_stamp=file_stamp(path),
                     precision=choice.record(), read_mpp=job.info.get("read_mpp"), reader=_reader_name(job.info),
                     rank=run.rank.rank, stain=grid.extra.get("stain"), background=grid.extra.get("background"),
                     stain_warning=grid.extra.get("stain_warning"), made_with=run.made_with)
    with contextlib.suppress(FileNotFoundError):
        run.failed_mark(job.slide_id).unlink()  # an earlier job's failure of this slide
    job.lock.release()
    job.grid = None  # encoded: its grid is not needed again
    run.res.done.append(job.slide_id)
    run.res.tiles += len(feats)


__all__ = ["EncodeResult", "SlideJob", "encode_slides", "file_stamp", "is_finished", "pick_device"]

"""Per-item lock files, so several processes (or SLURM / torchrun ranks) can share one output folder.

A lock is a small JSON file (``pid``, ``host``, process start time, creation time) created with
``O_CREAT | O_EXCL``: only one process can hold it. A lock is *stale* — and is taken over — when
its owner is on this host and no longer runs (the pid is gone, or now belongs to a process started
at another time), or when it is on another host and has not been refreshed for ``stale_after``
seconds (owners call :meth:`ItemLock.refresh` as a heartbeat). Checking and breaking a stale lock
happen under an ``flock`` on ``<dir>/.guard`` so two processes never both take it over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: A lock from another host is stale after this many seconds without a heartbeat.
STALE_AFTER_S = 600.0
#: A lock file that cannot be parsed is only taken over once it is this old (it may be being written).
UNREADABLE_GRACE_S = 10.0


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), None where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """Process start time in clock ticks since boot (Linux), to tell a reused pid from the owner."""
    fields = _stat(pid)
    return None if fields is None else fields[19]


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:  # kill(0 or -1, 0) asks about a whole process group / every process: never an owner
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user has the pid now: its start time still tells (/proc is
        pass  # readable), so a pid reused by someone else's process does not keep a dead owner's lock forever
    fields = _stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent: kill(pid, 0) still
        return False  # succeeds and the start time is the owner's, but it holds nothing any more
    now = None if fields is None else fields[19]
    return start is None or now is None or now == start


def owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid), "time": time.time()}


class ItemLock:
    """A non-blocking lock on one item (e.g. a slide id) in ``directory``."""

    def __init__(self, directory: str | os.PathLike, name: str, *, stale_after: float = STALE_AFTER_S):
        self.directory = Path(directory)
        self.path = self.directory / f"{name}.lock"
        self.stale_after = stale_after
        self.held = False
        self.took_over = False  # acquired from a dead / stale holder (which may have left temporaries behind)

    def owner(self) -> dict[str, Any] | None:
        """The holder's record, ``{}`` when the file exists but cannot be read, None when unlocked."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, rec: dict[str, Any] | None = None) -> bool:
        rec = self.owner() if rec is None else rec
        if rec is None:
            return False
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if not rec:
            return age > UNREADABLE_GRACE_S
        if rec.get("host") == socket.gethostname():
            return not _alive(int(rec.get("pid", -1)), rec.get("start"))
        return age > self.stale_after

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(owner_record(), fh)
        self.held = True
        return True

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; False when another live process holds it."""
        if self.held:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._create():
            return True
        with file_lock(self.directory / ".guard"):
            rec = self.owner()
            if rec is None or self.is_stale(rec):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self.took_over = self._create() and rec is not None
                return self.held
        return False

    def refresh(self) -> None:
        """Heartbeat: mark the lock as in use now (for processes on other hosts)."""
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        rec = self.owner()
        if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def describe(self) -> str:
        rec = self.owner() or {}
        return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}"

    def __enter__(self) -> ItemLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """A blocking ``flock`` on ``path`` (created if needed): a short critical section across processes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class LockBusy(Exception):
    """:func:`exclusive_file` without waiting found the lock held; ``holder`` names the process (its record)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_file(path: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """A ``flock`` on ``path`` (created if needed) held for one item's work across processes (and threads: each call
    opens its own descriptor), with the holder's pid and host written in it, and removed when released, so no lock
    files pile up: a process that locked the file just removed (its inode is no longer the path's) tries again on the
    new one. ``wait=False``: :class:`LockBusy` naming the holder instead of waiting. Yields True, or False on a file
    system without locks (nothing is then held)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(p))
            except FileNotFoundError:
                same = False
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() if busy else ""
            os.close(fd)
            if busy:
                raise LockBusy(holder or "another process") from None
            yield False  # no locks on this file system (ENOLCK, ENOTSUP): unguarded, as the run folders' lock
            return
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(p)  # while still held: a process waiting on this inode sees it is gone
        os.close(fd)


#: How often a worker process looks whether the process that started it is still there (:func:`exit_with_parent`).
PARENT_POLL_S = 1.0


def exit_with_parent(parent: int) -> None:
    """In a worker process: exit once ``parent`` is gone, and leave Ctrl-C to it. A parent killed outright
    (``kill -9``, the OOM killer) runs no cleanup, and a forked worker holds the write end of its own task queue, so it
    never sees the queue close: it waited forever, holding its memory (a slide reader ~450 MB) and the parent's stdout
    (``gigaslide tile ... | tee log`` never ended). Ctrl-C reaches the whole process group: the parent stops the
    workers, which would otherwise each print a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent:  # gone already, before this thread could watch
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="gigaslide-parent-watch", daemon=True).start()


#: Longest path a Unix socket may have on Linux (``sun_path`` holds 108 bytes with its terminating NUL).
AF_UNIX_PATH_MAX = 107
#: What multiprocessing appends to its temp folder's parent for a socket: ``/pymp-XXXXXXXX/listener-XXXXXXXX``.
_MP_SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def socket_safe_tempdir() -> str | None:
    """Before starting worker processes: make sure multiprocessing's temp folder is short enough for its sockets.

    Workers hand tensors back (data loaders; a slide reader's oversized batch) through a Unix socket that
    multiprocessing makes in ``TMPDIR/pymp-XXXXXXXX/`` (so does a forkserver). Under a ``TMPDIR`` longer than about
    75 characters (a deep scratch folder, a test's ``tmp_path``) that path exceeds what AF_UNIX allows: each worker
    died with ``OSError: AF_UNIX path too long`` and the job failed after a minute-long wait with a DataLoader
    traceback. There, the folder is made in the first of ``/tmp``, ``/var/tmp``, ``/usr/tmp`` that is writable (what
    Python 3.13 does by itself) and removed at exit as multiprocessing removes its own. Returns the folder chosen
    (None: nothing to do -- not Linux/macOS, already chosen, or ``TMPDIR`` short enough)."""
    import multiprocessing.process as mp_process
    import multiprocessing.util as mp_util
    import shutil
    import tempfile

    if os.name != "posix":
        return None
    config = mp_process.current_process()._config  # noqa: SLF001 - where multiprocessing.util.get_temp_dir keeps it
    if config.get("tempdir") is not None:
        return None
    if len(os.fsencode(tempfile.gettempdir())) + _MP_SOCKET_SUFFIX <= AF_UNIX_PATH_MAX:
        return None
    for base in ("/tmp", "/var/tmp", "/usr/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            folder = tempfile.mkdtemp(prefix="pymp-", dir=base)
            mp_util.Finalize(None, mp_util._remove_temp_dir, args=(shutil.rmtree, folder),  # noqa: SLF001
                             exitpriority=-100)
            config["tempdir"] = folder
            return folder
    return None


__all__ = ["AF_UNIX_PATH_MAX", "PARENT_POLL_S", "STALE_AFTER_S", "ItemLock", "LockBusy", "exclusive_file",
           "exit_with_parent", "file_lock", "owner_record", "socket_safe_tempdir"]

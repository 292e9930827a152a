"""What an export holds while it writes: its output (one export at a time) and the signals that stop it.

:func:`exclusive` holds a lock on a hidden ``.<name>.lock`` file beside the output, so a second export into the
same place is refused in one line instead of racing the first; holding it, the temporary files an export killed with
SIGKILL left for the same outputs (as large as what it wrote: an ``.h5ad`` holds every feature) are its own to remove
(:func:`clean_stale_tmp`). :func:`stops_on_signals` makes Ctrl-C / SIGTERM stop the export even where Python swallowed
their exception (raised inside a weakref callback of h5py / anndata: printed as "Exception ignored" with a traceback,
and the export went on to write its file and exit 0).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.locks import LockBusy, exclusive_file


@contextlib.contextmanager
def exclusive(lock: Path, what: str | os.PathLike) -> Iterator[bool]:
    """Hold ``lock`` (:func:`gigaslide.locks.exclusive_file` without waiting: created, and removed again when done)
    for this process, or a one-line error naming the process that holds it. Yields whether the lock is held: False on
    a file system without locks (the export then runs unguarded, and must not remove temporary files, which may be
    another live export's)."""
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(exclusive_file(lock, wait=False))
        except LockBusy as e:
            raise GigaslideError(f"another export is writing there ({e.holder}): two exports would race", path=what,
                                 fix="wait for it to finish (or stop it), or choose another --out") from None
        yield held


def clean_stale_tmp(folder: Path, names: Iterable[str], suffix: str = "") -> int:
    """Remove the temporary files (``.tmp-<name>.<random><suffix>``, :func:`gigaslide.atomic.atomic_path`) an
    interrupted export left for the outputs ``names`` of ``folder`` (one listing); returns how many were removed.
    Only while :func:`exclusive` holds the folder's export lock: then no live export writes them."""
    wanted = set(names)
    n = 0
    try:
        with os.scandir(folder) as it:
            found = [e.name for e in it if e.name.startswith(atomic.TMP_PREFIX) and e.name.endswith(suffix)]
    except OSError:
        return 0
    for name in found:
        stem = name[len(atomic.TMP_PREFIX):len(name) - len(suffix)]
        if stem.rpartition(".")[0] in wanted:  # the random part has no dot
            with contextlib.suppress(OSError):
                (folder / name).unlink()
                n += 1
    return n


class Stop:
    """The Ctrl-C / SIGTERM an export received (see :func:`stops_on_signals`)."""

    def __init__(self) -> None:
        self.got: list[int] = []
        self.defer = False

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def check(self) -> None:
        """Raise the stop a signal asked for (its exception swallowed, or deferred): at safe points, before a rename."""
        if self.got:
            self._raise(self.got[0])

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal only noted while a library writes (h5py / anndata: its exception would surface in one of their
        weakref callbacks, printed as "Exception ignored" with a traceback, and be lost); raised when it returns."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        self.check()

    def handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.got.append(signum)
        if not self.defer:
            self._raise(signum)


@contextlib.contextmanager
def stops_on_signals() -> Iterator[Stop]:
    """Ctrl-C (KeyboardInterrupt) and SIGTERM (``SystemExit(143)``: ``kill``, a batch system's time limit; Python's
    default would end the process before the temporary file is removed) stop the export, also where Python swallowed
    their exception: call ``stop.check()`` at safe points (after each file written, before the rename)."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set in the main thread
        yield stop
        return
    # a signal ignored (SIG_IGN: nohup, a background job of a script) stays ignored
    before = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)
              if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield stop
    finally:
        for s, h in before.items():
            signal.signal(s, h)

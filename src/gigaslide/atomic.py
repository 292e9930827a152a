"""Atomic writes: every artifact is written to a temporary file beside its target, then renamed.

A crash leaves either the old file or the new one, never a half-written one (the new file's data is flushed to
the disk before the rename, so this also holds after a power loss); temporary files
carry a ``.tmp-`` prefix so a resumed job can recognise and remove them. Files get the mode an ordinary
``open(..., "w")`` gives them (0666 less the umask: ``-rw-r--r--`` under umask 022), not the private 0600 of
the temporary file they were written as.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError

TMP_PREFIX = ".tmp-"


def _umask_now() -> int | None:
    """The process's umask as Linux reports it (``/proc/self/status``), without setting it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    m = _umask_now()
    if m is None:  # os.umask only reads it by setting it: once, at import, and put back at once
        m = os.umask(0o022)
        os.umask(m)
    return m


#: Where the umask cannot be read without setting it (not Linux), the one it had when this module was imported.
_UMASK = _umask_at_import()


def file_mode() -> int:
    """Mode of a new file: 0666 less the current umask (read at import where it cannot be read without setting it)."""
    m = _umask_now()
    return 0o666 & ~(_UMASK if m is None else m)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check we can write into it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
        if blocker is not None:  # mkdir's own words ("File exists", "Not a directory") do not say which
            raise GigaslideError(f"cannot create output directory: {blocker} is a file, not a folder", path=p,
                                 fix="give an output folder path (a new or existing folder), not a file") from None
        raise GigaslideError(f"cannot create output directory ({e.strerror})", path=p,
                             fix="choose an output directory you can write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise GigaslideError("output directory is not writable", path=p,
                             fix="choose an output directory you can write to (check permissions)")
    return p


#: errno of a storage fault -> how to fix it. Raised while writing, they become one GigaslideError line
#: naming the file (the half-written temporary file is removed; the old target, if any, is untouched).
STORAGE_FIXES = {
    errno.ENOSPC: "free disk space (or write to another --out) and re-run (files written completely are kept)",
    errno.EDQUOT: "free space within your disk quota (or write to another --out) and re-run",
    errno.EFBIG: "the file system cannot hold a file this large; write to another --out",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EACCES: "check the folder's permissions, or choose an output folder you can write to",
    errno.EPERM: "check the folder's permissions, or choose an output folder you can write to",
    errno.EIO: ("the disk or network share reported an I/O error: check it, then re-run (files written completely "
                "are kept)"),
}


#: How Rust's I/O errors end, e.g. safetensors' ``SafetensorError: ... No space left on device (os error 28)`` (not an
#: OSError, so its errno is only in the text).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def storage_error(e: BaseException, target: str | os.PathLike) -> GigaslideError | None:
    """A one-line error for a storage fault while writing ``target``; None for other errors. Besides OSErrors this
    reads the errno of errors raised by Rust writers (safetensors' ``save_file``), which say ``(os error N)``."""
    if isinstance(e, OSError):
        code, reason = e.errno, e.strerror
    elif isinstance(e, Exception) and (m := _RUST_OS_ERROR.search(str(e))) is not None:
        code, reason = int(m.group(1)), None
    else:
        return None
    fix = STORAGE_FIXES.get(code) if code is not None else None
    if fix is None:
        return None
    return GigaslideError(f"cannot write ({reason or os.strerror(code)})", path=target, fix=fix)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success.

    A storage fault (disk full, quota, read-only, permission, I/O error) while writing becomes one
    :class:`GigaslideError` line naming ``target``; the temporary file never stays behind. The temporary file
    (created 0600 by :func:`tempfile.mkstemp`) gets :func:`file_mode` first, so ``target`` has an ordinary file's
    mode; writers that truncate it in place (``open(tmp, "w")``, ``h5py.File(tmp, "w")``) keep that mode."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    tmp_path: Path | None = None
    try:  # from the file's creation on: a Ctrl-C right after mkstemp must not leave an empty temporary behind
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", suffix=suffix, dir=target.parent)
        tmp_path = Path(tmp)
        os.close(fd)
        os.chmod(tmp_path, file_mode())
        yield tmp_path
        os.chmod(tmp_path, file_mode())  # again: a writer that replaced the file (safetensors' save_file) made it 0600
        _fsync(tmp_path)  # the bytes reach the disk before the name does: a power cut never leaves an empty target
        os.replace(tmp_path, target)
    except BaseException as e:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        err = storage_error(e, target)
        if err is None:
            raise
        raise err from None


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to the disk (0.1-0.3 ms per artifact here: benchmarks/results/atomic.md). Renaming
    without it can leave a zero-length target after a power loss or a node crash on file systems that reorder data
    and metadata (XFS, ext4 without auto_da_alloc); a kill -9 alone cannot, the page cache survives it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def h5_file(target: str | os.PathLike) -> Iterator[Any]:
    """An ``h5py.File`` built in memory, its bytes then written to ``target`` atomically (:func:`atomic_path`).

    The HDF5 library never writes to the disk itself: a disk that filled up under it (ENOSPC inside ``H5Fclose``)
    raised a multi-line RuntimeError traceback, h5py's own "Exception ignored" tracebacks and then a segmentation
    fault at exit; a plain write of the bytes fails with an OSError that ``atomic_path`` turns into one line naming
    the file (the temporary removed). Costs one in-memory copy of the file while it is written."""
    import h5py

    with atomic_path(target, suffix=".h5") as tmp:
        with h5py.File(tmp, "w", driver="core", backing_store=False) as f:  # in memory: HDF5 never opens ``tmp``
            yield f
            f.flush()
            image = f.id.get_file_image()
        with open(tmp, "wb") as fh:
            fh.write(image)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: With ``cached=True``, :func:`clean_stale_tmp_for` lists a folder again after this many seconds.
TMP_LISTING_TTL_S = 300.0
_tmp_listings: dict[Path, tuple[float, set[str]]] = {}  # folder -> (monotonic time listed, temporary names then)
_tmp_guard = threading.Lock()


def clean_stale_tmp_for(target: str | os.PathLike, *, cached: bool = False) -> int:
    """Remove temporary files an interrupted run left for ``target`` only (safe beside other live runs
    that write other targets into the same folder); returns how many were removed.

    ``cached=True`` (a batch job cleaning before each of its n items): each process lists a folder once per
    :data:`TMP_LISTING_TTL_S` and removes ``target``'s names from that listing (files older than it, so never a
    temporary file another live run made since). Listing per item made a batch quadratic in its size: a folder of n
    outputs is O(n) to list (10 ms at 6,000 entries, 70 ms at 60,000 here, more on network storage). An item whose
    last run may have died after the listing (taken over from a dead lock, redone) wants the default: a fresh look."""
    t = Path(target)
    if not cached:
        n = 0
        if t.parent.is_dir():
            for f in t.parent.glob(TMP_PREFIX + glob.escape(t.name) + ".*"):
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
        return n
    folder, prefix = t.parent, TMP_PREFIX + t.name + "."
    with _tmp_guard:
        now = time.monotonic()
        seen = _tmp_listings.get(folder)
        if seen is None or now - seen[0] > TMP_LISTING_TTL_S:
            try:
                with os.scandir(folder) as it:
                    names = {e.name for e in it if e.name.startswith(TMP_PREFIX)}
            except OSError:  # no folder yet: nothing left behind in it
                names = set()
            seen = _tmp_listings[folder] = (now, names)
        mine = [n for n in seen[1] if n.startswith(prefix)]
        seen[1].difference_update(mine)
    n = 0
    for name in mine:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
            n += 1
    return n


#: safetensors' ``save_file`` writes its own temporary (Rust's tempfile: ``.tmp`` + 6 letters or digits) beside the
#: file it was given, then renames it there: a kill during that write leaves one as large as the tensors.
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def clean_stale_tmp(directory: str | os.PathLike) -> int:
    """Remove temporary files left by an interrupted run (ours and safetensors' own); returns how many were
    removed."""
    n = 0
    d = Path(directory)
    if d.is_dir():
        for f in d.glob(".tmp*"):
            if f.name.startswith(TMP_PREFIX) or _SAFETENSORS_TMP.fullmatch(f.name):
                with contextlib.suppress(OSError):
                    f.unlink()
                    n += 1
    return n

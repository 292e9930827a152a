"""Atomic writes: every artifact is written to a temporary file beside its target, then renamed.

A crash leaves either the old file or the new one, never a half-written one; temporary files
carry a ``.tmp-`` prefix so a resumed job can recognise and remove them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError

TMP_PREFIX = ".tmp-"


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check we can write into it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GigaslideError(f"cannot create output directory ({e.strerror})", path=p,
                             fix="choose an output directory you can write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise GigaslideError("output directory is not writable", path=p,
                             fix="choose an output directory you can write to (check permissions)")
    return p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


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


def clean_stale_tmp(directory: str | os.PathLike) -> int:
    """Remove temporary files left by an interrupted run; returns how many were removed."""
    n = 0
    d = Path(directory)
    if d.is_dir():
        for f in d.glob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                f.unlink()
                n += 1
    return n

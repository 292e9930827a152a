"""One provenance schema for every artifact that crosses a stage boundary.

Every file written between stages (patches, features, encoder exports, augment caches, slide
embeddings, predictions, runs) carries a :class:`Provenance` record: what kind of artifact it is,
the gigaslide and format versions, when it was made, and the facts a later stage must agree on —
``mpp`` (µm/px of the pixels it was computed from), ``tile_size`` (px at that mpp), ``encoder`` and
``encoder_weights_sha256``, ``seed`` and the ``run`` it came from. Stage-specific keys go in
``extra``. A fact that is unknown is *absent* (None), never 0.

:func:`read_provenance` reads the record back from any artifact (HDF5 attributes, a JSON file, a
run or export folder, or the ``<name>.provenance.json`` sidecar of a CSV), and :func:`check_same`
refuses to combine artifacts whose encoder, weights, mpp or tile size differ, naming two of them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gigaslide import __version__
from gigaslide.errors import GigaslideError

#: Bumped whenever an on-disk layout changes incompatibly.
FORMAT_VERSION = 1
#: The facts two artifacts must share to be used together (e.g. feature files of one MIL run).
COMPAT_KEYS = ("encoder", "encoder_weights_sha256", "mpp", "tile_size")
#: Files a folder artifact keeps its record in, in the order they are looked for.
FOLDER_RECORDS = ("run.json", "encoder.json", "manifest.json", "cache.json")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Provenance:
    """The provenance record of one artifact (see the module docstring)."""

    kind: str
    gigaslide_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=_now)
    seed: int | None = None
    mpp: float | None = None
    tile_size: int | None = None
    encoder: str | None = None
    encoder_weights_sha256: str | None = None
    run: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (standard keys, then ``extra``) with unknown values dropped — for HDF5 attrs or JSON."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | os.PathLike | None = None) -> Provenance:
        """The record of a flat dict written by :meth:`to_dict` (or by an older gigaslide / another tool); a field
        of the wrong type (``tile_size = "abc"``, ``seed = 2.5``: a hand-edited or another tool's record) is one
        :class:`GigaslideError` naming the field and ``path``."""
        std = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {k: d[k] for k in std if k in d and d[k] is not None}
        kw.setdefault("kind", "unknown")
        for k in ("mpp",):  # legacy files wrote a missing mpp as 0
            if k in kw and (not _finite(kw[k]) or float(kw[k]) <= 0):
                del kw[k]
        if "mpp" in kw:
            kw["mpp"] = float(kw["mpp"])
        for k in ("tile_size", "seed", "format_version"):
            if k in kw:
                kw[k] = _whole(kw[k], k, path)
        extra = {k: v for k, v in d.items() if k not in std and v is not None}
        return cls(**kw, extra=extra)

    def with_extra(self, **extra: Any) -> Provenance:
        return replace(self, extra={**self.extra, **{k: v for k, v in extra.items() if v is not None}})

    def get(self, key: str, default: Any = None) -> Any:
        if key in {f.name for f in fields(self)} - {"extra"}:
            v = getattr(self, key)
            return default if v is None else v
        return self.extra.get(key, default)


def check_format(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse an artifact whose ``format_version`` is newer than this gigaslide reads (a newer gigaslide wrote it):
    one line naming the file, instead of a misread layout. Records without one (older files, other tools) pass."""
    v = record.get("format_version")
    try:
        newer = v is not None and int(v) > FORMAT_VERSION
    except (TypeError, ValueError):
        newer = True
    if newer:
        raise GigaslideError(f"written in format version {v!r}; this gigaslide {__version__} reads format "
                             f"{FORMAT_VERSION} and older", path=path,
                             fix="upgrade gigaslide (pip install -U gigaslide) to read it, or re-make it with this one")


def _whole(v: Any, key: str, path: str | os.PathLike | None) -> int:
    try:
        f = float(v)
        if f.is_integer():
            return int(f)
    except (TypeError, ValueError, OverflowError):
        pass
    raise GigaslideError(f"provenance field {key} = {str(v)[:40]!r} is not a whole number", path=path,
                         fix="re-make the file with gigaslide (its record was edited or written by another tool)")


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, the one content hash provenance records (weights, annotations, inputs); cached per
    path, size, mtime, ctime and inode within a process, so checking a file again does not read it again; any write
    (also one that puts the old mtime back, as ``cp -p`` and ``rsync -t`` do) or a replaced file is read again."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise GigaslideError(f"cannot read ({e.strerror})", path=p, fix="check the path") from None
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def provenance(kind: str, **fields_: Any) -> dict[str, Any]:
    """Shorthand: ``Provenance(kind, <standard keys>, extra=<the rest>).to_dict()``."""
    std = {f.name for f in fields(Provenance)} - {"extra", "kind"}
    kw = {k: v for k, v in fields_.items() if k in std}
    extra = {k: v for k, v in fields_.items() if k not in std}
    return Provenance(kind, **kw, extra=extra).to_dict()


def decode_attrs(attrs: Any) -> dict[str, Any]:
    """HDF5 attrs -> plain Python (bytes -> str, numpy scalars -> Python, arrays -> lists)."""
    import numpy as np

    out: dict[str, Any] = {}
    for k, v in dict(attrs).items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def sidecar(path: str | os.PathLike) -> Path:
    """Where a CSV (or any file without metadata) keeps its record: ``<stem>.provenance.json``."""
    p = Path(path)
    return p.with_name(p.stem + ".provenance.json")


def write_sidecar(path: str | os.PathLike, record: Provenance | Mapping[str, Any]) -> Path:
    from gigaslide import atomic

    d = record.to_dict() if isinstance(record, Provenance) else dict(record)
    return atomic.write_json(sidecar(path), d)


def read_provenance(path: str | os.PathLike) -> Provenance:
    """The provenance record of any gigaslide artifact (file or folder)."""
    p = Path(path)
    if p.is_dir():
        for name in FOLDER_RECORDS:
            if (p / name).is_file():
                return read_provenance(p / name)
        raise GigaslideError("folder holds no provenance record", path=p,
                             fix=f"pass a folder written by gigaslide (with one of {', '.join(FOLDER_RECORDS)})")
    if not p.is_file():
        raise GigaslideError("file not found", path=p, fix="check the path")
    suffix = p.suffix.lower()
    if suffix in (".h5", ".hdf5", ".h5ad"):
        import h5py

        try:
            with h5py.File(p, "r") as f:
                return Provenance.from_dict(decode_attrs(f.attrs), p)
        except OSError as e:
            raise GigaslideError(f"cannot read HDF5 ({str(e).splitlines()[0]})", path=p,
                                 fix="the file is truncated or not HDF5; re-create it") from None
    if suffix == ".json":
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise GigaslideError(f"not valid JSON ({e})", path=p, fix="re-create the file with gigaslide") from None
        if isinstance(d, dict) and isinstance(d.get("provenance"), dict):
            d = d["provenance"]
        if not isinstance(d, dict):
            raise GigaslideError("JSON holds no provenance record", path=p, fix="pass a file written by gigaslide")
        return Provenance.from_dict(d, p)
    if sidecar(p).is_file():
        return read_provenance(sidecar(p))
    raise GigaslideError("no provenance record for this file", path=p,
                         fix=f"keep its sidecar {sidecar(p).name} beside it, or re-create it with gigaslide")


def _same(a: Any, b: Any, key: str) -> bool:
    if a is None or b is None:
        return a is b
    if key == "mpp":
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def check_same(records: Iterable[tuple[str | os.PathLike, Provenance]], keys: Iterable[str] = COMPAT_KEYS,
               where: str | os.PathLike | None = None) -> None:
    """Refuse artifacts that disagree on any of ``keys``, naming the first two that differ."""
    items = list(records)
    if len(items) < 2:
        return
    first_path, first = items[0]
    for key in keys:
        for path, rec in items[1:]:
            if not _same(first.get(key), rec.get(key), key):
                raise GigaslideError(
                    f"{Path(first_path).name} and {Path(path).name} differ in {key} "
                    f"({first.get(key)!r} vs {rec.get(key)!r}): they cannot be used together", path=where,
                    fix="keep one encoder / weights / mpp / tile size per folder (encode each setting into its own --out)")


__all__ = ["COMPAT_KEYS", "FORMAT_VERSION", "Provenance", "check_format", "check_same", "decode_attrs", "provenance",
           "read_provenance", "sidecar", "write_sidecar"]

"""A run manifest: one JSON file recording every slide's status, error and timing.

Each slide's update is appended at once, as one JSON line, to a journal beside the manifest
(``.manifest.json.journal``), so an interrupted batch still shows exactly what finished; the merged
``manifest.json`` is rewritten atomically from it, at most :data:`REWRITE_SHARE` of the wall time
(a rewrite costs O(slides), so one per slide made a batch quadratic in its size:
``benchmarks/results/manifest.md``) and always by :meth:`Manifest.flush` at the end of a job, which
removes the journal. Reading a manifest with :func:`read_slides` (or opening one with :class:`Manifest`) replays
a journal left by a killed job, so nothing a dead process recorded is lost.

Several processes may write one manifest (two ``encode`` runs on one folder, or the ranks of a
``torchrun`` / SLURM job): every append and rewrite happens under one file lock, each process
changes only its own slides' entries, and the file always holds every process's slides.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from gigaslide import __version__, atomic
from gigaslide.files import shown_name
from gigaslide.locks import file_lock

#: At most this share of a job's wall time goes to rewriting manifest.json (appends to the journal are O(1)).
REWRITE_SHARE = 0.05


def journal_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.journal")


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _apply(slides: dict[str, Any], slide_id: str, entry: dict[str, Any], keep_done: bool) -> None:
    if keep_done and slides.get(slide_id, {}).get("status") == "done":
        return
    slides[slide_id] = entry


def read_slides(path: str | os.PathLike, problems: list[str] | None = None) -> dict[str, Any]:
    """Every slide's entry: ``manifest.json``'s, updated by its journal's lines in order (a torn last line is
    skipped). Empty when neither file can be read; a damaged manifest is rebuilt from the journal alone (and
    named in ``problems`` when given)."""
    p = Path(path)
    slides: dict[str, Any] = {}
    try:
        slides = dict(json.loads(p.read_text()).get("slides", {}))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, TypeError):
        if problems is not None:
            problems.append(f"{p}: unreadable manifest (ignored)")
    with contextlib.suppress(OSError):
        for line in journal_path(p).read_text().splitlines():
            try:
                rec = json.loads(line)
                _apply(slides, str(rec["id"]), dict(rec["entry"]), bool(rec.get("keep_done")))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    return slides


class Manifest:
    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.data: dict[str, Any] = {"gigaslide_version": __version__, "config": config, "host": platform.node(),
                                     "slides": {}}
        self._pending = False  # journal lines of this process not yet merged into manifest.json
        self._last_rewrite = float("-inf")
        self._rewrite_cost = 0.0
        atomic.ensure_writable_dir(self.path.parent)
        with file_lock(_lock_path(self.path)):
            self.data["slides"] = read_slides(self.path)
            # manifest.json is rewritten only under this lock: a temporary file of it now is a killed run's
            atomic.clean_stale_tmp_for(self.path)

    def set(self, slide_id: str, status: str, *, keep_done: bool = False, **info: Any) -> None:
        """Record one slide; ``keep_done`` leaves an existing ``done`` entry (e.g. another process's) as it is."""
        entry = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 **{k: shown_name(v) if isinstance(v, str) else v for k, v in info.items()}}
        line = json.dumps({"id": slide_id, "entry": entry, "keep_done": keep_done}, default=str) + "\n"
        with file_lock(_lock_path(self.path)):
            try:
                with open(self.journal, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError as e:
                err = atomic.storage_error(e, self.journal)
                if err is None:
                    raise
                raise err from None
            _apply(self.data["slides"], slide_id, entry, keep_done)
            self._pending = True
            if (time.monotonic() - self._last_rewrite) * REWRITE_SHARE >= self._rewrite_cost:  # share 0: only at flush
                self._rewrite()

    def flush(self) -> None:
        """Merge the journal into ``manifest.json`` now (call at the end of a job; a no-op when nothing is pending)."""
        if self._pending:
            with file_lock(_lock_path(self.path)):
                self._rewrite()

    def save(self) -> None:
        with file_lock(_lock_path(self.path)):
            self._rewrite()

    def _rewrite(self) -> None:
        """Under the lock: manifest.json := every process's entries (file + journal); the journal is then removed."""
        t = time.monotonic()
        self.data["slides"] = read_slides(self.path)
        atomic.write_json(self.path, self.data)
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()  # a crash before this line replays entries manifest.json already has: same result
        self._pending = False
        self._last_rewrite = time.monotonic()
        self._rewrite_cost = self._last_rewrite - t

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.data["slides"].values():
            out[s["status"]] = out.get(s["status"], 0) + 1
        return out

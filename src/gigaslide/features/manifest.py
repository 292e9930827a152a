"""A run manifest: one JSON file recording every slide's status, error and timing.

Rewritten atomically after each slide, so an interrupted batch shows exactly what finished.
Several processes may write one manifest (two ``encode`` runs on one folder, or the ranks of a
``torchrun`` / SLURM job): each update re-reads the file under a lock and changes only its own
slide's entry, so the file always holds every process's slides.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from gigaslide import __version__, atomic
from gigaslide.locks import file_lock


class Manifest:
    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.data: dict[str, Any] = {"gigaslide_version": __version__, "config": config, "host": platform.node(),
                                     "slides": {}}
        self.data["slides"] = self._read_slides()

    def _read_slides(self) -> dict[str, Any]:
        if self.path.is_file():
            try:
                return dict(json.loads(self.path.read_text()).get("slides", {}))
            except (OSError, ValueError, AttributeError):
                pass  # a damaged manifest is rebuilt from scratch; finished feature files are still skipped
        return {}

    def set(self, slide_id: str, status: str, *, keep_done: bool = False, **info: Any) -> None:
        """Record one slide; ``keep_done`` leaves an existing ``done`` entry (e.g. another process's) as it is."""
        entry = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        with file_lock(self.path.with_name(f".{self.path.name}.lock")):
            slides = self._read_slides()
            if keep_done and slides.get(slide_id, {}).get("status") == "done":
                self.data["slides"] = slides
                return
            self.data["slides"] = {**slides, slide_id: entry}
            atomic.write_json(self.path, self.data)

    def save(self) -> None:
        with file_lock(self.path.with_name(f".{self.path.name}.lock")):
            self.data["slides"] = {**self._read_slides(), **self.data["slides"]}
            atomic.write_json(self.path, self.data)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.data["slides"].values():
            out[s["status"]] = out.get(s["status"], 0) + 1
        return out

"""A run manifest: one JSON file recording every slide's status, error and timing.

Rewritten atomically after each slide, so an interrupted batch shows exactly what finished.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from gigaslide import __version__, atomic


class Manifest:
    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.data: dict[str, Any] = {"gigaslide_version": __version__, "config": config, "host": platform.node(),
                                     "slides": {}}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
                self.data["slides"] = old.get("slides", {})
            except (OSError, ValueError):
                pass  # a damaged manifest is rebuilt from scratch; finished feature files are still skipped

    def set(self, slide_id: str, status: str, **info: Any) -> None:
        self.data["slides"][slide_id] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        self.save()

    def save(self) -> None:
        atomic.write_json(self.path, self.data)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.data["slides"].values():
            out[s["status"]] = out.get(s["status"], 0) + 1
        return out

"""The slides of encode output folders, listed without opening any of their files.

:func:`gigaslide.export.catalog.scan` reads the HDF5 attributes of every slide's features and patches file
(about 2 ms a file): with thousands of slides, seconds before the viewer's first page. Here a folder is
listed from ``manifest.json`` and its folders' file names alone; a slide's attributes (the slide path its
features record, its level-0 mpp) are read when the slide is first used (:meth:`Catalog.complete`), and a
completed entry equals the one ``scan`` makes (tests/viewer/test_api.py checks that).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError
from gigaslide.export.catalog import SlideEntry, _read_attrs, _slide_path
from gigaslide.features.manifest import read_slides


def _names(folder: Path, suffix: str) -> set[str]:
    """Stems of the files ``*<suffix>`` of ``folder`` (none when it is missing), hidden ones left out."""
    try:
        with os.scandir(folder) as it:
            return {f.name[:-len(suffix)] for f in it
                    if f.name.endswith(suffix) and not f.name.startswith(".") and f.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


class Catalog:
    """Slides of several output folders keyed as :func:`~gigaslide.export.catalog.scan` keys them (``id``, or
    ``id@k`` when folders share an id), with the same ``problems``; entries are completed on first use."""

    def __init__(self, out_dirs: list[str | os.PathLike]):
        self.entries: dict[str, SlideEntry] = {}
        self.problems: list[str] = []
        self._recorded: dict[str, Any] = {}  # key -> the slide path manifest.json records
        for k, d in enumerate(out_dirs):
            for e, recorded in self._list(Path(d)):
                if e.key in self.entries:
                    e.key = f"{e.slide_id}@{k}"
                self.entries[e.key] = e
                self._recorded[e.key] = recorded

    def _list(self, d: Path) -> list[tuple[SlideEntry, Any]]:
        if d.is_file():  # e.g. `gigaslide view slide.svs`
            raise GigaslideError("is a file, not an encode output folder", path=d,
                                 fix="pass the --out folder of `gigaslide encode` (the one holding features/ and "
                                     "patches/)")
        if not d.is_dir():
            raise GigaslideError("output folder not found", path=d, fix="pass the --out folder of `gigaslide encode`")
        manifest = read_slides(d / "manifest.json", self.problems)  # with the journal of a job still running, or killed
        files = {sub: _names(d / sub, ext) for sub, ext in
                 (("features", ".h5"), ("patches", ".h5"), ("tissue", ".geojson"), ("nuclei", ".geojson"))}
        ids = set(manifest) | files["features"] | files["patches"]
        if not ids:
            self.problems.append(f"{d}: no slides (no manifest.json, features/*.h5 or patches/*.h5) -- run "
                                 f"`gigaslide encode SLIDES --out {d}` first")
        out = []
        for sid in sorted(ids):
            e = SlideEntry(key=sid, slide_id=sid, out_dir=d)
            m = manifest.get(sid, {})
            e.encode_status, e.error = m.get("status"), m.get("error")
            for sub, attr, ext in (("features", "features", ".h5"), ("patches", "patches", ".h5"),
                                   ("tissue", "tissue_geojson", ".geojson"), ("nuclei", "nuclei_geojson", ".geojson")):
                if sid in files[sub]:
                    setattr(e, attr, d / sub / f"{sid}{ext}")
            out.append((e, m.get("path")))
        return out

    def complete(self, key: str) -> SlideEntry:
        """Entry ``key`` with what its features / patches files record (slide path, level-0 mpp, attributes):
        the fields :func:`~gigaslide.export.catalog.scan_out_dir` reads from them, read the same way."""
        e = self.entries[key]
        recorded: dict[str, Any] = {"manifest": self._recorded.get(key)}
        for sub in ("features", "patches"):
            f = getattr(e, sub)
            if f is None:
                continue
            fa, ca = _read_attrs(f)
            if sub == "features":
                e.feature_attrs = {**fa, "coords": ca}
            recorded[sub] = fa.get("slide_path")
            mpp = ca.get("level0_mpp") or fa.get("slide_mpp")
            if mpp and e.slide_mpp is None:
                e.slide_mpp = float(mpp)
        e.slide_path = _slide_path([recorded.get(k) for k in ("manifest", "features", "patches")], e.out_dir)
        return e

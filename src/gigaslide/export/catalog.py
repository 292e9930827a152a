"""What an encode output folder holds, slide by slide (read from its on-disk layout only).

``OUT/manifest.json`` (status, path and error of every slide of the batch), ``OUT/features/<id>.h5``,
``OUT/patches/<id>.h5``, ``OUT/tissue/<id>.geojson`` and, when a nuclei job ran, ``OUT/nuclei/<id>.geojson``.
A slide is listed when any of these names it; what is missing is said, never guessed. Listing opens no file
(:func:`list_slides`); :func:`complete_entry` reads one slide's HDF5 attributes when it is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from gigaslide.errors import GigaslideError
from gigaslide.features.manifest import read_slides
from gigaslide.files import shown_name as text  # (the viewer and the AnnData export import it from here)
from gigaslide.provenance import decode_attrs


@dataclass
class SlideEntry:
    key: str  # unique across the folders given (the slide id, or id@k on a clash)
    slide_id: str
    out_dir: Path
    slide_path: Path | None = None
    features: Path | None = None
    patches: Path | None = None
    tissue_geojson: Path | None = None
    nuclei_geojson: Path | None = None
    encode_status: str | None = None  # from manifest.json
    error: str | None = None  # why the batch failed on it
    slide_mpp: float | None = None  # level-0 µm/px recorded by tiling (slides without metadata mpp need it)
    feature_attrs: dict[str, Any] = field(default_factory=dict)
    manifest_path: str | None = None  # the slide path manifest.json records (as the job was given it)

    @property
    def missing(self) -> list[str]:
        out = []
        if self.features is None:
            out.append(f"features/{self.slide_id}.h5")
        if self.slide_path is None:
            out.append("the slide file")
        elif not self.slide_path.exists():
            out.append(f"the slide file {self.slide_path}")
        return out


def _read_attrs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """File attrs and ``coords`` attrs of a patches / features HDF5 (no arrays are read)."""
    try:
        with h5py.File(path, "r") as f:
            ca = decode_attrs(f["coords"].attrs) if "coords" in f else {}
            return decode_attrs(f.attrs), ca
    except (OSError, KeyError):
        return {}, {}


def resolve_path(p: str, out_dir: Path) -> Path:
    """A path recorded by a batch job: absolute, or relative to the folder the job ran from (unknown here:
    the current folder, then each folder above ``out_dir`` is tried)."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    for parent in out_dir.resolve().parents:
        if (parent / path).exists():
            return parent / path
    return path


def _slide_path(recorded: list[str | None], out_dir: Path) -> Path | None:
    """The first of the ``recorded`` paths that exists, else the first recorded; None without any. Absolute ones come
    first (the features record the path read, absolute; the manifest and the coords the path the job was given,
    maybe relative to a folder the job ran from, which is only guessed here: see :func:`resolve_path`)."""
    recorded = [str(p) for p in recorded if p]
    recorded = [p for p in recorded if Path(p).is_absolute()] + [p for p in recorded if not Path(p).is_absolute()]
    paths = [resolve_path(p, out_dir) for p in recorded]
    return next((p for p in paths if p.exists()), paths[0] if paths else None)


#: (folder, SlideEntry field, suffix) of the files a slide may have
_FILES = (("features", "features", ".h5"), ("patches", "patches", ".h5"),
          ("tissue", "tissue_geojson", ".geojson"), ("nuclei", "nuclei_geojson", ".geojson"))


def _names(folder: Path, suffix: str) -> set[str]:
    """Stems of the files ``*<suffix>`` of ``folder`` (none when it is missing), hidden ones (and the ``.tmp-`` files
    of writes in progress) left out."""
    try:
        with os.scandir(folder) as it:
            return {f.name[:-len(suffix)] for f in it
                    if f.name.endswith(suffix) and not f.name.startswith(".") and f.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def list_out_dir(out: str | os.PathLike) -> tuple[list[SlideEntry], list[str]]:
    """Slides of one encode output folder from ``manifest.json`` and its folders' file names alone (no HDF5 file is
    opened), and a list of problems (one line each). What the slides' files record (slide path, level-0 mpp,
    feature attributes) is filled in by :func:`complete_entry`."""
    d = Path(out)
    if d.is_file():  # e.g. `gigaslide view slide.svs`
        raise GigaslideError("is a file, not an encode output folder", path=d,
                             fix="pass the --out folder of `gigaslide encode` (the one holding features/ and patches/)")
    if not d.is_dir():
        raise GigaslideError("output folder not found", path=d, fix="pass the --out folder of `gigaslide encode`")
    problems: list[str] = []
    manifest = read_slides(d / "manifest.json", problems)  # with the journal of a job still running, or killed
    files = {sub: _names(d / sub, ext) for sub, _, ext in _FILES}
    ids = set(manifest) | files["features"] | files["patches"]
    if not ids:
        problems.append(f"{d}: no slides (no manifest.json, features/*.h5 or patches/*.h5) -- run "
                        f"`gigaslide encode SLIDES --out {d}` first")
    entries = []
    for sid in sorted(ids):
        m = manifest.get(sid, {})
        shown = text(sid)  # the files keep their names; the id is what JSON, HDF5 and URLs can hold
        e = SlideEntry(key=shown, slide_id=shown, out_dir=d, encode_status=m.get("status"),
                       error=None if m.get("error") is None else text(str(m["error"])), manifest_path=m.get("path"))
        for sub, attr, ext in _FILES:
            if sid in files[sub]:
                setattr(e, attr, d / sub / f"{sid}{ext}")
        entries.append(e)
    return entries, problems


def complete_entry(e: SlideEntry,
                   feature_attrs: tuple[dict[str, Any], dict[str, Any]] | None = None) -> SlideEntry:
    """``e`` (from :func:`list_out_dir`) with what its features / patches files record: ``feature_attrs``, the
    level-0 mpp and the slide path (the first of the manifest's, the features' and the patches' that exists).
    Reads only HDF5 attributes; ``feature_attrs`` = (file attrs, coords attrs) of the features file when the caller
    has read them already (e.g. from :func:`gigaslide.features.store.load`): that file is then not opened again."""
    recorded: dict[str, Any] = {"manifest": e.manifest_path}  # where each record says the slide was read
    for sub in ("features", "patches"):
        f = getattr(e, sub)
        if f is None or (sub == "patches" and e.slide_mpp is not None and any(
                p and Path(str(p)).is_absolute() and Path(str(p)).exists() for p in recorded.values())):
            continue  # an existing absolute path comes before the patches' (and the mpp is known): nothing to read
        fa, ca = feature_attrs if sub == "features" and feature_attrs is not None else _read_attrs(f)
        if sub == "features":
            e.feature_attrs = {**fa, "coords": ca}
        recorded[sub] = fa.get("slide_path")
        mpp = ca.get("level0_mpp") or fa.get("slide_mpp")
        if mpp and e.slide_mpp is None:
            e.slide_mpp = float(mpp)
    e.slide_path = _slide_path([recorded.get(k) for k in ("manifest", "features", "patches")], e.out_dir)
    return e


def scan_out_dir(out: str | os.PathLike) -> tuple[list[SlideEntry], list[str]]:
    """Slides of one encode output folder, completed (:func:`complete_entry`), and a list of problems."""
    entries, problems = list_out_dir(out)
    return [complete_entry(e) for e in entries], problems


def list_slides(out_dirs: list[str | os.PathLike]) -> tuple[dict[str, SlideEntry], list[str]]:
    """:func:`list_out_dir` of several output folders keyed by a unique key (``id``, or ``id@k`` when the k-th folder
    shares an id with an earlier one; ``id@k.2``, ... where an earlier folder holds a slide called ``id@k`` itself);
    nothing is opened: complete an entry with :func:`complete_entry` before using what its files record. A folder given
    twice (the same one by a relative, absolute or symlinked path) is listed once, with a note: each of its tiles
    would otherwise be exported twice."""
    out: dict[str, SlideEntry] = {}
    problems: list[str] = []
    seen: dict[str, str] = {}  # real path -> the folder as given first
    for k, d in enumerate(out_dirs):
        real = os.path.realpath(d)
        if real in seen:
            problems.append(f"{d}: the same folder as {seen[real]} -- listed once")
            continue
        seen[real] = str(d)
        entries, probs = list_out_dir(d)
        problems += probs
        for e in entries:
            if e.key in out:
                e.key, n = f"{e.slide_id}@{k}", 2
                while e.key in out:  # an earlier folder holds a slide called id@k itself: never replace it
                    e.key, n = f"{e.slide_id}@{k}.{n}", n + 1
            out[e.key] = e
    return out, problems


def scan(out_dirs: list[str | os.PathLike]) -> tuple[dict[str, SlideEntry], list[str]]:
    """:func:`list_slides` with every entry completed (reads every slide's features and patches attributes: about
    2 ms a file; the exports and the viewer complete entries one by one instead)."""
    entries, problems = list_slides(out_dirs)
    for e in entries.values():
        complete_entry(e)
    return entries, problems

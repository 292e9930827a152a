"""What an encode output folder holds, slide by slide (read from its on-disk layout only).

``OUT/manifest.json`` (status, path and error of every slide of the batch), ``OUT/features/<id>.h5``,
``OUT/patches/<id>.h5``, ``OUT/tissue/<id>.geojson`` and, when a nuclei job ran, ``OUT/nuclei/<id>.geojson``.
A slide is listed when any of these names it; what is missing is said, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from gigaslide.errors import GigaslideError
from gigaslide.features.manifest import read_slides
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


def scan_out_dir(out: str | os.PathLike) -> tuple[list[SlideEntry], list[str]]:
    """Slides of one encode output folder and a list of problems (one line each) found on the way."""
    d = Path(out)
    if d.is_file():  # e.g. `gigaslide view slide.svs`
        raise GigaslideError("is a file, not an encode output folder", path=d,
                             fix="pass the --out folder of `gigaslide encode` (the one holding features/ and patches/)")
    if not d.is_dir():
        raise GigaslideError("output folder not found", path=d, fix="pass the --out folder of `gigaslide encode`")
    problems: list[str] = []
    manifest = read_slides(d / "manifest.json", problems)  # with the journal of a job still running, or killed
    ids = set(manifest)
    for sub in ("features", "patches"):
        if (d / sub).is_dir():
            ids |= {f.stem for f in (d / sub).glob("*.h5") if not f.name.startswith(".")}
    if not ids:
        problems.append(f"{d}: no slides (no manifest.json, features/*.h5 or patches/*.h5) -- run "
                        f"`gigaslide encode SLIDES --out {d}` first")
    entries = []
    for sid in sorted(ids):
        e = SlideEntry(key=sid, slide_id=sid, out_dir=d)
        m = manifest.get(sid, {})
        e.encode_status, e.error = m.get("status"), m.get("error")
        recorded: dict[str, str | None] = {"manifest": m.get("path")}  # where each record says the slide was read
        for sub, attr in (("features", "features"), ("patches", "patches")):
            f = d / sub / f"{sid}.h5"
            if f.is_file():
                setattr(e, attr, f)
                fa, ca = _read_attrs(f)
                if attr == "features":
                    e.feature_attrs = {**fa, "coords": ca}
                recorded[sub] = fa.get("slide_path")
                mpp = ca.get("level0_mpp") or fa.get("slide_mpp")
                if mpp and e.slide_mpp is None:
                    e.slide_mpp = float(mpp)
        e.slide_path = _slide_path([recorded.get(k) for k in ("manifest", "features", "patches")], d)
        for sub, attr in (("tissue", "tissue_geojson"), ("nuclei", "nuclei_geojson")):
            f = d / sub / f"{sid}.geojson"
            if f.is_file():
                setattr(e, attr, f)
        entries.append(e)
    return entries, problems


def scan(out_dirs: list[str | os.PathLike]) -> tuple[dict[str, SlideEntry], list[str]]:
    """Slides of several output folders keyed by a unique key (``id``, or ``id@k`` when folders share an id)."""
    out: dict[str, SlideEntry] = {}
    problems: list[str] = []
    for k, d in enumerate(out_dirs):
        entries, probs = scan_out_dir(d)
        problems += probs
        for e in entries:
            if e.key in out:
                e.key = f"{e.slide_id}@{k}"
            out[e.key] = e
    return out, problems

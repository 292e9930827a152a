"""Nuclei data sets: image / annotation pairs, resolution, the fixed organ-stratified split, training targets.

``images/<id>.png`` pairs with ``annotations/<id>.<xml|geojson|png|tif|npy|mat>``. An image without an
annotation (or an annotation without an image) is reported and left out. GeoJSON class names are numbered
once per data set (:func:`dataset_type_codes`), so a class has the same type in every file. Images are resampled to the
model's mpp (instance maps with nearest neighbour); an image coarser than the model's mpp is refused.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.tiling import folders
from gigaslide.nuclei.annotations import ANNOTATION_SUFFIXES, annotation_note, class_names, read_annotation, type_codes

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: Images within this relative difference of the model's mpp are not resampled.
MPP_RESAMPLE_TOLERANCE = 0.005
#: An image may be this much coarser than the model's mpp before it is refused.
MPP_COARSER_TOLERANCE = 0.1


@dataclass
class Pair:
    id: str
    image: Path
    annotation: Path | None


@dataclass
class Item:
    """One image at the model's mpp plus its ground truth (at both resolutions)."""

    id: str
    image: np.ndarray  # uint8 [H, W, 3] at the model mpp
    inst: np.ndarray  # int32 [H, W] at the model mpp
    inst_orig: np.ndarray  # int32 at the image's own resolution (metrics are computed there)
    types: dict[int, int] | None
    mpp: float  # the image's own mpp
    organ: str = ""


def _files(d: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not d.is_dir():
        raise GigaslideError("folder not found", path=d, fix="check the path")
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            stem = p.name[: -len(".geojson")] if p.name.lower().endswith(".geojson") else p.stem
            out.setdefault(stem, p)  # first suffix in sort order wins
    return out


def find_pairs(images: str | os.PathLike, annotations: str | os.PathLike | None) -> tuple[list[Pair], list[str]]:
    """(pairs, problems): every image with its annotation (by file stem); unpaired files become problems."""
    imgs = _files(Path(images), IMAGE_SUFFIXES)
    if not imgs:
        raise GigaslideError("no images (.png/.tif/.jpg) in folder", path=images, fix="point --images at a folder of images")
    if annotations is None:
        return [Pair(k, v, None) for k, v in imgs.items()], []
    anns = _files(Path(annotations), ANNOTATION_SUFFIXES)
    problems = [f"{imgs[k]}: image has no annotation in {annotations} (left out)" for k in imgs if k not in anns]
    problems += [f"{anns[k]}: annotation has no image in {images} (left out)" for k in anns if k not in imgs]
    pairs = [Pair(k, imgs[k], anns[k]) for k in imgs if k in anns]
    if not pairs:
        raise GigaslideError("no image has an annotation with the same file name", path=annotations,
                             fix="name annotations like their images (<id>.png -> <id>.xml)")
    return pairs, problems


def dataset_type_codes(pairs: list[Pair]) -> dict[str, int]:
    """``class name -> type`` (1..T, names sorted) over the GeoJSON annotations of all ``pairs``; empty when no
    annotation names its nuclei' classes."""
    return type_codes(class_names(p.annotation for p in pairs if p.annotation is not None))


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] (:func:`gigaslide.tiling.folders.read_image`: grayscale as three equal channels, RGBA
    composited on white -- transparent is glass, as the slide readers do; dropping alpha made a transparent background
    black, which reads as nuclei; images deeper than 8 bits refused: PIL clipped a 16-bit PNG to white)."""
    return folders.read_image(path)


def read_organs(images: str | os.PathLike, organs: str | os.PathLike | None = None) -> dict[str, str]:
    """``image_id -> organ`` from ``organs`` or an ``organs.csv`` beside / above the images folder."""
    cands = [Path(organs)] if organs else [Path(images) / "organs.csv", Path(images).parent / "organs.csv"]
    for c in cands:
        if c.is_file():
            with open(c, newline="") as f:
                return {r["image_id"]: r.get("organ", "") for r in csv.DictReader(f) if r.get("image_id")}
    if organs:
        raise GigaslideError("organs CSV not found", path=organs, fix="give a CSV with columns image_id,organ")
    return {}


def check_resolution(value: float | None, option: str) -> None:
    """Refuse a resolution option (``--image-mpp``, ``--mpp``) that is given but not a finite number above 0: a
    negative ``--image-mpp`` resampled every image to 1 x 1 px and trained on that; NaN failed with a ValueError."""
    import math

    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise GigaslideError(f"{option} {value} is not a resolution (µm/px must be a finite number above 0)",
                             fix=f"give {option} like 0.25 (40x) or 0.5 (20x), or leave it out")


def check_mpp(image_mpp: float, model_mpp: float, path: str | os.PathLike) -> float:
    """Scale factor image px -> model px; refuses an image coarser than the model's mpp."""
    if image_mpp > model_mpp * (1 + MPP_COARSER_TOLERANCE):
        raise GigaslideError(f"image is at {image_mpp:.4g} µm/px, coarser than the model's {model_mpp:.4g} µm/px",
                             path=path, fix=f"give images scanned at {model_mpp:.3g} µm/px or finer "
                                            "(or correct --image-mpp if the resolution is wrong)")
    s = image_mpp / model_mpp
    return 1.0 if abs(s - 1.0) <= MPP_RESAMPLE_TOLERANCE else s


def resize(arr: np.ndarray, shape: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    h, w = shape
    if arr.shape[:2] == (h, w):
        return arr
    if nearest:
        im = Image.fromarray(arr.astype(np.int32), mode="I")
        return np.asarray(im.resize((w, h), Image.Resampling.NEAREST)).astype(np.int32)
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))


def load_item(pair: Pair, model_mpp: float, image_mpp: float | None = None, organ: str = "",
              codes: dict[str, int] | None = None, problems: list[str] | None = None) -> Item:
    """The pair at the model's mpp; ``codes`` (class name -> type, :func:`dataset_type_codes` or a model's names)
    numbers GeoJSON classes.

    Resolution: ``image_mpp`` (the user's ``--image-mpp``) wins over the annotation file's own (MoNuSeg XML's
    MicronsPerPixel): an explicit value corrects a file that is wrong. Where the two differ by more than
    :data:`MPP_RESAMPLE_TOLERANCE` a warning naming both is appended to ``problems`` (the commands print them and
    the report / run keeps them), so a flag meant for other images does not silently rescale these."""
    check_resolution(image_mpp, "--image-mpp")
    check_resolution(model_mpp, "--mpp")
    img = read_image(pair.image)
    h, w = img.shape[:2]
    ann = read_annotation(pair.annotation, (h, w), codes) if pair.annotation else None
    note = annotation_note(ann) if ann is not None else None
    if note and problems is not None:  # degenerate polygons are dropped: the user hears how many, per file
        problems.append(f"{pair.annotation}: {note}")
    mpp = image_mpp or (ann.mpp if ann else None)
    if image_mpp and ann is not None and ann.mpp and abs(image_mpp / ann.mpp - 1) > MPP_RESAMPLE_TOLERANCE:
        msg = (f"{pair.annotation}: --image-mpp {image_mpp:g} used, the file says {ann.mpp:g} µm/px "
               "(leave --image-mpp out to use the file's)")
        if problems is None:
            import warnings

            warnings.warn(msg, stacklevel=2)
        else:
            problems.append(msg)
    if not mpp:
        raise GigaslideError("image resolution unknown", path=pair.image,
                             fix="give --image-mpp (e.g. 0.2527 for MoNuSeg 40x images)")
    s = check_mpp(float(mpp), model_mpp, pair.image)
    shape = (max(1, round(h * s)), max(1, round(w * s)))
    inst0 = ann.inst if ann else np.zeros((h, w), np.int32)
    return Item(pair.id, resize(img, shape, False), resize(inst0, shape, True), inst0, ann.types if ann else None,
                float(mpp), organ)


def make_split(ids: list[str], organs: dict[str, str], seed: int = 0, test_frac: float = 0.3,
               val_frac: float = 0.15) -> dict[str, str]:
    """``id -> train|val|test``: organs interleaved (shuffled within organ, rarest organ first), so test and
    validation images come from as many organs as possible. At least one train image; val/test may be empty
    for tiny sets."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for i in sorted(ids):
        groups.setdefault(organs.get(i, ""), []).append(i)
    order_groups = sorted(groups, key=lambda g: (-len(groups[g]), g))
    order_groups = [order_groups[k] for k in rng.permutation(len(order_groups))]
    for g in order_groups:
        groups[g] = [groups[g][k] for k in rng.permutation(len(groups[g]))]
    seq: list[str] = []
    while any(groups.values()):
        for g in order_groups:
            if groups[g]:
                seq.append(groups[g].pop(0))
    n = len(seq)
    n_test = min(int(round(n * test_frac)), max(0, n - 1))
    n_val = min(int(round(n * val_frac)), max(0, n - 1 - n_test))
    if n >= 3 and val_frac > 0:
        n_val = max(1, n_val)
    return {i: ("test" if k < n_test else "val" if k < n_test + n_val else "train") for k, i in enumerate(seq)}


def subset_fraction(ids: list[str], organs: dict[str, str], fraction: float, seed: int = 0) -> list[str]:
    """A fixed ``fraction`` (at least one) of ``ids``, organs interleaved as in :func:`make_split`: images drawn
    by ``seed`` within each organ (not the first ones in name order), nested over fractions for one seed."""
    if not 0 < fraction <= 1:
        raise GigaslideError(f"--fraction {fraction} must be in (0, 1]", fix="use e.g. --fraction 0.2")
    order = list(make_split(ids, organs, seed + 1, 0.0, 0.0))  # make_split's order: shuffled within each organ
    rng = np.random.default_rng(seed + 7)
    by_organ: dict[str, list[str]] = {}
    for i in order:
        by_organ.setdefault(organs.get(i, ""), []).append(i)
    keys = sorted(by_organ)
    keys = [keys[k] for k in rng.permutation(len(keys))]
    seq: list[str] = []
    while any(by_organ.values()):
        for g in keys:
            if by_organ[g]:
                seq.append(by_organ[g].pop(0))
    k = max(1, int(round(len(seq) * fraction)))
    return sorted(seq[:k])


def write_split(path: Path, split: dict[str, str], organs: dict[str, str]) -> None:
    from gigaslide import atomic

    lines = ["image_id,organ,split"] + [f"{i},{organs.get(i, '')},{s}" for i, s in sorted(split.items())]
    atomic.write_text(path, "\n".join(lines) + "\n")


def read_split(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {r["image_id"]: r["split"] for r in csv.DictReader(f)}


# -- targets ----------------------------------------------------------------------------------
def hv_maps(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal / vertical maps [2, H, W]: each pixel's x / y distance to its nucleus' centre of
    mass, scaled to [-1, 1] per nucleus and side (0 on background)."""
    from scipy import ndimage as ndi

    out = np.zeros((2,) + inst.shape, np.float32)
    for k, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        m = inst[sl] == k
        yy, xx = np.nonzero(m)
        cy, cx = yy.mean(), xx.mean()
        for c, d in ((0, xx - cx), (1, yy - cy)):
            v = d.astype(np.float32)
            neg, pos = v < 0, v > 0
            if neg.any():
                v[neg] /= -v[neg].min()
            if pos.any():
                v[pos] /= v[pos].max()
            out[c][sl][yy, xx] = v
    return out


def type_map(inst: np.ndarray, types: dict[int, int] | None) -> np.ndarray:
    t = np.zeros(inst.shape, np.int64)
    if types:
        lut = np.zeros(int(inst.max(initial=0)) + 1, np.int64)
        for k, v in types.items():
            if k < len(lut):
                lut[k] = v
        t = lut[inst]
    return t


__all__ = ["IMAGE_SUFFIXES", "Item", "Pair", "check_mpp", "check_resolution", "dataset_type_codes", "find_pairs",
           "hv_maps", "load_item",
           "make_split", "read_image", "read_organs", "read_split", "resize", "subset_fraction", "type_map",
           "write_split"]

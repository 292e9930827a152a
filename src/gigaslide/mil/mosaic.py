"""Mosaic benchmark: CAMELYON-like pyramidal TIFF slides built from a labelled tile folder.

Like MNIST-bags, but with real tissue. From ``TILES/0`` (normal) and ``TILES/1`` (tumour), e.g.
PCam's 96 x 96 tiles at ~0.97 um/px, each slide is a ``grid x grid`` mosaic of tiles:

* a tissue-shaped mask (smoothed random field, thresholded, largest connected piece) on a white
  glass-like background;
* negative slides contain only normal tiles;
* positive slides contain one spatially contiguous (4-connected) tumour region covering a
  ``tumor_fraction`` of the tissue tiles (drawn per slide from a range), grown from a random
  seed tile; every other tissue tile is normal. ``arrangement="scattered"`` places the same
  number of tumour tiles at random tissue cells instead, ``"mixed"`` picks one of the two per slide;
* ``task="context"``: *every* slide holds tumour at the same ``tumor_fraction`` range, and the
  label is the spatial arrangement (1 = one contiguous region, 0 = scattered tiles), so a bag
  model that ignores where tiles are cannot tell the classes apart.
* ``task="composition"`` (needs ``slide_composition``): no slide holds tumour, and the label is the
  slide's tissue mix, like a subtype: the kinds are split at random into two halves, and a class-``c``
  slide draws its weights from a Dirichlet whose base measure gives its class's half three times the
  weight of the other half (same total concentration as without a task), so the classes overlap slide by
  slide and differ on average. The halves are recorded (``composition_classes``).

Tiles are drawn with replacement (each with a random 90-degree rotation / flip), so a tile can
appear in several slides; PCam label 0 means "no tumour in the central 32 x 32 px".

Real slides differ in staining from one another (lab, batch, scanner), mosaics of tiles pooled from
many source slides do not. ``slide_stain=s > 0`` gives every slide its own stain: one draw per slide
of a scale in [1 - s, 1 + s] and a shift in [-0.4 s, 0.4 s] of each haematoxylin / eosin / DAB optical
density (HED colour deconvolution, Tellez et al. 2019; the transform tile SSL's stain jitter uses, so
``s = 0.05`` is that jitter's strength), applied to the whole slide with glass kept as glass. The draws
are written to ``mosaic.json`` (``slide_stain_draws``). With ``s = 0`` (default) slides are
pixel-identical to earlier versions.

Real slides also differ in what tissue they hold (a lymph node rich in fat, another in follicles or sinus);
a mosaic whose normal tiles are drawn uniformly from one pool gives every slide the same mix.
``slide_composition=a > 0`` gives every slide its own mix: the normal tiles are grouped into ``tissue_kinds``
kinds (k-means on per-tile colour statistics: mean and spread of R, G, B and the share of glass-white
pixels), each slide draws its weights over the kinds from a symmetric Dirichlet(a) (small ``a``: one or
two kinds dominate a slide; large: every slide near the pool's mix) and picks each normal tile's kind from
them. The mix is drawn independently of the label (except in ``task="composition"``), and tumour tiles
stay uniform. The kinds' sizes and every slide's weights go to ``mosaic.json`` (``tissue_kinds``,
``slide_composition_draws``); masks, labels and ground truth are those of the same mosaic without it.

Output (``OUT/``): ``slides/{slide_id}.tiff`` (OpenSlide-readable pyramidal TIFF, mpp set),
``labels.csv`` (``slide_id,patient_id,label,tumor_fraction,n_tissue_tiles,n_tumor_tiles,arrangement``),
``ground_truth/{slide_id}.csv`` (``x,y,size,is_tumor``: every tissue tile, level-0 px),
``tissue/{slide_id}.geojson`` (the exact tissue cells as a ``Tissue`` polygon and the tumour cells as a ``Tumor``
one, level-0 px: QuPath opens it, and ``gigaslide tile --tissue-from OUT/tissue`` tiles exactly the tissue cells,
with no tissue detection whose result could depend on the tiles' content or arrangement) and ``mosaic.json``
(provenance and settings). Existing slides are kept, so a re-run resumes (only with the same settings, also after a
build killed before its end); a second build of the same folder at once waits for the first.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.provenance import provenance
from gigaslide.errors import GigaslideError
from gigaslide.locks import LockBusy, exclusive_file
from gigaslide.tiling.folders import IMAGE_EXTENSIONS



@dataclass
class MosaicConfig:
    slides: int = 200
    positive_fraction: float = 0.5
    tumor_fraction: tuple[float, float] = (0.02, 0.2)
    grid: int = 24  # tiles per side
    tissue_fraction: tuple[float, float] = (0.35, 0.6)  # of the grid cells
    mpp: float = 0.97
    seed: int = 0
    normal_class: str = "0"
    tumor_class: str = "1"
    arrangement: str = "contiguous"  # of the tumour tiles in positive slides: contiguous | scattered | mixed
    task: str = "tumour"  # tumour (label = has tumour) | context (contiguous vs scattered) | composition (tissue mix)
    slide_stain: float = 0.0  # per-slide HED scale / shift half-width (0 = no per-slide stain)
    slide_composition: float = 0.0  # Dirichlet concentration of each slide's mix of normal tissue kinds (0 = off)
    tissue_kinds: int = 8  # k-means groups of the normal tiles that slide_composition mixes


ARRANGEMENTS = ("contiguous", "scattered", "mixed")
TASKS = ("tumour", "context", "composition")


def parse_range(value: str | float | tuple[float, float], name: str = "--tumor-fraction") -> tuple[float, float]:
    """``"0.02-0.2"`` -> (0.02, 0.2); ``"0.1"`` -> (0.1, 0.1)."""
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
    else:
        s = str(value).strip()
        try:
            parts = re.split(r"(?<=[0-9.\s])-", s)  # the range's dash, not an exponent's (5e-2) or a sign
            if len(parts) > 2:
                raise ValueError
            lo, hi = float(parts[0]), float(parts[-1])
        except ValueError:
            raise GigaslideError(f"{name} {value!r} is not a number or range", fix=f"write e.g. {name} 0.02-0.2 or 0.1") from None
    if not (0 < lo <= hi <= 1):
        raise GigaslideError(f"{name} {value!r} must lie in (0, 1] with low <= high", fix=f"e.g. {name} 0.02-0.2")
    return lo, hi


def list_tiles(tiles: str | os.PathLike, cls: str) -> list[Path]:
    d = Path(tiles) / cls
    if not d.is_dir():
        raise GigaslideError(f"no class folder '{cls}/'", path=tiles,
                             fix="pass a tile folder with sub-folders 0/ (normal) and 1/ (tumour), e.g. tiles/pcam/train")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise GigaslideError("class folder has no image tiles", path=d, fix="check the path")
    return files


def tissue_mask(grid: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A blob-shaped boolean [grid, grid] mask covering about ``fraction`` of the cells."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.normal(size=(grid, grid)), sigma=grid / 6, mode="constant")
    yy, xx = np.mgrid[:grid, :grid]
    r2 = ((yy - (grid - 1) / 2) ** 2 + (xx - (grid - 1) / 2) ** 2) / (grid / 2) ** 2
    field = field / (field.std() + 1e-9) - 3.0 * r2  # favour the centre, keep off the edges
    field[[0, -1], :] = field[:, [0, -1]] = -1e6  # a one-tile margin of glass
    mask = field >= np.quantile(field, 1 - fraction)
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    return mask


def grow_region(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A 4-connected region of ``n`` cells inside ``mask``, grown from a random seed cell."""
    cells = np.argwhere(mask)
    n = int(min(max(n, 1), len(cells)))
    region = np.zeros_like(mask)
    start = tuple(cells[rng.integers(len(cells))])
    region[start] = True
    frontier = {start}
    count = 1
    while count < n and frontier:
        # pick a frontier cell at random, add one random free neighbour
        cell = list(frontier)[rng.integers(len(frontier))]
        y, x = cell
        nbrs = [(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
                if 0 <= y + dy < mask.shape[0] and 0 <= x + dx < mask.shape[1]
                and mask[y + dy, x + dx] and not region[y + dy, x + dx]]
        if not nbrs:
            frontier.discard(cell)
            continue
        nb = nbrs[rng.integers(len(nbrs))]
        region[nb] = True
        frontier.add(nb)
        count += 1
    return region


def scatter_region(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` cells of ``mask`` chosen uniformly at random (no spatial structure)."""
    cells = np.argwhere(mask)
    n = int(min(max(n, 1), len(cells)))
    region = np.zeros_like(mask)
    pick = cells[rng.choice(len(cells), size=n, replace=False)]
    region[pick[:, 0], pick[:, 1]] = True
    return region


@contextlib.contextmanager
def _tile_image(path: Path) -> Iterator[Any]:
    """A tile opened with PIL; one that cannot be decoded (truncated, not an image) or whose header claims a
    decompression bomb is one line naming it (a bare OSError / DecompressionBombError, after the slides before it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            yield im
    except Image.DecompressionBombError as e:
        raise GigaslideError(f"tile image too large ({str(e).splitlines()[0][:100]})", path=path,
                             fix="use tiles of a few hundred px (e.g. PCam's 96 px), or leave that file out") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as e:  # (PIL's plugins raise these)
        raise GigaslideError(f"cannot read tile image ({str(e).splitlines()[0][:100] or type(e).__name__})",
                             path=path, fix="delete or re-export the file") from None


def _read_tile(path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    with _tile_image(path) as im:
        a = np.asarray(im.convert("RGB"))
    if a.shape[:2] != (size, size):
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
    a = np.rot90(a, int(rng.integers(4)))
    return a[:, ::-1] if rng.integers(2) else a


def tile_descriptor(path: Path) -> np.ndarray:
    """Colour statistics of one tile: mean and standard deviation of R, G, B (0-1) and the share of near-white
    (glass / fat) pixels."""
    with _tile_image(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    px = a.reshape(-1, 3)
    return np.concatenate([px.mean(0), px.std(0), [(px.min(1) > 0.85).mean()]])


def tissue_kinds(files: list[Path], k: int, seed: int) -> np.ndarray:
    """A kind in ``0..k-1`` for every tile: k-means (scikit-learn) on standardised :func:`tile_descriptor` rows."""
    from sklearn.cluster import KMeans

    x = np.stack([tile_descriptor(f) for f in files])
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    return KMeans(n_clusters=min(k, len(files)), n_init=4, random_state=seed).fit_predict(x).astype(np.int64)


def class_concentration(n_kinds: int, alpha: float, half: np.ndarray, positive: bool) -> np.ndarray:
    """Dirichlet parameters of a ``task="composition"`` slide: total ``alpha * n_kinds`` as without a task, with
    the class's own half of the kinds (``half`` for class 1, the rest for class 0) weighted 3:1."""
    own = np.zeros(n_kinds, bool)
    own[half] = True
    own = own if positive else ~own
    base = np.where(own, 3.0, 1.0)
    return alpha * n_kinds * base / base.sum()


def composition_probs(kinds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-tile draw probabilities that give each kind its ``weights`` share (uniform within a kind)."""
    counts = np.bincount(kinds, minlength=len(weights)).astype(np.float64)
    p = weights[kinds] / counts[kinds]
    return p / p.sum()


def draw_slide_stain(strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One slide's stain: per H / E / D channel a scale in [1 - s, 1 + s] and a shift in [-0.4 s, 0.4 s] of the optical
    density (the ratio of the tile-SSL stain jitter's defaults, 0.05 / 0.02, so ``s = 0.05`` matches that jitter)."""
    return rng.uniform(1 - strength, 1 + strength, 3), rng.uniform(-0.4 * strength, 0.4 * strength, 3)


def apply_stain(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``rgb`` (uint8, H x W x 3) with every stain's optical density scaled and shifted (``hed' = scale * hed + shift``,
    HED colour deconvolution), glass kept as glass: :func:`gigaslide.ssl.tile.augment.stain_jitter`, the same
    transform tile SSL augments with."""
    import torch

    from gigaslide.ssl.tile.augment import stain_jitter

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)
    out = stain_jitter(x, torch.as_tensor(scale), torch.as_tensor(shift))
    return out.mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def build_slide(normal: list[Path], tumor: list[Path], *, positive: bool, tumor_fraction: float, grid: int,
                tissue_fraction: float, tile_size: int, rng: np.random.Generator,
                arrangement: str = "contiguous",
                stain: tuple[np.ndarray, np.ndarray] | None = None,
                normal_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB mosaic [grid*t, grid*t, 3], tissue mask and tumour mask [grid, grid]; ``stain`` = (scale, shift) of
    :func:`apply_stain` for every tissue tile of this slide; ``normal_probs``: each normal tile's probability of
    being drawn (:func:`composition_probs`; None = uniform)."""
    tissue = tissue_mask(grid, tissue_fraction, rng)
    place = scatter_region if arrangement == "scattered" else grow_region
    tum = place(tissue, round(tumor_fraction * tissue.sum()), rng) if positive else np.zeros_like(tissue)
    t = tile_size
    img = (243 + rng.integers(-3, 4, size=(grid * t, grid * t, 1))).clip(0, 255).astype(np.uint8).repeat(3, axis=2)
    for (y, x) in np.argwhere(tissue):
        if tum[y, x]:
            path = tumor[rng.integers(len(tumor))]
        else:
            path = normal[rng.integers(len(normal)) if normal_probs is None else rng.choice(len(normal), p=normal_probs)]
        img[y * t:(y + 1) * t, x * t:(x + 1) * t] = _read_tile(path, t, rng)
    if stain is not None:  # one stain for the whole slide (glass stays glass)
        img = apply_stain(img, *stain)
    return img, tissue, tum


def _tile_size(path: Path) -> int:
    with _tile_image(path) as im:
        return int(im.size[0])


#: Copies of a slide's RGB array building it takes at most (the array, the stain's float32 copy and its result,
#: the TIFF writer's pyramid).
SLIDE_COPIES, SLIDE_COPIES_STAINED = 2, 10


def _check_slide_memory(cfg: MosaicConfig, t: int, first: Path) -> None:
    """Refuse, before any slide, a mosaic whose slides do not fit in memory: its tile side is the first normal tile's,
    so one tile of 5,000 px (or a header claiming it) made 120,000 px slides that asked for 43 GB each."""
    from gigaslide.memory import available_memory

    side = cfg.grid * t
    need = side * side * 3 * (SLIDE_COPIES_STAINED if cfg.slide_stain > 0 else SLIDE_COPIES)
    avail = available_memory()
    if avail is not None and need > avail:
        raise GigaslideError(f"{cfg.grid} x {cfg.grid} tiles of {t} px (the size of {first.name}) make "
                             f"{side} x {side} px slides, which need about {need / 1e9:.1f} GB to build "
                             f"({avail / 1e9:.1f} GB available)", path=first,
                             fix="use smaller tiles (e.g. PCam's 96 px) or a smaller --grid")


def build_mosaic(tiles: str | os.PathLike, out: str | os.PathLike, cfg: MosaicConfig | None = None,
                 verbose: bool = True) -> dict[str, Any]:
    """Write ``cfg.slides`` mosaic slides + labels + ground truth into ``out`` (resumable)."""
    cfg = cfg or MosaicConfig()
    if cfg.slides < 2:
        raise GigaslideError(f"--slides {cfg.slides}: need at least 2", fix="use --slides 2 or more")
    if not 0 < cfg.positive_fraction < 1:
        raise GigaslideError(f"--positive-fraction {cfg.positive_fraction} must be in (0, 1)", fix="e.g. 0.5")
    if round(cfg.positive_fraction * cfg.slides) in (0, cfg.slides):  # a cohort of one class: train-mil refuses it
        raise GigaslideError(f"--positive-fraction {cfg.positive_fraction} of {cfg.slides} slides gives "
                             f"{round(cfg.positive_fraction * cfg.slides)} positive slides: one class",
                             fix="use more --slides or a --positive-fraction nearer 0.5")
    if cfg.grid < 4:
        raise GigaslideError(f"--grid {cfg.grid} is too small", fix="use --grid 4 or more (default 24)")
    if cfg.arrangement not in ARRANGEMENTS:
        raise GigaslideError(f"--arrangement {cfg.arrangement!r}", fix=f"use one of {', '.join(ARRANGEMENTS)}")
    if cfg.task not in TASKS:
        raise GigaslideError(f"--task {cfg.task!r}", fix=f"use one of {', '.join(TASKS)}")
    if not 0 <= cfg.slide_stain < 1:
        raise GigaslideError(f"--slide-stain {cfg.slide_stain} must be in [0, 1)", fix="e.g. 0.05 (mild) to 0.2 (strong); 0 = off")
    if cfg.slide_composition < 0:
        raise GigaslideError(f"--slide-composition {cfg.slide_composition} must be >= 0",
                             fix="e.g. 0.3 (one or two tissue kinds per slide) to 3 (mild); 0 = off")
    if cfg.slide_composition > 0 and cfg.tissue_kinds < 2:
        raise GigaslideError(f"--tissue-kinds {cfg.tissue_kinds}: a composition needs at least 2 kinds", fix="e.g. 8")
    if cfg.task == "composition" and cfg.slide_composition <= 0:
        raise GigaslideError("--task composition labels slides by their tissue mix, which needs --slide-composition",
                             fix="add e.g. --slide-composition 0.3")
    normal, tumor = list_tiles(tiles, cfg.normal_class), list_tiles(tiles, cfg.tumor_class)
    out_d = atomic.ensure_writable_dir(out)
    with _building(out_d, verbose):
        return _build_locked(tiles, out_d, cfg, normal, tumor, verbose)


#: Beside ``mosaic.json`` (written last): the settings of a mosaic being built, so that a build killed half-way is
#: resumed only with the same settings; removed once ``mosaic.json`` is written.
BUILDING = ".mosaic-building.json"
#: The lock file one build of a mosaic folder holds (:func:`gigaslide.locks.exclusive_file`; removed when released).
LOCK = ".mosaic.lock"


@contextlib.contextmanager
def _building(out_d: Path, verbose: bool) -> Iterator[None]:
    """Hold the mosaic folder's lock for the whole build. Two processes building one folder at once (two jobs of a
    pipeline) raced: the second's clean-up of stale temporaries removed the first's slide being written (its rename
    then failed with a bare FileNotFoundError), and one started with other settings before the first had written
    ``mosaic.json`` mixed two mosaics in the folder (slides of one seed under the labels of the other). The second
    now waits for the first, then resumes its mosaic (nothing left to do) or refuses other settings."""
    try:
        with exclusive_file(out_d / LOCK, wait=False):
            yield
        return
    except LockBusy as e:
        if verbose:
            print(f"another process is building the mosaic in {out_d} ({e.holder}): waiting for it", flush=True)
    with exclusive_file(out_d / LOCK):
        yield


def _build_locked(tiles: str | os.PathLike, out_d: Path, cfg: MosaicConfig, normal: list[Path], tumor: list[Path],
                  verbose: bool) -> dict[str, Any]:
    """:func:`build_mosaic`'s work, the folder's lock held: temporaries in it are a dead build's."""
    from gigaslide.slides.writer import write_array_as_slide

    context, by_mix = cfg.task == "context", cfg.task == "composition"
    t = _tile_size(normal[0])
    _check_slide_memory(cfg, t, normal[0])
    _check_same_settings(out_d / "mosaic.json", cfg)
    if not (out_d / "mosaic.json").is_file():  # a build killed before its end resumes only with these settings
        atomic.write_json(out_d / BUILDING, {"config": asdict(cfg)})
    for sub in ("slides", "ground_truth", "tissue"):
        atomic.ensure_writable_dir(out_d / sub)
        atomic.clean_stale_tmp(out_d / sub)
    for name in ("labels.csv", "mosaic.json", BUILDING):  # written last: a kill there left their temporaries for good
        atomic.clean_stale_tmp_for(out_d / name)
    kinds = tissue_kinds(normal, cfg.tissue_kinds, cfg.seed) if cfg.slide_composition > 0 else None
    n_kinds = int(kinds.max()) + 1 if kinds is not None else 0
    half = np.random.default_rng([cfg.seed, 3]).permutation(n_kinds)[: n_kinds // 2] if by_mix else None
    rng = np.random.default_rng(cfg.seed)
    n_pos = int(round(cfg.positive_fraction * cfg.slides))
    is_pos = rng.permutation(np.arange(cfg.slides) < n_pos)
    rows, draws, mixes = [], {}, {}
    for i in range(cfg.slides):
        sid = f"mosaic_{i:04d}"
        srng = np.random.default_rng([cfg.seed, i])
        tf = float(srng.uniform(*cfg.tumor_fraction)) if (is_pos[i] or context) and not by_mix else 0.0
        tissue_frac = float(srng.uniform(*cfg.tissue_fraction))
        if context:  # label = arrangement; every slide has tumour
            arr = "contiguous" if is_pos[i] else "scattered"
        elif cfg.arrangement == "mixed":
            arr = "contiguous" if srng.integers(2) == 0 else "scattered"
        else:
            arr = cfg.arrangement
        arr = arr if tf > 0 else "none"
        stain = draw_slide_stain(cfg.slide_stain, np.random.default_rng([cfg.seed, i, 1])) if cfg.slide_stain > 0 else None
        if stain is not None:
            draws[sid] = {"scale": [round(float(v), 6) for v in stain[0]], "shift": [round(float(v), 6) for v in stain[1]]}
        probs = None
        if kinds is not None:  # this slide's mix of normal tissue kinds (its own generator: masks and labels unchanged)
            mix = np.random.default_rng([cfg.seed, i, 2]).dirichlet(
                class_concentration(n_kinds, cfg.slide_composition, half, bool(is_pos[i])) if by_mix
                else np.full(n_kinds, cfg.slide_composition))
            mixes[sid] = [round(float(v), 6) for v in mix]
            probs = composition_probs(kinds, mix)
        sp, gp = out_d / "slides" / f"{sid}.tiff", out_d / "ground_truth" / f"{sid}.csv"
        if sp.is_file() and gp.is_file():
            gt = read_ground_truth(gp)
        else:
            img, tissue, tum = build_slide(normal, tumor, positive=tf > 0, tumor_fraction=tf, grid=cfg.grid,
                                           tissue_fraction=tissue_frac, tile_size=t, rng=srng, arrangement=arr,
                                           stain=stain, normal_probs=probs)
            cells = np.argwhere(tissue)
            gt = np.column_stack([cells[:, 1] * t, cells[:, 0] * t, np.full(len(cells), t), tum[tissue].astype(int)])
            write_array_as_slide(sp, img, mpp=cfg.mpp)
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["x", "y", "size", "is_tumor"])
            w.writerows(gt.tolist())
            atomic.write_text(gp, buf.getvalue())
        tp = out_d / "tissue" / f"{sid}.geojson"
        if not tp.is_file():  # derived from the ground truth: also written for mosaics built before it
            atomic.write_json(tp, cells_geojson(gt))
        n_tis, n_tum = len(gt), int(gt[:, 3].sum())
        rows.append([sid, sid, int(is_pos[i]), f"{n_tum / max(1, n_tis):.4f}", n_tis, n_tum, arr])
        if verbose and (i + 1) % 25 == 0:
            print(f"{i + 1}/{cfg.slides} slides")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "patient_id", "label", "tumor_fraction", "n_tissue_tiles", "n_tumor_tiles", "arrangement"])
    w.writerows(rows)
    atomic.write_text(out_d / "labels.csv", buf.getvalue())
    meta = provenance(kind="mosaic", tiles=str(tiles), tile_size=t, mpp=cfg.mpp, seed=cfg.seed,
                      n_normal_tiles=len(normal), n_tumor_tiles=len(tumor), config=asdict(cfg),
                      n_positive=n_pos, n_negative=cfg.slides - n_pos,
                      **({"slide_stain_draws": draws} if draws else {}),
                      **({"tissue_kinds": np.bincount(kinds).tolist(), "slide_composition_draws": mixes}
                         if kinds is not None else {}),
                      **({"composition_classes": {"1": sorted(int(k) for k in half),
                                                  "0": sorted(set(range(n_kinds)) - {int(k) for k in half})}}
                         if by_mix else {}))
    atomic.write_json(out_d / "mosaic.json", meta)
    (out_d / BUILDING).unlink(missing_ok=True)
    return meta


def cell_runs(gt: np.ndarray) -> list[list[list[float]]]:
    """Polygons (one closed ring each, level-0 px) covering exactly the cells of ``gt`` rows (``x, y, size, ...``):
    one rectangle per horizontal run of adjacent cells."""
    polys = []
    for y in np.unique(gt[:, 1]):
        row = gt[gt[:, 1] == y]
        xs, size = np.sort(row[:, 0]), int(row[0, 2])
        breaks = np.flatnonzero(np.diff(xs) != size) + 1
        for run in np.split(xs, breaks):
            x0, x1, y0, y1 = float(run[0]), float(run[-1] + size), float(y), float(y + size)
            polys.append([[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]])
    return polys


def cells_geojson(gt: np.ndarray) -> dict:
    """A mosaic slide's tissue cells (class ``Tissue``) and tumour cells (class ``Tumor``) as GeoJSON MultiPolygons."""
    feats = []
    for name, rows, color in (("Tissue", gt, [0, 160, 0]), ("Tumor", gt[gt[:, 3] == 1], [200, 0, 0])):
        if len(rows):
            feats.append({"type": "Feature", "id": f"{name.lower()}",
                          "geometry": {"type": "MultiPolygon", "coordinates": cell_runs(rows)},
                          "properties": {"objectType": "annotation", "classification": {"name": name, "color": color}}})
    return {"type": "FeatureCollection", "features": feats}


def settings_diff(meta_path: Path, cfg: MosaicConfig) -> dict[str, tuple[Any, Any]]:
    """Settings (old, new) in which the mosaic recorded at ``meta_path`` (or, before it is written, the one being
    built beside it: :data:`BUILDING`) differs from ``cfg``; empty when it is the same mosaic or there is none yet."""
    import json

    if not meta_path.is_file():
        meta_path = meta_path.parent / BUILDING
        if not meta_path.is_file():
            return {}
    try:
        old = json.loads(meta_path.read_text()).get("config", {})
    except (OSError, ValueError):
        return {}  # an unreadable mosaic.json is rewritten at the end
    new = asdict(cfg)
    for k, v in (("slide_stain", 0.0), ("slide_composition", 0.0), ("tissue_kinds", 8)):
        old.setdefault(k, v)  # written before the option existed
    diff = {k: (old[k], new[k]) for k in new if k in old and _norm(old[k]) != _norm(new[k])}
    if not old["slide_composition"] and not new["slide_composition"]:
        diff.pop("tissue_kinds", None)  # unused without a composition
    return diff


def _check_same_settings(meta_path: Path, cfg: MosaicConfig) -> None:
    """A re-run resumes only the same mosaic: other settings (seed, grid, stain, ...) would mix two mosaics in one folder.
    That includes ``slides``: which slides are positive is a permutation drawn over all of them."""
    diff = settings_diff(meta_path, cfg)
    if diff:
        shown = ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in diff.items())
        partial = not meta_path.is_file()
        raise GigaslideError(f"this folder holds a mosaic {'partly built' if partial else 'built'} with other settings "
                             f"({shown})", path=meta_path.parent / BUILDING if partial else meta_path,
                             fix="use another --out for the new settings, or the same settings to resume")


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def read_ground_truth(path: str | os.PathLike) -> np.ndarray:
    """``[M, 4]`` int array ``x, y, size, is_tumor`` (level-0 px) of a mosaic slide's tissue tiles."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("ground-truth file not found", path=p, fix="pass MOSAIC_DIR/ground_truth/SLIDE.csv")
    a = np.loadtxt(p, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return a.reshape(-1, 4)


def tumor_labels_for_coords(gt: np.ndarray, coords: np.ndarray, tile_size0: float) -> np.ndarray:
    """1 where a tile (level-0 top-left ``coords``, side ``tile_size0``) has its centre in a tumour cell."""
    if len(gt) == 0:
        return np.zeros(len(coords), np.int64)
    cell = int(gt[0, 2])
    tum = {(int(x) // cell, int(y) // cell) for x, y, s, t in gt if t}
    cx = (np.asarray(coords)[:, 0] + tile_size0 / 2) // cell
    cy = (np.asarray(coords)[:, 1] + tile_size0 / 2) // cell
    return np.array([(int(a), int(b)) in tum for a, b in zip(cx, cy)], dtype=np.int64)

"""Pathology augmentations on tensors, each driven by an explicit ``torch.Generator``.

Kang et al. (2023) found that pathology SSL benefits from (i) stain augmentation instead of strong
colour changes, (ii) vertical flips and 90° rotations (tissue has no "up"), and (iii) no
solarisation. :data:`PRESETS` holds that ``pathology`` recipe next to the usual ``imagenet`` one
(SimCLR/BYOL/DINO-style colour jitter, grayscale, solarisation) for comparison.

All functions take a float image ``[3, H, W]`` in ``[0, 1]`` and return one in ``[0, 1]``.
Randomness comes from the generator passed in, so a (seed, step, sample) triple always yields
the same views: training resumes bit-for-bit and data-loader workers need no RNG plumbing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

import torch
import torchvision.transforms.v2.functional as TF

from gigaslide.ssl.tile.crops import (  # noqa: F401  (re-exported)
    MIN_PATCHES,
    check_scale,
    check_tile_pixels,
    default_local_size,
    plan_crops,
)
from gigaslide.ssl.tile.randstain import lab_statistics, random_lab_transfer

#: Stain augmentations: HED-light jitter (Tellez et al. 2019) or RandStainNA (Shen et al. 2022, Lab).
STAIN_MODES = ("hed", "randstainna")

#: Ruifrok & Johnston stain vectors (rows: hematoxylin, eosin, DAB), as in ``skimage.color.rgb_from_hed``.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_OD_EPS = 1e-3  # darkest intensity before log (keeps OD finite for black pixels)


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0, n: int | None = None) -> torch.Tensor | float:
    x = torch.rand(n or 1, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return x if n else float(x)


def _p(g: torch.Generator, p: float) -> bool:
    return p > 0 and (p >= 1 or _u(g) < p)


# -- stain (H&E) -------------------------------------------------------------------------------
def rgb_to_hed(img: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (optical density along H, E, D) of ``[..., 3, H, W]`` RGB in [0, 1]."""
    od = -torch.log(img.clamp(min=_OD_EPS))
    return torch.einsum("...chw,cs->...shw", od, HED_FROM_RGB.to(img.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (clipped to [0, 1])."""
    od = torch.einsum("...shw,sc->...chw", hed, RGB_FROM_HED.to(hed.dtype))
    return torch.exp(-od).clamp(0.0, 1.0)


def stain_weight(od_sum: torch.Tensor) -> torch.Tensor:
    """How much a pixel is stained, from its total optical density: 0 for glass (OD sum <= 0.2: grey
    lighter than ~239), 1 for tissue (OD sum >= 0.6: grey ~209 or darker), linear in between."""
    return ((od_sum - 0.2) / 0.4).clamp(0.0, 1.0)


def stain_jitter(img: torch.Tensor, alpha: torch.Tensor | list[float], beta: torch.Tensor | list[float]) -> torch.Tensor:
    """Scale (``alpha``) and shift (``beta``) each stain's concentration (HED-light, Tellez et al. 2019).

    The change is weighted per pixel by :func:`stain_weight`, so glass stays glass: unstained
    background keeps its colour and only the stain amounts of tissue change. In optical density
    ``od`` (row vector) with ``R`` = :data:`RGB_FROM_HED`:
    ``od' = od + w * (od @ (R^-1 diag(alpha) R - I) + beta @ R)``; for tissue (w = 1) this is exactly
    ``hed' = alpha * hed + beta``.
    """
    a = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    b = torch.as_tensor(beta, dtype=torch.float64).flatten()
    delta = (HED_FROM_RGB @ torch.diag(a) @ RGB_FROM_HED - torch.eye(3, dtype=torch.float64)).to(torch.float32)
    bias = (b @ RGB_FROM_HED).to(torch.float32)
    x = img.float()
    od = (-torch.log(x.clamp(min=_OD_EPS))).movedim(-3, -1)  # [..., H, W, 3]
    w = stain_weight(od.sum(-1, keepdim=True))
    out = torch.exp(-(od + w * (od @ delta + bias))).clamp(0.0, 1.0)
    return out.movedim(-1, -3).to(img.dtype).contiguous()


def random_stain_jitter(img: torch.Tensor, g: torch.Generator, sigma: float = 0.05, bias: float = 0.02) -> torch.Tensor:
    alpha = _u(g, 1 - sigma, 1 + sigma, 3)
    beta = _u(g, -bias, bias, 3)
    return stain_jitter(img, alpha, beta)


# -- geometry ----------------------------------------------------------------------------------
def random_resized_crop(img: torch.Tensor, g: torch.Generator, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameter sampling, with our generator."""
    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * _u(g, *scale)
        ar = math.exp(_u(g, math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            break
    else:  # centre crop fallback
        ch, cw = h, w
        top = left = 0
    return TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)


def random_flip_rotate(img: torch.Tensor, g: torch.Generator, hflip: float, vflip: float, rot90: bool) -> torch.Tensor:
    if _p(g, hflip):
        img = img.flip(-1)
    if _p(g, vflip):
        img = img.flip(-2)
    if rot90:
        k = int(torch.randint(0, 4, (1,), generator=g))
        img = torch.rot90(img, k, dims=(-2, -1))
    return img


# -- colour, blur --------------------------------------------------------------------------------
def random_color_jitter(img: torch.Tensor, g: torch.Generator, strength: tuple[float, float, float, float]) -> torch.Tensor:
    b, c, s, h = strength
    ops = torch.randperm(4, generator=g).tolist()
    for op in ops:
        if op == 0 and b > 0:
            img = TF.adjust_brightness(img, _u(g, 1 - b, 1 + b))
        elif op == 1 and c > 0:
            img = TF.adjust_contrast(img, _u(g, 1 - c, 1 + c))
        elif op == 2 and s > 0:
            img = TF.adjust_saturation(img, _u(g, 1 - s, 1 + s))
        elif op == 3 and h > 0:
            img = TF.adjust_hue(img, _u(g, -h, h))
    return img.clamp(0.0, 1.0)


def random_blur(img: torch.Tensor, g: torch.Generator, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    s = _u(g, *sigma)
    k = max(3, int(round(img.shape[-1] * 0.07)) | 1)
    return TF.gaussian_blur(img, [k, k], [s, s])


# -- recipes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewAug:
    """One view's recipe; probabilities are per image."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: bool = False
    stain: float = 0.0  # probability of a stain augmentation (``stain_mode``)
    stain_mode: str = "hed"  # hed: HED-light jitter; randstainna: Lab statistics drawn from the training set's
    lab_stats: tuple | None = None  # randstainna: (mean, std) of per-tile Lab statistics (MultiView.prepare fills it)
    stain_sigma: float = 0.05
    stain_bias: float = 0.02
    color: float = 0.8  # probability of colour jitter
    color_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    gray: float = 0.2
    blur: float = 0.5
    solarize: float = 0.0


def apply_view(img: torch.Tensor, cfg: ViewAug, g: torch.Generator) -> torch.Tensor:
    """One augmented view of ``img`` (float [3, H, W] in [0, 1])."""
    x = random_resized_crop(img, g, cfg.size, cfg.scale)
    x = random_flip_rotate(x, g, cfg.hflip, cfg.vflip, cfg.rot90)
    if _p(g, cfg.stain):
        if cfg.stain_mode == "randstainna":
            if cfg.lab_stats is None:
                raise RuntimeError("stain_mode=randstainna needs the training set's statistics: call MultiView.prepare(source)")
            x = random_lab_transfer(x, g, cfg.lab_stats)
        else:
            x = random_stain_jitter(x, g, cfg.stain_sigma, cfg.stain_bias)
    if _p(g, cfg.color):
        x = random_color_jitter(x, g, cfg.color_strength)
    if _p(g, cfg.gray):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if _p(g, cfg.blur):
        x = random_blur(x, g)
    if _p(g, cfg.solarize):
        x = TF.solarize(x, 0.5)
    return x.clamp(0.0, 1.0).contiguous()


PRESETS: dict[str, ViewAug] = {
    # Kang et al. 2023: stain jitter, v+h flips, 90° rotations, milder colour changes, no solarisation.
    "pathology": ViewAug(size=0, scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rot90=True, stain=0.8,
                         color=0.5, color_strength=(0.2, 0.2, 0.1, 0.02), gray=0.1, blur=0.3, solarize=0.0),
    # SimCLR / BYOL / DINO ImageNet recipe.
    "imagenet": ViewAug(size=0, scale=(0.08, 1.0), hflip=0.5, color=0.8, color_strength=(0.4, 0.4, 0.2, 0.1),
                        gray=0.2, blur=0.5, solarize=0.0),
}


def view_recipes(kind: str, preset: str, tile_size: int, n_local: int = 6, multiple: int = 8, *,
                 patch: int | None = None, local_size: int | None = None,
                 global_scale: tuple[float, float] | None = None, local_scale: tuple[float, float] | None = None,
                 what: str = "the backbone", flag: str = "--tile-size") -> list[ViewAug]:
    """Per-view recipes: ``kind`` is ``"two"`` (SimCLR, MoCo, Barlow Twins), ``"multicrop"`` (DINO, SwAV)
    or ``"dinov2"`` (Roth et al.: 2 global crops, scale 0.32-1, + ``n_local`` local crops of 98/224
    of the tile, scale 0.05-0.32, sizes whole multiples of the ViT patch).

    Two-view recipes follow BYOL's asymmetry (view 2: less blur; solarisation only in the
    ``imagenet`` preset). Multi-crop: 2 global crops at ``tile_size`` + ``n_local`` local crops at
    ~43 % of it (96/224, rounded to a multiple of ``multiple``). ``patch`` (a ViT's patch size, read
    from the model) makes every size a checked multiple of it (:func:`plan_crops`). ``preset`` may
    carry overrides of :class:`ViewAug` fields, e.g. ``pathology,stain_mode=randstainna,rot90=0``
    (:func:`parse_augment`).
    """
    from gigaslide.errors import GigaslideError

    name, overrides = parse_augment(preset)
    base = replace(PRESETS[name], **overrides)
    imagenet = name == "imagenet"
    if kind not in ("two", "multicrop", "dinov2"):
        raise ValueError(f"unknown view kind {kind!r}")
    n_loc = 0 if kind == "two" else int(n_local)
    if n_loc < 0:
        raise GigaslideError(f"--n-local {n_local} must be 0 or more")
    if patch is not None:
        glob_size, loc_size = plan_crops(tile_size, patch, local_size, n_local=n_loc, what=what, flag=flag)
    else:
        glob_size = int(tile_size)
        loc_size = (int(local_size) if local_size else default_local_size(glob_size, multiple)) if n_loc else None
    if kind == "two":  # the preset's crop scale unless --global-scale is given
        g2 = check_scale("global_scale", global_scale) if global_scale else base.scale
        views = [replace(base, size=glob_size, scale=g2, blur=1.0 if imagenet else base.blur),
                 replace(base, size=glob_size, scale=g2, blur=0.1 if imagenet else base.blur,
                         solarize=0.2 if imagenet else base.solarize)]
        return views
    if kind == "dinov2":
        g_default, l_default = (0.32, 1.0), (0.05, 0.32)
    else:
        g_default, l_default = ((0.32, 1.0), (0.05, 0.32)) if imagenet else ((0.4, 1.0), (0.1, 0.4))
    g_scale = check_scale("global_scale", global_scale or g_default)
    l_scale = check_scale("local_scale", local_scale or l_default)
    glob = [replace(base, size=glob_size, scale=g_scale, blur=1.0 if imagenet else base.blur),
            replace(base, size=glob_size, scale=g_scale, blur=0.1 if imagenet else base.blur,
                    solarize=0.2 if imagenet else base.solarize)]
    return glob + [replace(base, size=loc_size, scale=l_scale)] * n_loc


def parse_augment(text: str) -> tuple[str, dict]:
    """``"pathology,vflip=0,rot90=0,stain_mode=randstainna"`` -> (preset name, :class:`ViewAug` overrides)."""
    from gigaslide.errors import GigaslideError

    name, *items = [t.strip() for t in str(text).split(",") if t.strip()] or [""]
    if name not in PRESETS:
        raise GigaslideError(f"unknown augmentation preset '{name}'", fix=f"use one of: {', '.join(PRESETS)}")
    fields = {f.name: f for f in dataclasses.fields(ViewAug)} if items else {}
    out: dict = {}
    for it in items:
        key, _, val = it.partition("=")
        if key not in fields or key in ("size", "scale", "lab_stats") or not val:
            allowed = ", ".join(k for k in fields if k not in ("size", "scale", "lab_stats"))
            raise GigaslideError(f"cannot read augmentation option '{it}' in --augment {text}", fix=f"use KEY=VALUE with KEY one of: {allowed}")
        cur = getattr(PRESETS[name], key)
        try:
            if isinstance(cur, bool):
                out[key] = val.lower() in ("1", "true", "yes", "on")
            elif isinstance(cur, str):
                out[key] = val
            elif isinstance(cur, tuple):
                out[key] = tuple(float(v) for v in val.split("/"))
            else:
                out[key] = type(cur)(float(val))
        except ValueError:
            raise GigaslideError(f"augmentation option '{it}' has a bad value", fix=f"{key} is a {type(cur).__name__}") from None
    if out.get("stain_mode", "hed") not in STAIN_MODES:
        raise GigaslideError(f"unknown stain_mode '{out['stain_mode']}'", fix=f"use one of: {', '.join(STAIN_MODES)}")
    return name, out


class MultiView:
    """Callable turning one image into a list of views (one per recipe)."""

    def __init__(self, recipes: list[ViewAug]):
        self.recipes = recipes

    def needs_fit(self) -> bool:
        return any(r.stain > 0 and r.stain_mode == "randstainna" and r.lab_stats is None for r in self.recipes)

    def prepare(self, source, patch: int | None = None, n: int = 256, seed: int = 0) -> MultiView:  # noqa: ANN001
        """Look at the data before training: refuse tiles smaller than the smallest crop the model can take
        (:func:`check_tile_pixels`), and fill RandStainNA's statistics from up to ``n`` tiles (fixed by ``seed``)."""
        import numpy as np

        g = torch.Generator().manual_seed(seed)
        first = source.load(0, g)
        check_tile_pixels(np.asarray(first).shape, patch, getattr(source, "folder", None) or getattr(source, "paths", [None])[0])
        if not self.needs_fit():
            return self
        idx = np.random.default_rng(seed).permutation(len(source))[:n]
        stats = lab_statistics(source.load(int(i), g) for i in idx)
        self.recipes = [replace(r, lab_stats=stats) if r.stain_mode == "randstainna" else r for r in self.recipes]
        return self

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        if img.dtype == torch.uint8:
            img = to_float(img)
        return [apply_view(img, r, g) for r in self.recipes]

    def __len__(self) -> int:
        return len(self.recipes)


def to_float(img: torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (as read) -> float ``[3, H, W]`` in [0, 1]."""
    if img.dtype == torch.uint8:
        img = img.permute(2, 0, 1).float().div_(255.0) if img.shape[-1] == 3 else img.float().div_(255.0)
    return img

"""Crop sizes that work: every crop a ViT sees must be a whole number of patches (patch size read from
the model), at least 2x2 patches; anything else is refused before training with a one-line error
that lists sizes that would work."""

from __future__ import annotations

from gigaslide.errors import GigaslideError


def default_local_size(tile_size: int, multiple: int) -> int:
    """Local (multi-crop) crop side for global crops of ``tile_size``: 96/224 of it (DINO's ratio), a multiple of
    ``multiple``, at least two multiples, at most ``tile_size``."""
    s = max(2 * multiple, int(round(tile_size * 96 / 224 / multiple)) * multiple)
    return min(s, tile_size)


#: A ViT crop must hold at least this many patches per side.
MIN_PATCHES = 2
#: Roth et al. / DINOv2: local crops are 98/224 of the global crop.
DINOV2_LOCAL_FRACTION = 98 / 224


def _sizes_hint(patch: int, lo: int, hi: int) -> str:
    sizes = list(range(max(lo, patch) // patch * patch or patch, hi + 1, patch))
    sizes = [s for s in sizes if lo <= s <= hi]
    if not sizes:
        return "none"
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"multiples of {patch} from {sizes[0]} to {sizes[-1]} ({', '.join(map(str, sizes[:4]))}, ...)"


def check_scale(name: str, scale: tuple[float, float] | list[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise GigaslideError(f"{name} {scale!r} is not a pair of numbers", fix=f"give {name} as [min, max], e.g. [0.32, 1.0]") from None
    if not (0 < lo <= hi <= 1):
        raise GigaslideError(f"{name} ({lo}, {hi}) must satisfy 0 < min <= max <= 1 (fractions of the tile's area)",
                             fix=f"e.g. {name} [0.32, 1.0] for global crops, [0.05, 0.32] for local crops")
    return lo, hi


def plan_crops(tile_size: int, patch: int | None, local_size: int | None = None, *, n_local: int = 0,
               what: str = "the backbone", flag: str = "--tile-size") -> tuple[int, int | None]:
    """(global crop size, local crop size or None) for a run, or a one-line error saying which sizes work.

    ``patch`` is the ViT's patch size read from the model (None for CNNs: any size works). Every
    crop of a ViT must be a whole number of patches and at least :data:`MIN_PATCHES` patches wide;
    local crops default to 98/224 of the tile (Roth et al.: 98 px locals for 224 px globals).
    """
    t = int(tile_size)
    if patch is None:
        loc = None if n_local <= 0 else (int(local_size) if local_size else default_local_size(t, 8))
        if loc is not None and not (8 <= loc <= t):
            raise GigaslideError(f"local crop size {loc} must be between 8 and --tile-size {t}", fix=f"use a local size of 8 to {t} px")
        return t, loc
    p = int(patch)
    smallest = MIN_PATCHES * p
    if t < smallest:
        raise GigaslideError(f"{flag} {t} is smaller than the smallest crop {what} (patch {p}) can take, {smallest} px "
                             f"({MIN_PATCHES}x{MIN_PATCHES} patches)", fix=f"use {flag} {_sizes_hint(p, smallest, max(smallest, 4 * p))}")
    if t % p:
        lo, hi = t // p * p, (t // p + 1) * p
        lo_s = f"{lo} or " if lo >= smallest else ""
        raise GigaslideError(f"{flag} {t} is not a multiple of the patch size {p} of {what}",
                             fix=f"use {flag} {lo_s}{hi} (crops must be whole patches)")
    if n_local <= 0:
        return t, None
    if local_size is None:
        loc = min(t, max(smallest, int(round(t * DINOV2_LOCAL_FRACTION / p)) * p))
    else:
        loc = int(local_size)
        if loc % p or not (smallest <= loc <= t):
            raise GigaslideError(f"local crop size {loc} does not work with patch {p} and --tile-size {t}",
                                 fix=f"use a local size of {_sizes_hint(p, smallest, t)}")
    return t, loc


def check_tile_pixels(shape: tuple[int, ...], patch: int | None, path=None) -> None:  # noqa: ANN001
    """Refuse source tiles (``[H, W, 3]``) smaller than the smallest crop: 2x2 patches for a ViT, 16 px for a CNN."""
    smallest = MIN_PATCHES * patch if patch else 16
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < smallest:
        what = f"a patch-{patch} ViT ({MIN_PATCHES}x{MIN_PATCHES} patches)" if patch else "the CNN"
        raise GigaslideError(f"tiles are {h}x{w} px, smaller than the smallest crop {what} can take, {smallest} px", path=path,
                             fix=f"use tiles of at least {smallest} px" + (", or a backbone with a smaller patch" if patch else ""))

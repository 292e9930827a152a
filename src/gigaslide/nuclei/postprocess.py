"""HoVer-Net post-processing: NP probability + HV maps -> instance map (marker-controlled watershed).

As in Graham et al. (2019): the HV maps are differentiated (a derivative-of-Gaussian filter stands in for the
21x21 Sobel kernel), the derivatives scaled to [0, 1], and ``energy = max(1 - ∂h/∂x, 1 - ∂v/∂y)`` is high on the
boundaries between touching nuclei; markers are the nuclear pixels of low energy (opened, small ones
removed; a nuclear component left without a marker becomes one), and a watershed of the smoothed distance grows them inside the nuclear mask.

HoVer-Net scales each derivative by its minimum and maximum over the whole tile processed, so one steep nucleus
anywhere in it moved the markers of all the others: the nuclei found depended on the size and place of the region a
slide is cut into (4 of 62 nuclei 64 px inside a 300 px crop of a MoNuSeg image split or merged differently from the
whole image's). Here the minimum and maximum are taken within ``norm_radius`` px of each pixel (as steep a nucleus
further away changes nothing), so the instances of a crop are the whole image's wherever the crop reaches
``norm_radius`` plus a nucleus and the filters' support past them (:data:`CONTEXT_PX` in all).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PostParams:
    np_threshold: float = 0.5
    energy_threshold: float = 0.4
    gradient_sigma: float = 2.0  # px at the model mpp
    min_size: int = 10  # px at the model mpp (objects and markers smaller than this are removed)
    norm_radius: int = 40  # px at the model mpp: the derivatives are scaled by their range within this distance

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> PostParams:
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


#: Context (px at the model mpp) past a nucleus that its instance depends on at the default parameters: the scaling
#: radius (40), the derivative filter's support (4 sigma: 8) and the distance smoothing's (4). A region read with
#: this much margin past its nuclei finds them as the whole slide would (apart from the network's own context).
CONTEXT_PX = 52


def _local_norm01(x: np.ndarray, radius: int) -> np.ndarray:
    """``x`` scaled to [0, 1] by its minimum and maximum within ``radius`` px (a square window) of each pixel; 0 where
    they are equal."""
    from scipy import ndimage as ndi

    size = 2 * int(radius) + 1
    lo = ndi.minimum_filter(x, size=size, mode="nearest")
    span = ndi.maximum_filter(x, size=size, mode="nearest") - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def instances(np_prob: np.ndarray, hv: np.ndarray, params: PostParams = PostParams()) -> np.ndarray:
    """Instance map int32 [H, W] from the nuclear-pixel probability [H, W] and HV maps [2, H, W]."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk, remove_small_objects
    from skimage.segmentation import watershed

    blb = np_prob >= params.np_threshold
    if not blb.any():
        return np.zeros(np_prob.shape, np.int32)
    blb = remove_small_objects(blb, max_size=params.min_size - 1)
    if not blb.any():
        return np.zeros(np_prob.shape, np.int32)
    # (HoVer-Net scales the HV maps to [0, 1] first: a positive factor and an offset, which the scaling of the
    # derivatives undoes)
    dh = ndi.gaussian_filter(hv[0].astype(np.float64), params.gradient_sigma, order=(0, 1))
    dv = ndi.gaussian_filter(hv[1].astype(np.float64), params.gradient_sigma, order=(1, 0))
    energy = np.maximum(1.0 - _local_norm01(dh, params.norm_radius), 1.0 - _local_norm01(dv, params.norm_radius))
    energy = np.clip(energy - (1.0 - blb), 0, None)
    dist = -ndi.gaussian_filter((1.0 - energy) * blb, 0.8)
    marker = blb & ~(energy >= params.energy_threshold)
    marker = ndi.binary_fill_holes(marker)
    marker = ndi.binary_opening(marker, structure=disk(2))
    markers = ndi.label(remove_small_objects(marker, max_size=params.min_size - 1))[0]
    comps, n = ndi.label(blb)
    orphan = np.setdiff1d(np.arange(1, n + 1), np.unique(comps[markers > 0]))
    if len(orphan):  # a nucleus whose energy left no marker is kept whole (HoVer-Net would drop it)
        extra = np.isin(comps, orphan)
        markers = np.where(extra, ndi.label(extra)[0] + markers.max(), markers)
    inst = watershed(dist, markers=markers, mask=blb)
    sizes = np.bincount(inst.ravel())
    inst[sizes[inst] < params.min_size] = 0
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(inst.astype(np.int32))[0]


def instance_types(inst: np.ndarray, nc_prob: np.ndarray | None) -> dict[int, tuple[int, float]]:
    """``id -> (type, probability)``: majority type of the NC arg-max inside each nucleus, and its mean prob."""
    if nc_prob is None:
        return {}
    from scipy import ndimage as ndi

    arg = nc_prob.argmax(0)
    out = {}
    for k, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        m = inst[sl] == k
        a = arg[sl][m]
        fg = a[a > 0]
        t = int(np.bincount(fg).argmax()) if fg.size else int(np.bincount(a).argmax())
        out[k] = (t, float(nc_prob[t][sl][m].mean()))
    return out


__all__ = ["CONTEXT_PX", "PostParams", "instance_types", "instances"]

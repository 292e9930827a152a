"""Tile plan: which input crops to run so the stitched outputs equal the whole-image pass exactly.

Along each axis, a crop ``[c, e)`` starts at a multiple of the trunk's stride (so its output grid is
the dense grid shifted by ``c / stride``). An output position ``j`` computed from that crop is exact
when its receptive field ``[j*S + lo, j*S + hi]`` lies inside the crop, or runs past a crop edge
that is also the image edge (there the crop pads exactly as the whole image does). Each output
position is taken from exactly one crop.

With ``align = k`` (a max-pool of kernel and stride ``k`` applied to the trunk's output), every crop's
exact outputs start and end on multiples of ``k`` (the last crop ends at the image edge), so each crop
can be pooled on its own and the pooled pieces tile the pooled map exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigaslide.errors import GigaslideError
from gigaslide.streaming.geometry import Axis


@dataclass(frozen=True)
class Span:
    """One crop along an axis: input ``[start, stop)`` gives exact outputs ``[out_start, out_stop)``."""

    start: int
    stop: int
    out_start: int
    out_stop: int

    def local(self, stride: int) -> slice:
        """Slice of the crop's own output that holds the exact positions."""
        off = self.start // stride
        return slice(self.out_start - off, self.out_stop - off)


@dataclass(frozen=True)
class Tile:
    rows: Span
    cols: Span


def plan_axis(n: int, tile: int, axis: Axis, n_out: int, align: int = 1) -> list[Span]:
    """Crops covering ``n`` input px (``n_out`` output positions) with crops of at most ``tile`` px,
    each crop's exact outputs starting and ending on multiples of ``align`` (except at the image end)."""
    s, lo, hi = axis.stride, axis.lo, axis.hi
    spans: list[Span] = []
    start, j = 0, 0
    while j < n_out:
        stop = min(start + tile, n)
        last = n_out - 1 if stop == n else min(n_out - 1, (stop - 1 - hi) // s)
        if last < n_out - 1 and align > 1:
            last = (last + 1) // align * align - 1  # end on a pooling window boundary
        if last < j:
            raise GigaslideError(
                f"tile size {tile} px leaves no exact output (receptive field {axis.field} px, stride {s}"
                f"{f', pool kernel {align}' if align > 1 else ''})",
                fix=f"use a tile size of at least {axis.field + align * s} px")
        spans.append(Span(start, stop, j, last + 1))
        j = last + 1
        start = max(0, ((j * s + lo) // s) * s)
    return spans


def plan(size: tuple[int, int], tile: int, axes: tuple[Axis, Axis], out_size: tuple[int, int], align: int = 1) -> list[Tile]:
    """2-D tile plan (row-major) for an input of ``size`` (h, w); ``out_size`` is the trunk's (unpooled) output."""
    rows = plan_axis(size[0], tile, axes[0], out_size[0], align)
    cols = plan_axis(size[1], tile, axes[1], out_size[1], align)
    return [Tile(r, c) for r in rows for c in cols]

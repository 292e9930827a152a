"""Tile plan: which input crops to run so the stitched outputs equal the whole-image pass exactly.

Along each axis, a crop ``[c, e)`` starts at a multiple of the trunk's stride (so its output grid is
the dense grid shifted by ``c / stride``). An output position ``j`` computed from that crop is exact
when its receptive field ``[j*S + lo, j*S + hi]`` lies inside the crop, or runs past a crop edge
that is also the image edge (there the crop pads exactly as the whole image does). Each output
position is taken from exactly one crop.
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


def plan_axis(n: int, tile: int, axis: Axis, n_out: int) -> list[Span]:
    """Crops covering ``n`` input px (``n_out`` output positions) with crops of at most ``tile`` px."""
    s, lo, hi = axis.stride, axis.lo, axis.hi
    spans: list[Span] = []
    start, j = 0, 0
    while j < n_out:
        stop = min(start + tile, n)
        last = n_out - 1 if stop == n else min(n_out - 1, (stop - 1 - hi) // s)
        if last < j:
            raise GigaslideError(
                f"tile size {tile} px leaves no exact output (receptive field {axis.field} px, stride {s})",
                fix=f"use a tile size of at least {axis.field + s} px")
        spans.append(Span(start, stop, j, last + 1))
        j = last + 1
        start = max(0, ((j * s + lo) // s) * s)
    return spans


def plan(size: tuple[int, int], tile: int, axes: tuple[Axis, Axis], out_size: tuple[int, int]) -> list[Tile]:
    """2-D tile plan (row-major) for an input of ``size`` (h, w)."""
    rows = plan_axis(size[0], tile, axes[0], out_size[0])
    cols = plan_axis(size[1], tile, axes[1], out_size[1])
    return [Tile(r, c) for r in rows for c in cols]

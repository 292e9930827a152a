"""Streaming convolution: whole-image CNN training with memory bounded by one tile (Pinckaers et al.).

``StreamingCNN(trunk, tile_size)(image)`` equals ``trunk(image)`` and back-propagates exact
gradients, tile by tile. See :mod:`gigaslide.streaming.stream`.
"""

from gigaslide.streaming.geometry import Axis, Geometry, trace
from gigaslide.streaming.stream import StreamingCNN
from gigaslide.streaming.tiles import Span, Tile, plan, plan_axis

__all__ = ["Axis", "Geometry", "Span", "StreamingCNN", "Tile", "plan", "plan_axis", "trace"]

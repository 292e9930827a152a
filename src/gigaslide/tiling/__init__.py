"""Stage 2 — tiling: tissue segmentation and a tile grid at a target resolution (level-0 coordinates)."""

from gigaslide.tiling.grid import TileGrid, grid_positions, make_grid
from gigaslide.tiling.job import TilingParams, layout, tile_slide
from gigaslide.tiling.overlay import grid_overlay_png
from gigaslide.tiling.store import load_grid, save_grid
from gigaslide.tiling.tissue import TissueMask, mask_to_geojson, overlay_png, save_geojson, segment_array, segment_tissue

__all__ = ["TileGrid", "TilingParams", "TissueMask", "layout", "tile_slide", "grid_overlay_png", "grid_positions", "load_grid", "make_grid", "mask_to_geojson",
           "overlay_png", "save_geojson", "save_grid", "segment_array", "segment_tissue"]

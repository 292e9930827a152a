"""Stage 2 — tiling: tissue segmentation and a tile grid at a target resolution (level-0 coordinates)."""

from gigaslide.tiling.annotations import annotation_tissue, read_polygons
from gigaslide.tiling.grid import GRID_RULE, TileGrid, grid_positions, make_grid, padding_fraction, select_tiles
from gigaslide.tiling.job import IDENTITY_KEY, Scan, TilingParams, layout, reusable_grid, tile_slide
from gigaslide.tiling.overlay import grid_overlay_png
from gigaslide.tiling.stain import StainInfo, StainWarning, detect_background, detect_stain
from gigaslide.tiling.store import load_grid, save_grid
from gigaslide.tiling.tissue import TissueMask, mask_to_geojson, overlay_png, save_geojson, segment_array, segment_tissue

__all__ = ["GRID_RULE", "IDENTITY_KEY", "Scan", "StainInfo", "StainWarning", "TileGrid", "TilingParams", "TissueMask",
           "annotation_tissue",
           "detect_background", "detect_stain", "read_polygons",
           "grid_overlay_png", "grid_positions", "layout", "load_grid", "make_grid", "mask_to_geojson", "overlay_png",
           "padding_fraction", "reusable_grid", "save_geojson", "save_grid", "segment_array", "segment_tissue",
           "select_tiles", "tile_slide"]

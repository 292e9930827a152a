"""Exports of an encode output (+ training runs) for other tools: AnnData for scverse, GeoJSON for QuPath.

Reads only on-disk artifacts and public functions of the lower stages; :mod:`gigaslide.viewer`
(the same stage) reuses its catalogue of slides and runs. Nothing below the CLI imports this package.
"""

from gigaslide.export.anndata_export import build_anndata, export_anndata
from gigaslide.export.catalog import SlideEntry, complete_entry, list_slides, scan, scan_out_dir
from gigaslide.export.qupath import export_qupath, tiles_geojson
from gigaslide.export.runs import Run, TileScorer, load_run, load_runs

__all__ = ["Run", "SlideEntry", "TileScorer", "build_anndata", "complete_entry", "export_anndata", "export_qupath",
           "list_slides", "load_run", "load_runs", "scan", "scan_out_dir", "tiles_geojson"]

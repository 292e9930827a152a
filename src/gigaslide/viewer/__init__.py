"""A read-only slide viewer in the browser: deep-zoom slide tiles and tiled overlay layers.

``gigaslide view OUT_DIR [--runs RUN_DIR ...]`` serves, on 127.0.0.1 only by default:

* the slide itself as Deep Zoom tiles (OpenSlide's ``DeepZoomGenerator``; slides OpenSlide cannot
  open go through :func:`gigaslide.slides.open_slide`), shown with OpenSeadragon (shipped as package
  data, nothing is fetched at run time);
* overlays in slide (level-0) coordinates, each a tiled layer rendered server side as PNG tiles of the
  same pyramid: tissue mask, tile grid, per-tile attention / probability of any MIL fold, nuclei outlines,
  StreamingCLAM attention grids saved by ``heatmap-streaming``, and per-tile SLPD prototype / Giga-SSL
  cluster ids of slide-SSL runs (:mod:`gigaslide.viewer.runlayers`);
* per-tile information and the most similar tiles of all slides (exact cosine search).

Why FastAPI + uvicorn rather than Flask: uvicorn is a production server that serves many tile
requests at once (OpenSeadragon asks for 6-8 tiles in parallel); FastAPI runs the plain ``def``
routes in a thread pool, where OpenSlide and NumPy release the GIL, and validates query parameters
(threshold in [0, 1], tile numbers) before any code runs; its ``TestClient`` tests routes in
process. Flask's built-in server is documented as a development server only.

Imports only lower stages and :mod:`gigaslide.export` (its catalogue of slides and runs); only the
CLI imports this package.
"""

from gigaslide.viewer.app import build_app
from gigaslide.viewer.server import Server, bind
from gigaslide.viewer.state import ViewerState

__all__ = ["Server", "ViewerState", "bind", "build_app"]

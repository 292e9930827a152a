"""Stage 1 — slides: open any OpenSlide format and read pixels at a physical resolution (µm/px)."""

from gigaslide.slides.discover import find_slides
from gigaslide.slides.ids import by_slide_id, slide_id_from_path
from gigaslide.slides.mpp import Mpp, load_mpp_table, mpp_from_properties
from gigaslide.slides.reader import TileReader, iter_tiles
from gigaslide.slides.slide import LevelChoice, Slide


def open_slide(path, *, mpp=None, slide_id=None) -> Slide:  # noqa: ANN001
    """Open ``path`` (OpenSlide, then tiffslide, then plain image). ``mpp`` overrides the metadata."""
    return Slide(path, mpp=mpp, slide_id=slide_id)


__all__ = ["LevelChoice", "Mpp", "Slide", "TileReader", "by_slide_id", "find_slides", "iter_tiles", "load_mpp_table",
           "mpp_from_properties", "open_slide", "slide_id_from_path"]

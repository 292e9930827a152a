"""Commands of the spine: info, tile, encoders, encode."""
from __future__ import annotations

from gigaslide.cli.main import Command


def info(slide: str, slide_mpp: float | str | None = None) -> None:
    """Show a slide's levels, dimensions, mpp (and where it came from), vendor and associated images.

    Example: gigaslide info ../shared/data/slides/cmu-1-small-region.svs

    Args:
        slide: slide file
        slide_mpp: override the resolution (µm/px at level 0), or a CSV with columns slide_id,mpp
    """
    print(slide, slide_mpp)


COMMANDS = {"info": Command(info, positional="slide", nargs=None)}

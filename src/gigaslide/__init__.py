"""gigaslide: gigapixel whole-slide images to compact representations and slide-level predictions.

Stages follow the data flow: ``slides`` -> ``tiling`` -> ``encoders`` -> ``features`` ->
``ssl`` (tile, slide) -> ``mil`` -> ``streaming`` -> ``evaluation`` -> ``cli``.
"""

__version__ = "0.1.0"

from gigaslide.errors import GigaslideError

__all__ = ["GigaslideError", "__version__"]

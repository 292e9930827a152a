"""TIFFs with samples deeper than 8 bits are refused in one line (every reader read them wrong, silently)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gigaslide.errors import GigaslideError
from gigaslide.slides import open_slide

RES = dict(resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm/px


def _image(h: int = 300, w: int = 300) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("name,data,kw", [
    # 16-bit grayscale, tiled with partial edge tiles: OpenSlide misplaced the edge tiles' pixels (up to 245 off)
    ("gray16.tif", _image().astype(np.uint16) * 257, dict(tile=(256, 256), photometric="minisblack")),
    # 12-bit RGB in 16-bit samples: OpenSlide kept the top 8 bits, tiles read 1/16 as bright (mean ~10 for ~130)
    ("rgb12.tif", np.repeat(_image()[..., None], 3, -1).astype(np.uint16) * 16,
     dict(tile=(256, 256), photometric="rgb")),
    # 16-bit grayscale in strips (OpenSlide refuses it): tiffslide's regions were clipped to white, thumbnails failed
    ("gray16_strips.tif", _image().astype(np.uint16) * 257, dict(photometric="minisblack")),
])
def test_deep_samples_refused_in_one_line(tmp_path, name, data, kw):
    p = tmp_path / name
    tifffile.imwrite(p, data, **kw, **RES)
    with pytest.raises(GigaslideError) as e:
        open_slide(p)
    msg = str(e.value)
    assert "16-bit samples" in msg and name in msg and "fix:" in msg and "\n" not in msg


def test_8bit_grayscale_tiff_still_reads_exactly(tmp_path):
    g = _image()
    p = tmp_path / "gray8.tif"
    tifffile.imwrite(p, g, tile=(256, 256), photometric="minisblack", **RES)
    with open_slide(p) as s:
        px = s.read_region((10, 20), (64, 64), 0.5)
    assert np.array_equal(px, np.repeat(g[20:84, 10:74, None], 3, -1))


def test_16bit_png_refused_in_one_line(tmp_path):
    from PIL import Image

    p = tmp_path / "g16.png"
    Image.fromarray(_image().astype(np.uint16) * 257).save(p)  # the plain-image reader read it all white (255)
    with pytest.raises(GigaslideError) as e:
        open_slide(p, mpp=0.5)
    assert "deeper than 8 bits" in str(e.value) and "g16.png" in str(e.value)
    Image.fromarray(_image()).save(tmp_path / "g8.png")  # 8-bit: read exactly
    with open_slide(tmp_path / "g8.png", mpp=0.5) as s:
        assert np.array_equal(s.read_region((0, 0), (32, 32), 0.5)[..., 0], _image()[:32, :32])

"""Tile-folder images (pretrain, embed-tiles, evaluate): deep samples refused, transparency on white glass."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.tiling.folders import read_image


def test_a_16_bit_grayscale_image_is_refused_in_one_line(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # PIL mode I;16: convert("RGB") clipped it to white
    with pytest.raises(GigaslideError, match="deeper than 8 bits") as e:
        read_image(tmp_path / "deep.png")
    assert "\n" not in str(e.value) and "deep.png" in str(e.value)


def test_a_transparent_background_reads_as_white_glass(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 40, 120)
    rgba[:4, :, 3] = 255  # the top half tissue, the bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    assert (img[:4] == (200, 40, 120)).all() and (img[4:] == 255).all()  # was black: dropped alpha


def test_grayscale_is_three_equal_channels(tmp_path):
    Image.fromarray(np.full((4, 4), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert (read_image(tmp_path / "g.png") == 77).all()

"""Review round 5: unusual but legitimate images and annotations for the nuclei commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.nuclei.data import Pair, find_pairs, load_item, read_image

from .conftest import disc_image, write_xml


def test_a_16_bit_image_is_refused_in_one_line(tmp_path: Path) -> None:
    """PIL clipped a 16-bit PNG to white (99.6 % of this ramp's pixels read 255): a blank image trained and scored."""
    Image.fromarray(np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16)).save(tmp_path / "g16.png")
    with pytest.raises(GigaslideError) as e:
        read_image(tmp_path / "g16.png")
    assert "deeper than 8 bits" in e.value.one_line() and "g16.png" in e.value.one_line()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_transparent_background_reads_as_glass(tmp_path: Path, mode: str) -> None:
    """Alpha was dropped: a transparent background (0, 0, 0, 0) read black, as dark as a nucleus."""
    img, _, _ = disc_image(64, 4, seed=0)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, :16] = 0  # a transparent strip
    Image.fromarray(rgba).convert(mode).save(tmp_path / "t.png")
    got = read_image(tmp_path / "t.png")
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert (got[:, :16] == 255).all()
    want = img if mode == "RGBA" else np.asarray(Image.fromarray(img).convert("L").convert("RGB"))
    assert np.array_equal(got[:, 16:], want[:, 16:])


def test_grayscale_image_and_an_annotation_without_nuclei(tmp_path: Path) -> None:
    img, inst, polys = disc_image(64, 4, seed=1)
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(img).convert("L").save(tmp_path / "images" / "001.png")
    write_xml(tmp_path / "annotations" / "001.xml", polys)
    Image.fromarray(img).save(tmp_path / "images" / "002.png")
    write_xml(tmp_path / "annotations" / "002.xml", [])
    pairs, problems = find_pairs(tmp_path / "images", tmp_path / "annotations")
    assert [p.id for p in pairs] == ["001", "002"] and not problems
    gray = load_item(pairs[0], 0.25)
    assert gray.image.shape == (64, 64, 3) and (gray.image[..., 0] == gray.image[..., 2]).all()
    assert len(np.unique(gray.inst)) - 1 == len(polys)
    empty = load_item(Pair("002", pairs[1].image, pairs[1].annotation), 0.25)
    assert empty.inst.max() == 0 and empty.image.shape == (64, 64, 3)

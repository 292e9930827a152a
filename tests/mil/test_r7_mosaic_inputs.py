"""Round 7: a mosaic's tile folder from someone else (a damaged tile, tiles too large to build slides from)."""

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic
from gigaslide.testing import make_tile_folder


def _tiles(tmp_path, size=16):
    return make_tile_folder(tmp_path / "tiles", 3, size=size, classes=("0", "1"), noise=0)


def test_a_damaged_tile_is_one_line_naming_it(tmp_path):
    """A truncated tile stopped the build with PIL's bare OSError ("Truncated File Read"), naming no file."""
    d = _tiles(tmp_path)
    for i in range(3):
        (d / "1" / f"t{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(GigaslideError, match=r"t\d\.png: cannot read tile image"):
        build_mosaic(d, tmp_path / "m", MosaicConfig(slides=4, grid=6), verbose=False)


def test_slides_that_do_not_fit_in_memory_are_refused_before_the_first(tmp_path, monkeypatch):
    """The slides' side is grid x the first tile's side: one large tile (or a header claiming 12,000 px) made
    numpy ask for tens of GB per slide (a bare MemoryError, or the machine's memory filled)."""
    import gigaslide.memory

    d = _tiles(tmp_path)
    monkeypatch.setattr(gigaslide.memory, "available_memory", lambda: 10_000)  # 6 x 16 px: 96^2 * 3 * 2 = 55 kB
    with pytest.raises(GigaslideError, match=r"6 x 6 tiles of 16 px \(the size of 000.png\) make 96 x 96 px slides, "
                                             r"which need about 0.0 GB to build"):
        build_mosaic(d, tmp_path / "m", MosaicConfig(slides=4, grid=6), verbose=False)
    assert not list((tmp_path / "m").glob("slides/*.tiff"))
    monkeypatch.setattr(gigaslide.memory, "available_memory", lambda: 60_000)
    build_mosaic(d, tmp_path / "m", MosaicConfig(slides=4, grid=6), verbose=False)
    assert len(list((tmp_path / "m").glob("slides/*.tiff"))) == 4

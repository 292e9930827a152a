"""Stored JPEG tiles handed to other decoders (nvJPEG, PIL, DALI) as self-contained files decode to the pixels
the direct reader cuts from -- on YCbCr pages and on Aperio-style RGB pages, where the missing colour-transform
marker would otherwise shift every colour."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from torchvision.io import decode_jpeg

from gigaslide.slides.tiled import ADOBE_RGB, _has_adobe, open_tiff_level
from gigaslide.testing import make_slide

MAX_DIFF = 2  # per channel, as the reader's check read against OpenSlide
# torchvision's decoders (deprecated since 0.29 for TorchCodec's) are the libjpeg-turbo reference here
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _decode(stream: bytes) -> np.ndarray:
    return decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8)).permute(1, 2, 0).numpy()


def _aperio_like(stream: bytes) -> bytes:
    """An RGB JPEG as Aperio writes it: no Adobe segment, components numbered 1, 2, 3 (so a decoder cannot tell
    RGB from YCbCr by their ids 'R', 'G', 'B')."""
    out, i = bytearray(stream[:2]), 2
    while True:
        marker, n = stream[i + 1], int.from_bytes(stream[i + 2:i + 4], "big")
        seg = bytearray(stream[i:i + 2 + n])
        if marker == 0xC0:  # SOF0: id, sampling, table per component
            for k in range(3):
                seg[10 + 3 * k] = k + 1
        elif marker == 0xDA:  # SOS: id, tables per component
            for k in range(3):
                seg[5 + 2 * k] = k + 1
        if not (marker == 0xEE and seg[4:9] == b"Adobe"):
            out += seg
        i += 2 + n
        if marker == 0xDA:
            return bytes(out + stream[i:])


def _write_rgb_jpeg_tiff(path, img: np.ndarray, tile: int = 256):  # noqa: ANN001
    h, w, _ = img.shape
    tiles = [_aperio_like(imagecodecs.jpeg8_encode(img[y:y + tile, x:x + tile], level=90, colorspace="RGB",
                                                   outcolorspace="RGB"))
             for y in range(0, h, tile) for x in range(0, w, tile)]
    tifffile.imwrite(path, iter(tiles), shape=img.shape, dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="rgb", compressionargs={"outcolorspace": "RGB"})
    return path


def test_rgb_page_streams_carry_the_colour_marker_and_decode_to_the_stored_pixels(tmp_path):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(0, 25, (512, 512, 3)) + [200, 120, 170], 0, 255).astype(np.uint8)
    level = open_tiff_level(_write_rgb_jpeg_tiff(tmp_path / "rgb.tif", img), (512, 512), 224)
    assert level is not None and level.is_jpeg and int(level.page.photometric) == 2
    ref = level.region(0, 0, 512, 512)
    assert np.abs(ref.astype(int) - img).max() < 40  # the fixture is the image (JPEG at quality 90)
    for i in range(4):
        y, x = divmod(i, 2)
        want = ref[y * 256:(y + 1) * 256, x * 256:(x + 1) * 256]
        stream = level.jpeg_stream(i)
        assert _has_adobe(stream) and stream[2:2 + len(ADOBE_RGB)] == ADOBE_RGB
        assert np.abs(_decode(stream).astype(int) - want).max() <= MAX_DIFF
        # the stored bytes alone decode as YCbCr: colours far off -- what the marker prevents
        fh = level._tif.filehandle  # noqa: SLF001
        fh.seek(int(level.page.dataoffsets[i]))
        raw = fh.read(int(level.page.databytecounts[i]))
        assert np.abs(_decode(raw).astype(int) - want).max() > 100
    level.close()


def test_ycbcr_page_streams_get_the_shared_tables_and_no_colour_marker(tmp_path):
    p = make_slide(tmp_path / "s.tiff", (1024, 768), seed=4)
    level = open_tiff_level(p, (1024, 768), 224)
    assert level is not None and int(level.page.photometric) == 6
    tables = level.page.jpegtables
    n = len(level.page.dataoffsets)
    for i in range(n):
        stream = level.jpeg_stream(i)
        y, x = divmod(i, level.tiles_across)
        want = level.region(x * 256, y * 256, 256, 256)
        assert not _has_adobe(stream)
        if tables:  # abbreviated tiles: the stream holds the page's quantisation / Huffman tables
            assert tables[2:-2] in stream
        assert np.abs(_decode(stream).astype(int) - want).max() <= MAX_DIFF
    level.close()


def test_jpeg_stream_refuses_tiles_that_are_not_jpeg(tmp_path):
    p = make_slide(tmp_path / "z.tiff", (512, 512), compression="zlib")
    level = open_tiff_level(p, (512, 512), 224)
    assert level is not None and not level.is_jpeg
    with pytest.raises(ValueError, match="not JPEG"):
        level.jpeg_stream(0)
    level.close()


def test_has_adobe_reads_segments_not_bytes():
    # "Adobe" inside another segment's payload (a comment) is not an APP14 segment
    comment = b"\xff\xfe\x00\x0bAdobe-ish"
    assert not _has_adobe(b"\xff\xd8" + comment + b"\xff\xda\x00\x02")
    assert _has_adobe(b"\xff\xd8" + comment + ADOBE_RGB + b"\xff\xda\x00\x02")


@pytest.mark.realdata
def test_aperio_svs_streams_decode_to_openslides_pixels(real_slides):
    from gigaslide.slides import open_slide

    p = real_slides / "cmu-1-small-region.svs"
    with open_slide(p) as s:
        W, H = s.dimensions
        level = open_tiff_level(p, (W, H), 224)
        assert level is not None and int(level.page.photometric) == 2
        for i in range(0, len(level.page.dataoffsets), 7):
            y, x = divmod(i, level.tiles_across)
            x0, y0 = x * level.tile_w, y * level.tile_h
            w, h = min(level.tile_w, W - x0), min(level.tile_h, H - y0)
            ref = s.read_region((x0, y0), (w, h), s.mpp, level=s.choose_level(s.mpp))
            assert np.abs(_decode(level.jpeg_stream(i))[:h, :w].astype(int) - ref).max() <= MAX_DIFF
        level.close()

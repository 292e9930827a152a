"""Tiles decoded and cut on a torch device give the CPU reader's pixels (here on the CPU device, with the same
libjpeg-turbo decoder torchvision uses there; nvJPEG on CUDA is checked at open and measured by gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.slides import TileReader, open_slide
from gigaslide.slides import device_decode as dd
from gigaslide.slides.device_decode import DeviceTileReader
from gigaslide.testing import make_slide

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _coords(W: int, H: int, n0: int, n: int, seed: int, even: bool) -> np.ndarray:
    """Random corners, some overhanging each border and one wholly outside; even ones when ``even``."""
    rng = np.random.default_rng(seed)
    xy = np.stack([rng.integers(-n0 // 2, W, n), rng.integers(-n0 // 2, H, n)], 1)
    xy[0] = (W + 5, 3)  # wholly outside
    xy[1] = (-n0 // 3, -n0 // 4)  # top-left overhang
    return xy // 2 * 2 if even else xy


@pytest.mark.parametrize("mpp,tile,factor", [(0.25, 96, 1), (0.5, 64, 1), (2.0, 48, 2)])
def test_device_reader_gives_the_cpu_readers_pixels(tmp_path, mpp, tile, factor):
    p = make_slide(tmp_path / "s.tiff", (2400, 1800), mpp=0.25, seed=2)
    with open_slide(p) as s:
        dev, cpu = DeviceTileReader(s, tile, mpp, "cpu"), TileReader(s, tile, mpp)
        assert dev.on_device and dev.factor == factor
        n0 = int(tile * mpp / 0.25)
        for even in (True, False):
            coords = _coords(*s.dimensions, n0, 40, seed=factor, even=even)
            got = dev.read_batch(coords)
            assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.shape == (40, tile, tile, 3)
            assert np.array_equal(got.numpy(), cpu.read_batch(coords))
        ds = s.choose_level(mpp).level_downsample
        # level corners at odd level-0 coords on a downsampled level are sub-pixel: those tiles come from the CPU
        assert (dev.cpu_tiles > 0) == (ds > 1) and dev.decoded > 0
        dev.close()


def test_each_stored_tile_is_decoded_once_over_a_grid(tmp_path):
    p = make_slide(tmp_path / "s.tiff", (1536, 1280), mpp=0.5, seed=5, tile=256)
    with open_slide(p) as s:
        dev = DeviceTileReader(s, 100, 0.5, "cpu")
        xs, ys = np.meshgrid(np.arange(0, 1536, 100), np.arange(0, 1280, 100))
        coords = np.stack([xs.ravel(), ys.ravel()], 1)
        got = torch.cat([dev.read_batch(coords[k:k + 16]) for k in range(0, len(coords), 16)])
        assert np.array_equal(got.numpy(), TileReader(s, 100, 0.5).read_batch(coords))
        assert dev.decoded == 6 * 5  # every stored 256² tile of the level, once, although batches share rows


def test_far_apart_tiles_are_read_from_smaller_canvases(tmp_path, monkeypatch):
    p = make_slide(tmp_path / "s.tiff", (2048, 2048), mpp=0.5, seed=6)
    coords = np.array([[0, 0], [1900, 1900], [1000, 40], [30, 1500]])
    with open_slide(p) as s:
        whole = DeviceTileReader(s, 128, 0.5, "cpu").read_batch(coords)
        monkeypatch.setattr(dd, "MAX_CANVAS_BYTES", 600 * 600 * 3)  # forces splitting down to one or two tiles
        split = DeviceTileReader(s, 128, 0.5, "cpu").read_batch(coords)
        assert np.array_equal(whole.numpy(), split.numpy())
        assert np.array_equal(split.numpy(), TileReader(s, 128, 0.5).read_batch(coords))


def test_slides_it_cannot_decode_are_read_on_the_cpu(tmp_path):
    p = make_slide(tmp_path / "z.tiff", (1024, 1024), mpp=0.5, compression="zlib")
    coords = np.array([[0, 0], [500, 300], [900, 900]])
    with open_slide(p) as s:
        dev = DeviceTileReader(s, 128, 0.5, "cpu")
        assert not dev.on_device and dev.direct  # deflate tiles: the CPU reader's direct path
        assert np.array_equal(dev.read_batch(coords).numpy(), TileReader(s, 128, 0.5).read_batch(coords))
        assert dev.cpu_tiles == 3 and dev.decoded == 0


def test_a_decoder_that_gets_colours_wrong_is_caught_at_open(tmp_path, monkeypatch):
    # e.g. a GPU decoder that ignores the colour-transform marker: the check read turns the device path off
    real = dd._decode_jpeg()

    def swapped(data, device):  # noqa: ANN001, ANN202
        return [im[[2, 1, 0]] for im in real(data, device=device)]

    monkeypatch.setattr(dd, "_decode_jpeg", lambda: swapped)
    p = make_slide(tmp_path / "s.tiff", (1024, 1024), mpp=0.5, seed=7)
    coords = np.array([[100, 100], [600, 400]])
    with open_slide(p) as s:
        dev = DeviceTileReader(s, 128, 0.5, "cpu")
        assert not dev.on_device
        assert np.array_equal(dev.read_batch(coords).numpy(), TileReader(s, 128, 0.5).read_batch(coords))


@pytest.mark.realdata
@pytest.mark.parametrize("mpp,tile,factor", [(0.5, 224, 1), (1.0, 112, 2), (2.0, 64, 4)])
def test_aperio_svs_on_the_device_path(real_slides, mpp, tile, factor):
    with open_slide(real_slides / "cmu-1-small-region.svs") as s:
        dev = DeviceTileReader(s, tile, mpp, "cpu")
        assert dev.on_device and dev.factor == factor
        coords = _coords(*s.dimensions, int(tile * mpp / s.mpp), 30, seed=1, even=False)
        assert np.abs(dev.read_batch(coords).numpy().astype(int) - TileReader(s, tile, mpp).read_batch(coords)).max() <= 2


def test_streams_the_device_decoder_refuses_are_read_on_the_cpu(tmp_path, monkeypatch):
    # at open (the check batch), or half-way through a slide: the CPU reader takes over, same pixels, no error
    real = dd._decode_jpeg()
    calls = {"n": 0}

    def refuses_after(n):  # noqa: ANN001, ANN202
        def decode(data, device):  # noqa: ANN001, ANN202
            calls["n"] += 1
            if calls["n"] > n:
                raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_BAD_JPEG")
            return real(data, device=device)
        return lambda: decode

    p = make_slide(tmp_path / "s.tiff", (1536, 1280), mpp=0.5, seed=8)
    xs, ys = np.meshgrid(np.arange(0, 1536, 128), np.arange(0, 1280, 128))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    with open_slide(p) as s:
        want = TileReader(s, 128, 0.5).read_batch(coords)
        monkeypatch.setattr(dd, "_decode_jpeg", refuses_after(0))
        dev = DeviceTileReader(s, 128, 0.5, "cpu")
        assert not dev.on_device
        np.testing.assert_array_equal(dev.read_batch(coords).numpy(), want)
        calls["n"] = 0
        monkeypatch.setattr(dd, "_decode_jpeg", refuses_after(2))  # the check's decode, one batch, then refusals
        dev = DeviceTileReader(s, 128, 0.5, "cpu")
        assert dev.on_device
        got = torch.cat([dev.read_batch(coords[k:k + 24]) for k in range(0, len(coords), 24)])
        assert not dev.on_device and dev.cpu_tiles > 0
        np.testing.assert_array_equal(got.numpy(), want)

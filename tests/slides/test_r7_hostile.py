"""Review round 7: slides from collaborators whose headers claim absurd sizes, and the public reading API given
values it cannot honour -- each refused with one GigaslideError line, no abort, no OOM, no silent upsampling."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gigaslide.slides.backend as backend_mod
import gigaslide.slides.reader as reader_mod
import gigaslide.slides.slide as slide_mod
from gigaslide.errors import GigaslideError
from gigaslide.slides import Slide, iter_tiles, open_slide
from gigaslide.testing import make_slide, tissue_fn

from .test_thumbnail_banded import _Recorder  # records the px of every read


def _tiff(path, width: int, height: int, *, tile: int | None, data: bytes, compression: int = 8):
    """A little-endian RGB TIFF with one IFD whose chunks (tiles, or strips of ``height`` rows) all point at ``data``:
    a header that claims any size, in a file of a few KB."""
    body = bytearray(data)

    def array(fmt: str, vals: list[int]) -> int:
        off = 8 + len(body)
        body.extend(struct.pack(f"<{len(vals)}{fmt}", *vals))
        if len(body) % 2:
            body.append(0)
        return off

    n = math.ceil(width / tile) * math.ceil(height / tile) if tile else 1
    offs = array("I", [8] * n) if n > 1 else 8
    counts = array("I", [len(data)] * n) if n > 1 else len(data)
    bps = array("H", [8, 8, 8])
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps), (259, 3, 1, compression), (262, 3, 1, 2),
            (277, 3, 1, 3), (284, 3, 1, 1)]
    if tile:
        tags += [(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, n, offs), (325, 4, n, counts)]
    else:
        tags += [(273, 4, 1, offs), (278, 4, 1, height), (279, 4, 1, counts)]
    ifd = struct.pack("<H", len(tags))
    for t, typ, c, v in sorted(tags):
        ifd += struct.pack("<HHIHH", t, typ, c, v, 0) if typ == 3 and c == 1 else struct.pack("<HHII", t, typ, c, v)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(body)) + bytes(body) + ifd + b"\0\0\0\0")
    return path


def test_a_tile_claiming_65536_px_is_refused_before_openslide_allocates_it(tmp_path):
    """A 12 KB file whose header says 65536 x 65536 px tiles: OpenSlide opened it, and the first read aborted the
    process (GLib-ERROR: failed to allocate 17179869184 bytes) -- no exception, the whole job gone."""
    p = _tiff(tmp_path / "bomb.tif", 131072, 131072, tile=65536, data=zlib.compress(bytes(65536 * 3 * 64), 9))
    assert p.stat().st_size < 20_000
    with pytest.raises(GigaslideError) as e:
        open_slide(p)
    msg = str(e.value)
    assert "tile is 65,536 x 65,536 px" in msg and "12 GiB" in msg and "fix: re-save it tiled" in msg
    assert str(p) in msg and "\n" not in msg


def test_a_strip_larger_than_the_chunk_limit_is_refused(tmp_path, monkeypatch):
    """A stripped TIFF is read by tiffslide, which decodes a whole strip for any pixel: a 1.1 MB file claiming one
    20000 x 20000 strip took 1.2 GB per reader (deflate: ~1000x the file's size). Here at a limit of 1 MiB: 3 MB."""
    p = _tiff(tmp_path / "strip.tif", 1000, 1000, tile=None, data=zlib.compress(bytes(1000 * 1000 * 3)))
    with open_slide(p) as s:  # within the default limit: read as before
        assert s.backend == "tiffslide" and s.dimensions == (1000, 1000)
    monkeypatch.setattr(backend_mod, "MAX_CHUNK_BYTES", 2**20, raising=False)
    with pytest.raises(GigaslideError, match=r"each strip is 1,000 x 1,000 px \(0.00279 GiB decoded"):
        open_slide(p)


def test_ordinary_tiles_pass_the_chunk_limit(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        assert s.backend == "openslide" and s.read_region((0, 0), (32, 32), 0.5).shape == (32, 32, 3)


def test_a_thumbnail_read_that_runs_out_of_memory_is_one_line(synthetic_slide):
    """MemoryError() has no message: the error line took its first line and raised IndexError instead (seen on a
    header claiming a 10^6 x 10^6 px level)."""
    with open_slide(synthetic_slide) as s:
        def no_memory(*a):  # noqa: ANN002, ANN202
            raise MemoryError()

        s._handle.read_region = no_memory
        with pytest.raises(GigaslideError, match=r"cannot read the slide's pixels \(MemoryError\)"):
            s.thumbnail(256)


def test_a_wide_level_is_read_for_its_thumbnail_in_blocks_not_whole_bands(tmp_path, monkeypatch):
    """A band is at least ``f`` rows (the reduction) of the whole width: lw^2 / 1024 px, 3.9 GB for a header claiming
    a 10^6 px wide level. Scaled down: a 4000 x 400 level, bands of at most 5e4 px, f = 40 (a 160000 px band)."""
    W, H = 4000, 400
    rgb = tissue_fn(W, H, seed=2)(0, 0, W, H, 1.0)
    p = tmp_path / "wide.tif"
    tifffile.imwrite(p, rgb, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        whole, ds_whole = s.thumbnail(100)  # 1.6 MP: read in one piece
        monkeypatch.setattr(slide_mod, "THUMB_READ_PX", 1e4)
        monkeypatch.setattr(slide_mod, "THUMB_BAND_PX", 5e4)
        rec = _Recorder(s._handle)
        s._handle = rec
        blocks, ds = s.thumbnail(100)
    assert len(rec.reads) > 1 and max(rec.reads) <= 5e4
    assert blocks.shape == whole.shape == (10, 100, 3) and ds == ds_whole
    assert np.array_equal(blocks, whole)  # blocks of whole multiples of f columns and rows: the same box averages


@pytest.mark.parametrize("kw", [dict(mpp=0.0), dict(mpp=-1.0), dict(mpp=float("nan")), dict(mpp=float("inf")),
                                dict(mpp=1e308), dict(mpp=0.01), dict(tile_size=0), dict(tile_size=-5)])
def test_iter_tiles_refuses_what_it_cannot_read_in_one_line(synthetic_slide, kw):
    """0 read one px and upsampled it to a whole tile, 0.01 on a 0.5 µm/px scan upsampled 50x, both silently; NaN,
    -1 and 1e308 failed inside PIL (ValueError, OverflowError), tile size 0 with a TypeError."""
    args = dict(tile_size=64, mpp=0.5)
    args.update(kw)
    with pytest.raises(GigaslideError) as e:
        list(iter_tiles(str(synthetic_slide), [(0, 0)], **args))
    assert "\n" not in str(e.value) and "fix:" in str(e.value)


def test_iter_tiles_closes_the_slide_it_opened_when_its_arguments_are_refused(synthetic_slide, monkeypatch):
    closed = []

    class Spy(Slide):
        def close(self) -> None:
            closed.append(self.path)
            super().close()

    monkeypatch.setattr(reader_mod, "Slide", Spy)
    with pytest.raises(GigaslideError, match="unknown downsample"):
        next(iter_tiles(synthetic_slide, [(0, 0)], 64, 0.5, downsample="x"))
    assert closed == [synthetic_slide]


def test_read_region_and_thumbnail_refuse_sizes_and_resolutions_in_one_line(tmp_path):
    p = make_slide(tmp_path / "s.tiff", (1024, 768), mpp=0.5, seed=0)
    with open_slide(p) as s:
        for size in [(0, 0), (-3, 5)]:
            with pytest.raises(GigaslideError, match="must be at least 1 x 1 px"):
                s.read_region((0, 0), size, 0.5)
        for m in [0.0, -1.0, float("nan")]:
            with pytest.raises(GigaslideError, match="not a positive finite resolution"):
                s.read_region((0, 0), (8, 8), m)
        # 500 µm/px from a 2-level 0.5 µm/px slide: 1.12e5 px square of level 1 (50 GB), refused before reading
        for m in [500.0, 1e308]:
            with pytest.raises(GigaslideError, match="more than the 4,294,967,296 px read at once"):
                s.read_region((0, 0), (224, 224), m)
        assert s.read_region((0, 0), (224, 224), 2.0).shape == (224, 224, 3)  # coarse, within the limit
        for n in [0, -5]:
            with pytest.raises(GigaslideError, match="thumbnail size"):
                s.thumbnail(n)
        with pytest.raises(GigaslideError, match="must be positive and finite"):
            s.check_target_mpp(float("nan"))  # NaN passed both of its comparisons


def _in_child(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (a regression here hangs: it must not take the test run with it)."""
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout:g} s")
    return r.stdout + r.stderr


def _ifd_cycle_tiff(path):
    """A 16 x 16 grayscale TIFF (300 bytes) whose one IFD names itself as the next one."""
    tags = [(256, 4, 1, 16), (257, 4, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
            (277, 3, 1, 1), (278, 4, 1, 16), (279, 4, 1, 256)]
    ifd = struct.pack("<H", len(tags))
    for t, typ, c, v in tags:
        ifd += struct.pack("<HHIHH", t, typ, c, v, 0) if typ == 3 else struct.pack("<HHII", t, typ, c, v)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 264) + bytes(256) + ifd + struct.pack("<I", 264))
    return path


def test_a_tiff_whose_ifd_chain_is_a_cycle_is_refused_not_read_forever(tmp_path):
    """tifffile follows the IFD chain without a check: opening the file never returned (still running after 60 s)."""
    p = _ifd_cycle_tiff(tmp_path / "cycle.tif")
    out = _in_child(f"""
from gigaslide.errors import GigaslideError
from gigaslide.slides import open_slide
try:
    open_slide({str(p)!r})
except GigaslideError as e:
    print("REFUSED", e)
""")
    assert "REFUSED" in out and "the IFD chain is a cycle" in out and "Traceback" not in out, out


def test_the_direct_reader_stops_at_an_ifd_cycle(tmp_path):
    p = _ifd_cycle_tiff(tmp_path / "cycle.tif")
    out = _in_child(f"""
from gigaslide.slides.tiled import open_tiff_level
print("LEVEL", open_tiff_level({str(p)!r}, (99, 99), 256))
""")
    assert "LEVEL None" in out, out


def test_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """open() of a FIFO with no writer blocks: open_slide waited for good; find_slides called it a folder."""
    import os

    from gigaslide.slides import find_slides

    p = tmp_path / "pipe.svs"
    os.mkfifo(p)
    out = _in_child(f"""
from gigaslide.slides import open_slide
try:
    open_slide({str(p)!r})
except Exception as e:
    print(type(e).__name__, e)
""", timeout=30)
    assert "GigaslideError" in out and "is not a regular file" in out, out
    with pytest.raises(GigaslideError, match="not a regular file or a folder"):
        find_slides([p])


def test_a_level_too_large_for_any_thumbnail_is_refused_at_once(tmp_path, monkeypatch):
    """A 500 KB TIFF claiming one sparse 10^6 x 10^6 px level: its thumbnail read 62,500 blocks of ~0.5 s each."""
    p = _tiff(tmp_path / "vast.tif", 1_000_000, 1_000_000, tile=4096, data=b"")
    out = _in_child(f"""
from gigaslide.slides import open_slide
with open_slide({str(p)!r}, mpp=0.5) as s:
    try:
        s.thumbnail(1024)
    except Exception as e:
        print(type(e).__name__, e)
""")
    assert "GigaslideError" in out and "1,000,000 x 1,000,000 px" in out and "pyramidal" in out, out
    # the same refusal at a small scale, in process: a 2000 x 1500 single-level TIFF over a limit of 1e6 px
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, tissue_fn(2000, 1500, seed=1)(0, 0, 2000, 1500, 1.0), tile=(256, 256), photometric="rgb")
    with open_slide(flat, mpp=0.5) as s:
        assert s.thumbnail(250)[0].shape == (188, 250, 3)
        monkeypatch.setattr(slide_mod, "THUMB_MAX_SOURCE_PX", 1e6, raising=False)
        with pytest.raises(GigaslideError, match="no level of the slide is small enough"):
            s.thumbnail(250)


def test_slide_id_from_path_takes_a_str_as_well_as_a_path():
    from gigaslide.slides import slide_id_from_path

    assert slide_id_from_path("cohort/x.ome.tiff") == slide_id_from_path(Path("cohort/x.ome.tiff"))
    assert slide_id_from_path("cohort/x.ome.tiff") == "x"  # a str raised AttributeError: 'str' has no 'name'


def test_a_closed_slide_says_so_in_one_line_and_still_has_a_repr(synthetic_slide):
    """OpenSlide raised ctypes' ArgumentError ("Passing closed slide object"), even from repr (a notebook cell)."""
    with open_slide(synthetic_slide) as s:
        pass
    assert repr(s) == f"Slide({str(synthetic_slide)!r}, closed)"
    for use in (lambda: s.read_region((0, 0), (8, 8), 0.5), lambda: s.thumbnail(64), lambda: s.dimensions, s.info):
        with pytest.raises(GigaslideError, match="the slide was closed"):
            use()
    s.close()  # twice is fine


def test_an_mpp_table_giving_a_slide_two_resolutions_is_refused(tmp_path):
    """The last row won without a word: slide A tiled at 0.5 µm/px though a row said 0.25. The same row twice is
    fine; two paths of one slide id with different values are refused too."""
    from gigaslide.slides import load_mpp_table

    (tmp_path / "same.csv").write_text("slide_id,mpp\nA,0.25\nB,0.5\nA,0.25\n")
    assert load_mpp_table(tmp_path / "same.csv") == {"A": 0.25, "B": 0.5}
    (tmp_path / "two.csv").write_text("slide_id,mpp\nA,0.25\nB,0.5\nA,0.5\n")
    with pytest.raises(GigaslideError, match=r"gives slide A two resolutions, 0.25 and 0.5"):
        load_mpp_table(tmp_path / "two.csv")
    (tmp_path / "paths.csv").write_text("path,mpp\nsite1/x.svs,0.25\nsite2/x.svs,0.5\n")
    with pytest.raises(GigaslideError, match=r"gives slide x two resolutions"):
        load_mpp_table(str(tmp_path / "paths.csv"))


def test_a_refused_slide_mpp_leaves_no_file_open(shared_data):
    """The reader was opened before ``mpp`` was checked: each refused Slide left its file open until the next
    garbage collection (tiffslide, a plain TIFF: one descriptor each; the exception's frames hold it in a cycle)."""
    import gc
    import os

    p = shared_data / "slides" / "kidney-48-5.tif"
    Slide(p).close()  # libraries' own files opened once
    n = len(os.listdir("/proc/self/fd"))
    gc.disable()
    try:
        for m in ["nan", str(shared_data / "no-such-table.csv"), "-1"]:
            with pytest.raises(GigaslideError):
                Slide(p, mpp=m)
        assert len(os.listdir("/proc/self/fd")) == n
    finally:
        gc.enable()


def test_opening_slides_from_threads_leaves_the_tifffile_logger_as_it_was(caplog):
    """``logger.disabled`` was set and restored per open: two threads' opens interleaved (A in, B in, A out, B out)
    turned tifffile's logging back on while B was inside, and left it off for the rest of the process (3 of 5 runs
    of 8 threads x 48 opens)."""
    import logging
    import threading

    from gigaslide.slides.backend import _quiet_tifffile

    log = logging.getLogger("tifffile")
    assert not log.disabled
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    passed = {}

    def thread_a() -> None:
        with _quiet_tifffile():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(10)
        with _quiet_tifffile():
            b_in.set()
            a_out.wait(10)
            record = log.makeRecord("tifffile", logging.ERROR, "", 0, "x", (), None)
            passed["b inside"] = not log.disabled and bool(log.filter(record))  # what Logger.handle emits

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not passed["b inside"]  # B was still inside when A left: its records dropped
    assert not log.disabled
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        log.warning("after")  # everyone is outside: records pass
    assert [r.getMessage() for r in caplog.records] == ["after"]


def test_ids_that_differ_only_in_case_are_both_kept_with_a_warning_naming_both(tmp_path):
    """A.svs and a.svs are two slides on Linux but one output file on macOS / Windows / SMB shares."""
    import warnings

    from gigaslide.slides.ids import by_slide_id

    paths = [tmp_path / "A.svs", tmp_path / "b.svs", tmp_path / "sub" / "a.svs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [(sid, err) for _, sid, err in by_slide_id(paths)]
    assert got == [("A", None), ("b", None), ("a", None)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "'a' differs from 'A'" in msgs[0] and str(paths[0]) in msgs[0]
    assert msgs[0].startswith(str(paths[2]))

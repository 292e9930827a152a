"""The user's environment: a small /dev/shm (docker's 64 MB), file names that are not UTF-8."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from gigaslide.slides import by_slide_id
from gigaslide.slides import pool as pool_mod
from gigaslide.slides.pool import ReaderPool, ReadTask
from gigaslide.slides.reader import iter_tiles
from gigaslide.testing import make_slide

TS = 64


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    return make_slide(tmp_path_factory.mktemp("env") / "s.tiff", (512, 384), mpp=0.5, seed=3)


def _coords(n: int) -> np.ndarray:
    return np.array([[x, y] for y in range(0, 384, TS) for x in range(0, 512, TS)])[:n]


def _read_all(pool: ReaderPool, path: Path, n_batches: int, bs: int) -> list[np.ndarray | str]:
    """Submit ``n_batches`` batches as encode does (at most ``pool.max_pending`` in flight); pixels or error lines."""
    got, i = [], 0
    while len(got) < n_batches:
        while i < n_batches and pool.pending < pool.max_pending:
            pool.submit(ReadTask(i, str(path), _coords(bs), TS, 0.5))
            i += 1
        _, px, _ = pool.get()
        got.append(px if isinstance(px, str) else px.numpy().copy())
    return got


@pytest.mark.skipif(not hasattr(os, "fork"), reason="reader processes are forked")
@pytest.mark.parametrize(("free_batches", "workers_left"), [(4.5, 3), (1.5, 0)])
def test_reader_pool_fits_its_buffers_in_a_small_shared_memory(small_slide, monkeypatch, free_batches, workers_left):
    """4 readers want 11 batch buffers in /dev/shm; with room for 4 (docker's 64 MB and large batches) the pool makes
    4 and keeps 3 batches in flight with 3 readers; with room for 1 it reads in this process. Every batch's pixels
    are the slide's. (Before: 11 buffers were allocated regardless -- a torch traceback, 'No space left on device'.)"""
    bs = 12
    slot = bs * TS * TS * 3
    free = int(free_batches * slot / (1 - pool_mod.SHM_HEADROOM))
    monkeypatch.setattr(pool_mod, "shm_free_bytes", lambda path=pool_mod.SHM_DIR: free)
    want = np.stack(list(iter_tiles(small_slide, _coords(bs), TS, 0.5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ReaderPool(4, slot_bytes=slot) as pool:
            assert sum(t.is_shared() for t in pool._slots) * slot <= free
            assert (pool.workers, len(pool._procs)) == (workers_left, workers_left)
            got = _read_all(pool, small_slide, 7, bs)
    assert [m for m in caught if "--shm-size" in str(m.message)]
    for px in got:
        assert not isinstance(px, str), px
        np.testing.assert_array_equal(px, want)


def test_reader_pool_keeps_all_its_buffers_when_shared_memory_is_ample(small_slide, monkeypatch):
    monkeypatch.setattr(pool_mod, "shm_free_bytes", lambda path=pool_mod.SHM_DIR: 1 << 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ReaderPool(2, slot_bytes=1000) as pool:
            assert (len(pool._slots), pool.max_pending, pool.workers) == (7, 6, 2)


_SMALL_SHM = """
import numpy as np
from gigaslide.slides.pool import ReaderPool, ReadTask
bs = 64
with ReaderPool(2, slot_bytes=bs * 224 * 224 * 3) as pool:  # 7 buffers of 9.2 MB: more than 64 MB
    coords = np.zeros((bs, 2), np.int64)
    for i in range(4):
        pool.submit(ReadTask(i, {path!r}, coords, 224, 0.5))
    print(sum(not isinstance(pool.get()[1], str) for _ in range(4)), "ok")
"""


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("unshare") is None, reason="needs root and unshare for a private /dev/shm")
def test_reader_pool_in_a_docker_sized_dev_shm(small_slide):
    """The real thing: a private 64 MB /dev/shm (docker's default) in a mount namespace of the test's own."""
    code = _SMALL_SHM.format(path=str(small_slide))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs /dev/shm && exec "$0" -c "$1"',
           sys.executable, code]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0 and "mount" in r.stderr and "Traceback" not in r.stderr:
        pytest.skip(f"no private mount namespace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "4 ok"
    assert "--shm-size" in r.stderr and "Traceback" not in r.stderr


def test_a_slide_path_that_is_not_utf8_fails_alone_with_one_line(tmp_path):
    """A Latin-1 file name (``caf\\xe9.svs``) holds a lone surrogate in Python; its id and path cannot be written to
    HDF5 or JSON (tile/encode failed with a UnicodeEncodeError from h5py, after writing its overlays). It now fails
    alone, with the cause and the fix, before any work; the other slides go on."""
    bad = tmp_path / os.fsdecode(b"caf\xe9.tiff")
    good = tmp_path / "café.tiff"
    out = list(by_slide_id([bad, good]))
    # the refused slide's id as it is shown (manifests record it; JSON readers refuse a lone surrogate)
    assert [(sid, err is None) for _, sid, err in out] == [("caf\\xe9", False), ("café", True)]
    err = out[0][2]
    assert "caf\\xe9.tiff" in err and "not valid UTF-8" in err and "fix: rename" in err
    err.encode("utf-8")  # the line itself can be printed and stored anywhere
    folder = tmp_path / os.fsdecode(b"f\xf6lder") / "x.svs"  # a folder above it counts too: the path is recorded
    assert next(by_slide_id([folder]))[2] is not None


def test_tifffile_logs_nothing_while_a_reader_tries_a_file_and_its_level_is_untouched(caplog, monkeypatch):
    import logging

    from gigaslide.slides.backend import _quiet_tifffile

    log = logging.getLogger("tifffile")
    monkeypatch.setattr(log, "disabled", False)  # as a fresh process has it (a library's logging config may not)
    monkeypatch.setattr(log, "propagate", True)
    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        level = log.level
        with _quiet_tifffile():
            log.warning("<tifffile.TiffPages @8> invalid page offset")
        assert caplog.records == [] and log.level == level
        log.warning("after")  # logging again once the reader is done
        assert [r.getMessage() for r in caplog.records] == ["after"]

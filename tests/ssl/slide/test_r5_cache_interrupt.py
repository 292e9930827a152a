"""augment-cache interrupted: kill -9 during a slide's write, then the same command again (the arrays as an
uninterrupted run's); a second process on the same --out while the first writes (refused, the first one finishes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.cache import build_augment_cache
from gigaslide.testing import make_slide

KW = dict(encoder="test_resnet", weights="random", views=3, tiles_per_view=6, mpp=2.0, tile_size=32, precision="fp32",
          log=lambda *a: None)
ARRAYS = ("features", "coords", "views", "view_coords", "view_tiles")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return [str(make_slide(d / f"s{i}.tiff", (640, 448), mpp=2.0, seed=i)) for i in range(3)]


def _arrays(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k][()]).tobytes() for k in ARRAYS}


def test_second_writer_on_one_cache_is_refused_while_the_first_finishes(slides, tmp_path, monkeypatch):
    """A second augment-cache started on a cache while the first is writing a slide's file deleted that file's
    temporary (its start cleans the folder's temporaries): the first then died with a FileNotFoundError traceback."""
    out = tmp_path / "c"
    fsync, second = atomic._fsync, []

    def meanwhile(p):  # noqa: ANN001, ANN202 - the first slide's file is written but not yet renamed
        if p.parent.name == "features" and not second:
            try:
                build_augment_cache(slides[2:], out, **KW)
                second.append("ran")
            except GigaslideError as e:
                second.append(e.one_line())
        return fsync(p)

    monkeypatch.setattr(atomic, "_fsync", meanwhile)
    res = build_augment_cache(slides[:2], out, **KW)
    assert res.done == ["s0", "s1"] and not res.failed
    assert len(second) == 1 and "another augment-cache (pid" in second[0] and str(out) in second[0]
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s0.h5", "s1.h5"]  # no temporaries, not s2
    assert not (out / ".augment-cache.lock").exists()  # released: the next run is not refused
    monkeypatch.setattr(atomic, "_fsync", fsync)
    assert build_augment_cache(slides, out, **KW).done == ["s2"]


SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from gigaslide.ssl.slide.cache import build_augment_cache
build_augment_cache(json.loads(sys.argv[1]), sys.argv[2], **json.loads(sys.argv[3]))
"""


@pytest.mark.slow
def test_kill_9_while_a_slide_file_is_written_then_resume_gives_the_uninterrupted_cache(slides, tmp_path):
    kw = {k: v for k, v in KW.items() if k != "log"}
    ref = build_augment_cache(slides, tmp_path / "ref", **KW)
    assert ref.done == ["s0", "s1", "s2"]
    out = tmp_path / "killed"
    feats = out / "features"
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(slides), str(out), json.dumps(kw)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # a loaded machine starts the child slowly
    while time.time() < deadline and p.poll() is None and not (
            (feats / "s0.h5").exists() and any(f.name.startswith(atomic.TMP_PREFIX) for f in feats.iterdir())):
        time.sleep(0.002)  # the second slide's file is being written
    assert p.poll() is None, p.communicate()[1].decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (feats / "s1.h5").exists() and (out / ".augment-cache.lock").exists()  # killed mid-write: no s1 yet
    res = build_augment_cache(slides, out, **KW)  # the dead holder's lock is taken over
    assert res.skipped == ["s0"] and res.done == ["s1", "s2"] and not res.failed
    assert sorted(f.name for f in feats.iterdir()) == ["s0.h5", "s1.h5", "s2.h5"]  # the temporary is gone
    for sid in ("s0", "s1", "s2"):
        assert _arrays(feats / f"{sid}.h5") == _arrays(tmp_path / "ref" / "features" / f"{sid}.h5"), sid


def test_cache_lock_has_a_heartbeat(slides, tmp_path, monkeypatch):
    """A process on another host takes over a lock not refreshed for 10 minutes: a slide that takes longer to cache
    must refresh it while it works (every batch), not only when it starts."""
    from gigaslide.locks import ItemLock

    beats, refresh = [], ItemLock.refresh

    def counted(self):  # noqa: ANN001, ANN202
        beats.append(self.path.name)
        return refresh(self)

    monkeypatch.setattr(ItemLock, "refresh", counted)
    res = build_augment_cache(slides[:1], tmp_path / "c", **{**KW, "batch_size": 32})
    n = res and len(store_tiles(tmp_path / "c" / "features" / "s0.h5"))
    assert set(beats) == {".augment-cache.lock"} and len(beats) >= -(-n // 32)  # at least one per batch of tiles


def store_tiles(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["coords"][:]

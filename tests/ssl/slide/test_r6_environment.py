"""Round 6, the user's environment: augment-cache on a disk that fills up."""
import os
from types import SimpleNamespace

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.cache import build_augment_cache
from gigaslide.testing import make_slide

KW = dict(encoder="test_resnet", weights="random", views=3, tiles_per_view=6, mpp=2.0, tile_size=32, device="cpu",
          log=lambda *a: None)


def test_augment_cache_stops_in_one_line_before_a_slide_the_disk_cannot_hold(tmp_path, monkeypatch):
    """A full disk mid-write made h5py print pages of 'Exception ignored' tracebacks and crash the process
    (segmentation fault, exit status 139; measured on a 150 kB tmpfs). Now the batch stops before the slide that
    would not fit, in one line naming the folder, finished slides kept; the re-run with space resumes."""
    slides = [str(make_slide(tmp_path / f"s{i}.tiff", (640, 448), mpp=2.0, seed=i)) for i in range(2)]
    real = os.statvfs
    free = {"bytes": 10**12}

    def statvfs(path):  # noqa: ANN001, ANN202
        st = real(path)
        return SimpleNamespace(f_bavail=free["bytes"] // st.f_frsize, f_frsize=st.f_frsize)

    monkeypatch.setattr(os, "statvfs", statvfs)
    build_augment_cache(slides[:1], tmp_path / "c", **KW)
    free["bytes"] = 500_000  # less than the slide (~60 kB) plus 1 MB of headroom
    with pytest.raises(GigaslideError, match=r"features: disk full: 0.5 MB free, the next slide \(s1\) needs ~0.06 MB "
                                             r"and 1 MB of headroom; 1 slides cached.*re-run the same command"):
        build_augment_cache(slides, tmp_path / "c", **KW)
    assert sorted(p.name for p in (tmp_path / "c" / "features").iterdir()) == ["s0.h5"]
    free["bytes"] = 10**12
    res = build_augment_cache(slides, tmp_path / "c", **KW)
    assert res.skipped == ["s0"] and res.done == ["s1"]

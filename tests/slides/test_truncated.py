"""A truncated TIFF (a copy cut short) is refused at open in one line: tiffslide opened it, and its failed region
reads printed hundreds of lines of zarr tracebacks at exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.slides import open_slide
from gigaslide.testing import make_slide


@pytest.fixture
def truncated(tmp_path):
    full = make_slide(tmp_path / "full.tiff", (3000, 2000), tile=256)
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(full.read_bytes()[:300_000])  # the level-0 tiles' offsets (near the start) are kept
    return cut


def test_truncated_tiff_refused_at_open(truncated):
    with pytest.raises(GigaslideError) as e:
        open_slide(truncated)
    msg = str(e.value)
    assert "truncated" in msg and "300,000" in msg and "cut.tiff" in msg and "re-copy" in msg


def test_truncated_tiff_leaves_no_traceback_at_exit(truncated):
    code = ("import sys\nfrom gigaslide.errors import GigaslideError\nfrom gigaslide.slides import open_slide\n"
            "try:\n    s = open_slide(sys.argv[1]); s.thumbnail(512); s.close()\n"
            "except GigaslideError as e:\n    print(e, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, str(truncated)], capture_output=True, text=True, timeout=120,
                       env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cut.tiff" in lines[0], r.stderr[-2000:]

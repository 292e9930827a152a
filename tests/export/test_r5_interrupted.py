"""Exports killed, interrupted or started twice on one --out (review round 5, lens A)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gigaslide.errors import GigaslideError

from .test_exports import _cohort as _feature_cohort


def _cohort(out: Path, n_slides: int = 3, n_tiles: int = 20, dim: int = 16) -> dict[str, np.ndarray]:
    """Feature files written directly (seeded): what the exports read."""
    return _feature_cohort(out, n_slides, n_tiles, dim)


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    # Ctrl-C as in a terminal: a test run started as a background job passes SIGINT on ignored, and the export
    # rightly keeps an ignored SIGINT ignored
    code = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + code
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=300)


def test_a_rerun_removes_what_an_h5ad_export_killed_with_sigkill_left(tmp_path):
    """kill -9 while the .h5ad was written left a hidden temporary file as large as the features (171 MB for 80,000
    tiles x 512), and every later run left its own beside it; the next export removes the ones of its target only,
    and writes what an uninterrupted export writes."""
    import anndata as ad

    from gigaslide.export import export_anndata

    out = tmp_path / "out"
    feats = _cohort(out)
    target = tmp_path / "res" / "a.h5ad"
    child = (
        "import os, signal, sys\n"
        "import anndata\n"
        "from gigaslide.export import export_anndata\n"
        "def killed(self, path, *a, **k):\n"
        "    open(path, 'wb').write(b'half an h5ad' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "import gigaslide.export.anndata_export as writer\n"
        "writer.write_h5ad = killed  # the .h5ad writer (anndata's write_h5ad through a Python file)\n"
        "export_anndata([sys.argv[1]], sys.argv[2])\n")
    assert _child(child, out, target).returncode == -9
    assert len(list(target.parent.glob(".tmp-a.h5ad.*.h5ad"))) == 1 and not target.exists()
    other = target.parent / ".tmp-b.h5ad.zzzzzzzz.h5ad"  # another target's: not this export's to remove
    other.write_bytes(b"x")
    export_anndata([out], target)
    assert sorted(p.name for p in target.parent.iterdir()) == [other.name, "a.h5ad"]
    a = ad.read_h5ad(target)
    np.testing.assert_array_equal(a.X, np.concatenate(list(feats.values())))
    ref = tmp_path / "ref.h5ad"
    export_anndata([out], ref)
    b = ad.read_h5ad(ref)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert a.obs.equals(b.obs)


def test_a_rerun_removes_what_a_qupath_export_killed_with_sigkill_left(tmp_path):
    """kill -9 between writing a slide's GeoJSON and its rename left ``.tmp-<slide>.geojson.*`` in the folder QuPath
    users open, never removed; the next export removes them and writes the same bytes as an uninterrupted one."""
    from gigaslide.export import export_qupath

    out = tmp_path / "out"
    _cohort(out)
    gj = tmp_path / "gj"
    child = (
        "import os, signal, sys\n"
        "from gigaslide import atomic\n"
        "from gigaslide.export import export_qupath\n"
        "from gigaslide.export import qupath\n"
        "real = atomic.atomic_path\n"
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def killed(target, suffix=''):\n"
        "    with real(target, suffix) as tmp:\n"
        "        yield tmp\n"
        "        if target.name == 'c001.geojson':\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "qupath.atomic.atomic_path = killed\n"
        "export_qupath([sys.argv[1]], sys.argv[2])\n")
    assert _child(child, out, gj).returncode == -9
    names = sorted(p.name for p in gj.iterdir() if p.name != ".qupath-export.lock")  # kill -9: its lock file stays
    assert names[0].startswith(".tmp-c001.geojson.") and names[1:] == ["c000.geojson"]
    keep = gj / ".tmp-notes.txt.abcdefgh"  # not one of the export's files
    keep.write_text("mine")
    files, _ = export_qupath([out], gj)
    assert sorted(p.name for p in gj.iterdir()) == [keep.name, "c000.geojson", "c001.geojson", "c002.geojson",
                                                     "provenance.json"]
    ref = tmp_path / "ref"
    export_qupath([out], ref)
    for f in files:
        assert f.read_bytes() == (ref / f.name).read_bytes()


def test_ctrl_c_swallowed_while_the_h5ad_is_written_still_stops_the_export(tmp_path):
    """Ctrl-C while h5py / anndata wrote the file raised KeyboardInterrupt inside one of their weakref callbacks,
    where Python prints "Exception ignored" with a traceback and drops it: the export wrote its .h5ad and exited 0.
    Now the interrupt stops it once the library returns: exit 130, one line, no file."""
    out = tmp_path / "out"
    _cohort(out)
    target = tmp_path / "res" / "a.h5ad"
    child = (
        "import os, signal, sys, weakref\n"
        "import anndata\n"
        "from gigaslide.cli.main import main\n"
        "import gigaslide.export.anndata_export as writer\n"
        "real = writer.write_h5ad  # the .h5ad writer (anndata's write_h5ad through a Python file)\n"
        "class Obj: pass\n"
        "def write(self, path, *a, **k):\n"
        "    o = Obj()\n"
        "    r = weakref.ref(o, lambda _: os.kill(os.getpid(), signal.SIGINT))  # the signal arrives in a callback\n"
        "    del o\n"
        "    real(self, path, *a, **k)\n"
        "writer.write_h5ad = write\n"
        "sys.exit(main(['export', 'anndata', sys.argv[1], '--out', sys.argv[2]]))\n")
    r = _child(child, out, target)
    err = r.stderr.decode()
    assert r.returncode == 130, err[-800:]
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().splitlines() == ["interrupted; finished outputs are kept and a re-run resumes"]
    assert not target.exists() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["anndata", "qupath"])
def test_a_second_export_on_the_same_out_is_refused_in_one_line(tmp_path, kind):
    """Two exports on one --out raced (the second's re-run would remove the first's temporary file); the second is
    refused, naming the process that writes, and the first's lock goes with it (none left behind)."""
    from gigaslide.export import export_anndata, export_qupath

    out = tmp_path / "out"
    _cohort(out)
    target = tmp_path / "res" / ("a.h5ad" if kind == "anndata" else "gj")
    lock = target.parent / ".a.h5ad.lock" if kind == "anndata" else target / ".qupath-export.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from gigaslide.export.guard import exclusive\n"
        "with exclusive(Path(sys.argv[1]), 'x'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"), str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(GigaslideError, match=r"another export is writing there \(pid \d+ on ") as e:
            (export_anndata if kind == "anndata" else export_qupath)([out], target)
        assert "\n" not in e.value.one_line() and str(target) in e.value.one_line()
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    (export_anndata if kind == "anndata" else export_qupath)([out], target)  # the killed holder's lock is free
    assert time.monotonic() - t0 < 60 and not lock.exists()
    if kind == "qupath":
        assert json.loads((target / "c002.geojson").read_text())["type"] == "FeatureCollection"

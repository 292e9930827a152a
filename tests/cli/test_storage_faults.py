"""Storage faults: a full disk, a read-only folder, damaged feature / coords files, a slide that vanishes.

Each ends in one ``error:`` line naming the file and the fix, leaves no half-written file, and the
next run resumes to the same features as an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from gigaslide import atomic
from gigaslide.cli.main import main
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.testing import make_slide
from gigaslide.tiling import load_grid

ENC = ["--encoder", "test_resnet", "--weights", "random", "--mpp", "2.0", "--tile-size", "32", "--workers", "0",
       "--precision", "fp32"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("sf")
    return [make_slide(d / "a.tiff", (1024, 768), seed=1), make_slide(d / "b.tiff", (768, 768), seed=2)]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory):
    """Features of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["encode", *map(str, slides), "--out", str(out), *ENC]) == 0
    return {s: store.load(out / "features" / f"{s}.h5").features for s in ("a", "b")}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _no_partial(out) -> None:  # noqa: ANN001
    assert not list(out.rglob(atomic.TMP_PREFIX + "*"))
    for f in (out / "features").glob("*.h5") if (out / "features").is_dir() else []:
        store.load(f)  # every feature file there is complete


def _same_as_reference(out, reference) -> None:  # noqa: ANN001
    for s, ref in reference.items():
        np.testing.assert_array_equal(store.load(out / "features" / f"{s}.h5").features, ref)


def test_disk_full_while_writing_features(slides, reference, tmp_path, capsys, monkeypatch):
    real = store.h5py.File

    class FullDisk:  # h5py raises OSError(errno 28) when HDF5 cannot write: the same here, after a partial write
        def __init__(self, name, mode="r", **kw):  # noqa: ANN001, ANN003
            self.f = real(name, mode, **kw)
            self.writing = mode == "w" and Path(name).parent.name == "features"  # the disk fills up at the features

        def __enter__(self):  # noqa: ANN204
            return self.f if not self.writing else self

        def create_dataset(self, *a, **kw):  # noqa: ANN002, ANN003, ANN201
            self.f.create_dataset(*a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            self.f.close()

    monkeypatch.setattr(store.h5py, "File", FullDisk)
    out = tmp_path / "out"
    assert main(["encode", *map(str, slides), "--out", str(out), *ENC]) == 2
    line = _error_line(capsys)
    assert "a.h5" in line and "No space left on device" in line and "free disk space" in line
    _no_partial(out)
    monkeypatch.setattr(store.h5py, "File", real)
    assert main(["encode", *map(str, slides), "--out", str(out), *ENC]) == 0  # the next run resumes
    _same_as_reference(out, reference)


def test_disk_full_on_a_real_tiny_file_system(tmp_path):
    """A 200 kB tmpfs: the real ENOSPC from HDF5 / the kernel. Mounted in a private mount namespace (``unshare -m``),
    so nothing changes for the rest of the machine (it was mounted machine-wide, as root)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode:
        pytest.skip("a private tmpfs needs root and unshare")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    big = make_slide(tmp_path / "big.tiff", (2048, 1536), seed=3)
    check = tmp_path / "check.py"  # run inside the namespace, where the tmpfs is: what the encode left behind
    check.write_text(
        "import sys\nfrom pathlib import Path\nfrom gigaslide import atomic\nfrom gigaslide.features import store\n"
        "out = Path(sys.argv[1])\nprint('tmp', len(list(out.rglob(atomic.TMP_PREFIX + '*'))))\n"
        "for f in sorted((out / 'features').glob('*.h5')) if (out / 'features').is_dir() else []:\n"
        "    store.load(f)\nprint('checked')\n")
    py = sys.executable
    cmd = (f"mount -t tmpfs -o size=200k tmpfs '{mnt}' || exit 99; '{py}' -m gigaslide encode '{big}' --out '{mnt}/o' "
           f"{' '.join(ENC[:6])} --mpp 1.0 --tile-size 16 --workers 0; echo rc=$?; '{py}' '{check}' '{mnt}/o'")
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    assert "rc=2" in p.stdout and "tmp 0" in p.stdout and "checked" in p.stdout, p.stdout + p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and str(mnt) in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not any(mnt.iterdir())  # the tmpfs was private: here the folder stayed empty


def test_read_only_output_folder(slides, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, m: False if str(p).startswith(str(out)) else real_access(p, m))
    assert main(["encode", str(slides[0]), "--out", str(out), *ENC]) == 2
    line = _error_line(capsys)
    assert str(out) in line and "not writable" in line and "fix:" in line
    assert not any(out.iterdir())


def test_read_only_file_system_while_writing(slides, tmp_path, capsys, monkeypatch):
    """EROFS from the rename (the folder looked writable): one line naming the file, no temporary file left."""
    real = atomic.os.replace

    def ro(src, dst):  # noqa: ANN001, ANN202
        if str(dst).endswith(".h5"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", ro)
    out = tmp_path / "o"
    assert main(["tile", str(slides[0]), "--out", str(out), "--mpp", "2.0", "--tile-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a.h5" in err and "Read-only file system" in err and "writable --out" in err
    assert not list(out.rglob(atomic.TMP_PREFIX + "*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped", "empty"])
def test_damaged_feature_file_from_another_tool_is_redone(damage, slides, reference, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["encode", *map(str, slides), "--out", str(out), *ENC]) == 0
    f = out / "features" / "a.h5"
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "flipped":  # bytes of the features array changed on disk (the checksum catches it)
        with h5py.File(f, "r") as h:
            off = h["features"].id.get_chunk_info(0).byte_offset
        for k in range(0, 64, 8):
            data[off + k] ^= 0xFF
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    with pytest.raises(GigaslideError) as e:
        store.load(f)
    assert "a.h5" in e.value.one_line() and "fix:" in e.value.one_line()
    capsys.readouterr()
    assert main(["encode", *map(str, slides), "--out", str(out), *ENC]) == 0  # redone, b is skipped
    assert "skipped 1 finished" in capsys.readouterr().out
    _same_as_reference(out, reference)


def test_damaged_coords_file_is_recomputed(slides, tmp_path):
    from gigaslide.tiling import TilingParams, tile_slide

    params = TilingParams(mpp=2.0, tile_size=32)
    g = tile_slide(slides[0], tmp_path, params)
    p = tmp_path / "patches" / "a.h5"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(GigaslideError, match="a.h5.*re-run"):
        load_grid(p)
    (tmp_path / "patches" / f"{atomic.TMP_PREFIX}a.h5.x1.h5").write_bytes(b"half")  # a killed run's leftover
    (tmp_path / "patches" / f"{atomic.TMP_PREFIX}b.h5.x1.h5").write_bytes(b"live")  # another slide's: kept
    g2 = tile_slide(slides[0], tmp_path, params)
    np.testing.assert_array_equal(g2.coords, g.coords)
    assert load_grid(p).coords.shape == g.coords.shape
    assert [f.name for f in (tmp_path / "patches").glob(atomic.TMP_PREFIX + "*")] == [f"{atomic.TMP_PREFIX}b.h5.x1.h5"]


def test_slide_vanishes_mid_run(slides, reference, tmp_path, capsys, monkeypatch):
    """The slide is deleted after it was tiled, before its tiles are read: it fails, the batch goes on,
    and once it is back the next run encodes just it, to the same features."""
    import shutil

    from gigaslide.tiling import parallel

    src = tmp_path / "src"
    src.mkdir()
    copies = [shutil.copy(s, src / s.name) for s in slides]
    real_tile = parallel.tile_slide
    moved = tmp_path / "a.tiff.away"

    def tile_then_vanish(s, out, params, **kw):  # noqa: ANN001, ANN003, ANN202
        g = real_tile(s, out, params, **kw)
        if g.slide_id == "a":
            os.replace(copies[0], moved)
        return g

    monkeypatch.setattr(parallel, "tile_slide", tile_then_vanish)  # in the tiling worker processes too (forked)
    out = tmp_path / "o"
    assert main(["encode", *map(str, copies), "--out", str(out), *ENC]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a.tiff" in err and ("not found" in err or "cannot" in err)
    assert not (out / "features" / "a.h5").exists() and (out / "features" / "b.h5").is_file()
    _no_partial(out)
    monkeypatch.setattr(parallel, "tile_slide", real_tile)
    os.replace(moved, copies[0])
    assert main(["encode", *map(str, copies), "--out", str(out), *ENC]) == 0
    assert "skipped 1 finished" in capsys.readouterr().out
    _same_as_reference(out, reference)

"""Atomic writes leave files with an ordinary file's mode (0666 less the umask), not the temporary file's 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from gigaslide import atomic
from gigaslide.features import store


@pytest.fixture
def umask():  # noqa: ANN201
    """Set the process umask for one test; the old one is put back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    text = atomic.write_text(tmp_path / "a.txt", "x")
    js = atomic.write_json(tmp_path / "a.json", {"a": 1})
    h5 = store.save(tmp_path / "f.h5", np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64))  # h5py truncates
    for p in (text, js, h5):
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, p
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under the same umask
    assert stat.S_IMODE(os.stat(plain).st_mode) == mode


def test_replacing_a_file_gives_the_new_file_the_umask_mode(tmp_path, umask):
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o600)
    umask(0o022)
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(atomic.TMP_PREFIX + "*"))


def test_a_full_disk_under_a_safetensors_write_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """safetensors reports a full disk as ``SafetensorError`` (not an OSError) whose text ends ``(os error 28)``: a
    checkpoint save on a full disk was a traceback instead of the one-line storage error, for every safetensors
    writer (checkpoints, encoder exports, model files)."""
    import safetensors
    import safetensors.torch
    import torch

    from gigaslide import runs
    from gigaslide.errors import GigaslideError

    runs.save_checkpoint(tmp_path, {"w": torch.ones(3)})

    def full_disk(tensors, filename, metadata=None):  # noqa: ANN001, ARG001 - half a file, then what safetensors says
        with open(filename, "wb") as fh:  # when the disk fills up (measured on a 64 KiB tmpfs)
            fh.write(b"\0" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(GigaslideError, match=r"last-00000002.safetensors: cannot write \(No space left on device\)"
                                             r".*free disk space") as e:
        runs.save_checkpoint(tmp_path, {"w": torch.zeros(3)})
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["last-00000001.safetensors", "last.json"]
    assert torch.equal(runs.load_checkpoint(tmp_path)["w"], torch.ones(3))


def test_other_errors_of_a_writer_are_not_taken_for_storage_faults(tmp_path):
    with pytest.raises(ValueError, match="bad payload"), atomic.atomic_path(tmp_path / "x.bin"):
        raise ValueError("bad payload (not an os error 28)")
    with pytest.raises(RuntimeError, match="os error 22"), atomic.atomic_path(tmp_path / "x.bin"):
        raise RuntimeError("Invalid argument (os error 22)")  # an errno that is no storage fault: as it is
    assert list(tmp_path.iterdir()) == []


def test_the_data_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    """A rename that reaches the disk before the data can leave an empty file after a power cut: the temporary
    file is fsynced (with what the writer wrote) before it replaces the target."""
    import os as _os

    events = []
    real_fsync, real_replace = _os.fsync, _os.replace

    def fsync(fd):
        events.append(("fsync", _os.readlink(f"/proc/self/fd/{fd}"), _os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.write_text(tmp_path / "a.json", "{}\n")
    (kind0, tmp0, size), (kind1, src, dst) = events
    assert (kind0, kind1) == ("fsync", "replace") and tmp0 == src and size == 3 and dst == str(tmp_path / "a.json")


@pytest.mark.parametrize("sub", ["", "inner/out"])
def test_an_output_folder_path_through_a_file_names_that_file(tmp_path, sub):
    """mkdir says only "File exists" / "Not a directory"; the error names the file that is in the way."""
    from gigaslide.errors import GigaslideError

    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / sub if sub else tmp_path / "afile"
    with pytest.raises(GigaslideError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
        atomic.ensure_writable_dir(target)
    assert (tmp_path / "afile").read_text() == "x"


def test_a_ctrl_c_right_after_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch):
    # the KeyboardInterrupt arrives between mkstemp and the write (here: inside the descriptor's close)
    real_close = os.close

    def interrupted_close(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(tmp_path / "a.h5"):
            pass
    assert os.listdir(tmp_path) == []


def test_a_safetensors_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    # safetensors' save_file writes its own temporary and renames it onto the path it was given: 0600 whatever the umask
    import torch
    from safetensors.torch import save_file

    from gigaslide import runs

    umask(0o022)
    with atomic.atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(3)}, str(tmp))
    ck = runs.save_checkpoint(tmp_path / "run", {"w": torch.ones(2)})
    for p in [tmp_path / "w.safetensors", *ck.parent.glob("*.safetensors")]:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p


def test_clean_stale_tmp_removes_the_temporaries_safetensors_leaves_when_killed(tmp_path):
    for name in (".tmp-a.h5.x1y2.h5", ".tmp94cQsE", ".tmpAB12cd", "keep.h5", ".tmpfile.txt", ".tmp12"):
        (tmp_path / name).write_bytes(b"")
    assert atomic.clean_stale_tmp(tmp_path) == 3
    assert sorted(os.listdir(tmp_path)) == [".tmp12", ".tmpfile.txt", "keep.h5"]

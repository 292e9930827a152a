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

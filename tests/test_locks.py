from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigaslide.locks import ItemLock


def test_one_holder_at_a_time_and_release(tmp_path):
    a, b = ItemLock(tmp_path, "s1"), ItemLock(tmp_path, "s1")
    assert a.acquire()
    assert not b.acquire()  # this process holds it through a: alive, not stale
    assert json.loads(a.path.read_text())["pid"] == os.getpid()
    a.release()
    assert not a.path.exists() and b.acquire()
    b.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # its pid is now free
    rec = {"pid": p.pid, "host": socket.gethostname(), "start": "1", "time": time.time()}
    (tmp_path / "s1.lock").write_text(json.dumps(rec))
    lock = ItemLock(tmp_path, "s1")
    assert lock.is_stale() and lock.acquire() and lock.took_over  # its holder may have left temporaries
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    fresh = ItemLock(tmp_path, "s2")
    assert fresh.acquire() and not fresh.took_over


def test_reused_pid_is_stale_other_host_by_heartbeat_age(tmp_path):
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": "not-my-start-time", "time": time.time()}
    (tmp_path / "a.lock").write_text(json.dumps(me))
    assert ItemLock(tmp_path, "a").is_stale()  # same pid, other start time: the owner is gone
    other = {"pid": 1, "host": "another-node", "start": None, "time": time.time()}
    (tmp_path / "b.lock").write_text(json.dumps(other))
    lock = ItemLock(tmp_path, "b", stale_after=60)
    assert not lock.is_stale() and not lock.acquire()
    old = time.time() - 120
    os.utime(lock.path, (old, old))
    assert lock.is_stale() and lock.acquire()


CLAIM = """
import sys, time
from gigaslide.locks import ItemLock
got = []
for i in range(40):
    lk = ItemLock(sys.argv[1], f"s{i}")
    if lk.acquire():
        got.append(i)
        time.sleep(0.01)  # hold it while working; never released, like a slide being encoded
print(" ".join(map(str, got)))
time.sleep(0.5)
"""


def test_two_processes_split_the_items(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [set(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert not outs[0] & outs[1]  # never the same item twice
    assert outs[0] | outs[1] == set(range(40))


def test_pid_reused_by_another_users_process_is_still_told_apart_by_its_start_time(tmp_path, monkeypatch):
    """A dead owner's pid now held by a process of another user: ``kill(pid, 0)`` raises PermissionError there, which
    counted as "the owner runs" without comparing start times, so that lock was never taken over."""
    import gigaslide.locks as L

    def kill(pid, sig):  # noqa: ANN001, ARG001 - how the kernel answers for a process of another user
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(L.os, "kill", kill)
    me = L.owner_record()
    gone = {**me, "start": "not-its-start-time"}  # the pid is the same, the process is another one
    (tmp_path / "a.lock").write_text(json.dumps(gone))
    lock = ItemLock(tmp_path, "a")
    assert lock.is_stale() and lock.acquire()
    lock.release()
    (tmp_path / "b.lock").write_text(json.dumps(me))  # the owner itself, running as another user: kept
    assert not ItemLock(tmp_path, "b").is_stale() and not ItemLock(tmp_path, "b").acquire()


@pytest.mark.parametrize("pid", [0, -1])
def test_a_record_naming_no_process_is_stale(tmp_path, pid):
    """kill(0, 0) and kill(-1, 0) ask about process groups and succeed: such a record looked alive forever."""
    rec = {"pid": pid, "host": socket.gethostname(), "start": None, "time": time.time()}
    (tmp_path / "a.lock").write_text(json.dumps(rec))
    assert ItemLock(tmp_path, "a").is_stale()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc")
def test_lock_of_an_exited_process_not_yet_reaped_is_taken_over(tmp_path):
    """An owner that exited but whose parent has not waited for it yet (a zombie) still answers kill(pid, 0) and keeps
    its start time: its lock looked held until the parent reaped it."""
    code = f"from gigaslide.locks import ItemLock; assert ItemLock({str(tmp_path)!r}, 's1').acquire()"
    p = subprocess.Popen([sys.executable, "-c", code])  # not waited for: a zombie once it exits
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.02)
        assert state == "Z" and json.loads((tmp_path / "s1.lock").read_text())["pid"] == p.pid
        lock = ItemLock(tmp_path, "s1")
        assert lock.is_stale() and lock.acquire()
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    finally:
        p.wait()


def _deep(tmp_path: Path) -> Path:
    """A TMPDIR whose multiprocessing sockets would be longer than AF_UNIX allows."""
    from gigaslide.locks import AF_UNIX_PATH_MAX

    deep = tmp_path / ("d" * (AF_UNIX_PATH_MAX - len(str(tmp_path))))
    deep.mkdir()
    return deep


def test_socket_safe_tempdir_moves_multiprocessings_folder_only_where_its_sockets_would_not_fit(tmp_path, monkeypatch):
    import multiprocessing.process as mp_process
    import tempfile

    from gigaslide.locks import AF_UNIX_PATH_MAX, socket_safe_tempdir

    config = mp_process.current_process()._config
    monkeypatch.delitem(config, "tempdir", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # short enough (pytest's own): left alone
    if len(str(tmp_path)) + 32 <= AF_UNIX_PATH_MAX:
        assert socket_safe_tempdir() is None and "tempdir" not in config
    monkeypatch.setattr(tempfile, "tempdir", str(_deep(tmp_path)))
    folder = socket_safe_tempdir()
    assert folder is not None and config["tempdir"] == folder and Path(folder).is_dir()
    assert len(f"{folder}/listener-XXXXXXXX") <= AF_UNIX_PATH_MAX
    assert socket_safe_tempdir() is None  # chosen once per process
    import multiprocessing.connection as mpc

    with mpc.Listener(family="AF_UNIX"):  # a socket there binds (under the deep TMPDIR: AF_UNIX path too long)
        pass  # (the folder is removed at exit, by the finaliser multiprocessing runs for its own)


def test_worker_processes_run_under_a_deep_tmpdir(tmp_path):
    """`pretrain --workers 1` under a TMPDIR of ~100 characters: its data-loader worker died with 'AF_UNIX path too
    long' and the job hung, then failed with a DataLoader traceback."""
    from gigaslide.testing import make_tile_folder

    tiles = make_tile_folder(tmp_path / "tiles", 4, size=32)
    env = {**os.environ, "TMPDIR": str(_deep(tmp_path)), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "gigaslide"]
    p = subprocess.run([*cli, "pretrain", "--data", str(tiles), "--out", str(tmp_path / "run"), "--method", "simclr",
                        "--backbone", "test_resnet", "--tile-size", "32", "--steps", "2", "--batch-size", "4",
                        "--workers", "1"], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "encoder" / "encoder.json").is_file()

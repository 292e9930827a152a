from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

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
    assert lock.is_stale() and lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()


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

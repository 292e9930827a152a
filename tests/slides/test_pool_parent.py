"""Reader processes of a killed encode exit with it (they waited on their task queue for good, ~450 MB each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gigaslide.testing import pid_alive

_KILLED_PARENT = """
import sys
from gigaslide.slides.pool import ReaderPool
pool = ReaderPool(workers=1)
print(pool._procs[0].pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to see the reader process")
def test_a_reader_process_exits_when_the_process_reading_is_killed():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    reader = 0
    try:
        reader = int(proc.stdout.readline())
        assert pid_alive(reader)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # a generous bound on an event, not a speed check
        while time.monotonic() < deadline and pid_alive(reader):
            time.sleep(0.2)
        assert not pid_alive(reader)
    finally:
        if reader and pid_alive(reader):  # on the old code: the orphan this test made
            os.kill(reader, signal.SIGKILL)
        proc.kill()


def test_reader_and_tiling_workers_leave_ctrl_c_to_the_parent(monkeypatch):
    from gigaslide import locks

    threads = []
    monkeypatch.setattr(locks.threading, "Thread",
                        lambda **kw: threads.append(kw) or type("T", (), {"start": lambda self: None})())
    old = signal.getsignal(signal.SIGINT)
    try:
        locks.exit_with_parent(os.getppid())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert threads and threads[0]["name"] == "gigaslide-parent-watch"
    finally:
        signal.signal(signal.SIGINT, old)

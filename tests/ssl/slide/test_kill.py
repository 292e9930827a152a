"""kill -9 in the middle of slide-SSL pre-training, then the same command again: bit-exact with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs

SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(1)
method, data, out, kw, slow = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), float(sys.argv[5])
log = lambda *a: time.sleep(slow)  # one call per epoch: gives the parent time to kill mid-run; changes nothing learned
if method == "gigassl":
    from gigaslide.ssl.slide.gigassl import pretrain_gigassl as train
else:
    from gigaslide.ssl.slide.slpd import pretrain_slpd as train
train(data, out, log=log, **kw)
"""
GIGASSL = dict(epochs=12, out_dim=16, hidden=16, proj_dim=8, batch_size=4, lr=1e-3, tiles_per_step=4, blocks=1,
               warmup_epochs=1)
SLPD = dict(epochs=8, region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
            head_dim=64, n_local=2)


def _start(method: str, data: Path, out: Path, kw: dict, slow: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, method, str(data), str(out), json.dumps(kw), str(slow)],
                            env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _epoch_saved(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "last.json").read_text())["payload"]["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gigassl", "slpd"])
def test_kill_9_mid_pretraining_then_resume_is_bit_exact(method, tmp_path, make_fake_cache):
    data = make_fake_cache(tmp_path / "cache", n_slides=6, n_tiles=36)
    kw = GIGASSL if method == "gigassl" else SLPD
    ref = _start(method, data, tmp_path / "ref", kw, 0.0)
    killed = _start(method, data, tmp_path / "killed", kw, 0.3)
    deadline = time.time() + 600  # generous: a loaded machine starts the child slowly
    while time.time() < deadline and killed.poll() is None and _epoch_saved(tmp_path / "killed") < 2:
        time.sleep(0.02)
    assert killed.poll() is None, killed.communicate()[1].decode()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()  # it was killed before the end
    assert runs.read_run(tmp_path / "killed")["status"] == "running"  # as a kill leaves it: no clean stop recorded
    resumed = _start(method, data, tmp_path / "killed", kw, 0.0)
    for p in (ref, resumed):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = runs.read_run(tmp_path / "killed")
    assert rec["status"] == "finished" and len(rec["invocations"]) == 2
    assert not list((tmp_path / "killed").rglob("*.tmp*"))  # no half-written file left by the kill

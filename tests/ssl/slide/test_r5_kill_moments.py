"""kill -9 at moments test_kill.py does not reach: SLPD inside its prototype stage, Giga-SSL between its "best" and
"last" checkpoints, embed-slides while it writes --regions-out; the same command again gives the uninterrupted
result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
what, data, out, kw, marker = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]

def hold():  # tell the parent where we are, then wait for its kill -9
    Path(marker).write_text("here")
    time.sleep(600)

if what == "slpd":
    import gigaslide.ssl.slide.slpd as m
    targets, calls = m.prototype_targets, []
    def hooked(*a, **k):
        calls.append(1)
        if marker != "-" and len(calls) == 2:  # the second epoch with prototypes: inside the k-means / matching stage
            hold()
        return targets(*a, **k)
    m.prototype_targets = hooked
    m.pretrain_slpd(data, out, log=lambda *a: None, **kw)
elif what == "gigassl":
    from gigaslide import runs
    import gigaslide.ssl.slide.gigassl as m
    save = runs.Run.save
    def hooked(self, payload, name="last"):
        p = save(self, payload, name)
        if marker != "-" and name == "best" and int(payload["epoch"]) >= 2:  # "best" written, "last" not yet
            hold()
        return p
    runs.Run.save = hooked
    m.pretrain_gigassl(data, out, log=lambda *a: None, **kw)
else:
    import gigaslide.ssl.slide.embed as m
    write = m._write_regions
    def hooked(*a, **k):
        write(*a, **k)
        if marker != "-":  # the first slide's region file is written, the others' and the embeddings not yet
            hold()
    m._write_regions = hooked
    m.embed_slides(kw["model"], data, out, regions_out=kw["regions_out"], device="cpu")
"""
GIGASSL = dict(epochs=5, out_dim=16, hidden=16, proj_dim=8, batch_size=4, lr=1e-3, tiles_per_step=4, blocks=1,
               warmup_epochs=1, select="best")
SLPD = dict(epochs=4, region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
            head_dim=64, n_local=2)


def _start(what: str, data: Path, out: Path, kw: dict, marker: str = "-") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, what, str(data), str(out), json.dumps(kw), marker],
                            env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_at_marker(p: subprocess.Popen, marker: Path) -> None:
    deadline = time.time() + 600  # a loaded machine starts the child slowly
    while time.time() < deadline and p.poll() is None and not marker.exists():
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1].decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()


def _done(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]


def _same_model(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _history(run: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "history.json").read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["slpd", "gigassl"])
def test_kill_9_inside_an_epoch_boundary_stage_then_resume_is_bit_exact(method, tmp_path, make_fake_cache):
    data = make_fake_cache(tmp_path / "cache", n_slides=6, n_tiles=36)
    kw = SLPD if method == "slpd" else GIGASSL
    ref = _start(method, data, tmp_path / "ref", kw)
    killed = _start(method, data, tmp_path / "killed", kw, str(tmp_path / "marker"))
    _kill_at_marker(killed, tmp_path / "marker")
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = _start(method, data, tmp_path / "killed", kw)
    _done(ref, resumed)
    assert _same_model(tmp_path / "ref", tmp_path / "killed")
    assert _history(tmp_path / "ref") == _history(tmp_path / "killed")
    rec = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert rec["status"] == "finished" and len(rec["invocations"]) == 2
    if method == "gigassl":
        ref_rec = json.loads((tmp_path / "ref" / "run.json").read_text())
        assert rec["summary"]["exported_epoch"] == ref_rec["summary"]["exported_epoch"]
    assert not list((tmp_path / "killed").rglob(".tmp-*"))


@pytest.mark.slow
def test_kill_9_while_embed_slides_writes_regions_then_rerun_gives_the_uninterrupted_outputs(tmp_path, make_fake_cache):
    from gigaslide.ssl.slide.slpd import pretrain_slpd

    data = make_fake_cache(tmp_path / "cache", n_slides=3, n_tiles=36)
    run = tmp_path / "run"
    pretrain_slpd(data, run, log=lambda *a: None, **{**SLPD, "epochs": 1})  # embedded below in subprocesses only
    kw = lambda regions: {"model": str(run), "regions_out": str(regions)}  # noqa: E731
    ref = _start("embed", data, tmp_path / "ref.h5", kw(tmp_path / "ref_regions"))
    killed = _start("embed", data, tmp_path / "emb.h5", kw(tmp_path / "regions"), str(tmp_path / "marker"))
    _kill_at_marker(killed, tmp_path / "marker")
    assert not (tmp_path / "emb.h5").exists()  # no embeddings file before every slide is embedded
    assert sorted(f.name for f in (tmp_path / "regions" / "features").iterdir()) == ["slide0.h5"]
    again = _start("embed", data, tmp_path / "emb.h5", kw(tmp_path / "regions"))
    _done(ref, again)
    with h5py.File(tmp_path / "ref.h5") as a, h5py.File(tmp_path / "emb.h5") as b:
        assert list(a["slide_ids"][:]) == list(b["slide_ids"][:]) == [b"slide0", b"slide1", b"slide2"]
        assert np.array_equal(a["embeddings"][:], b["embeddings"][:])
    names = sorted(f.name for f in (tmp_path / "regions" / "features").iterdir())
    assert names == ["slide0.h5", "slide1.h5", "slide2.h5"]  # no temporary left by the kill
    for n in names:
        with h5py.File(tmp_path / "ref_regions" / "features" / n) as a, \
                h5py.File(tmp_path / "regions" / "features" / n) as b:
            assert np.array_equal(a["features"][:], b["features"][:]) and np.array_equal(a["coords"][:], b["coords"][:])

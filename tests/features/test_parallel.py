"""Slide-parallel encode: ranks from torchrun / SLURM, LPT shares, two processes on one folder, a killed rank."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gigaslide.encoders import build_encoder
from gigaslide.features import store
from gigaslide.features.extract import encode_slides
from gigaslide.features.parallel import MAX_GPU_READERS, RankInfo, auto_workers, lpt_shares, rank_info, rank_order
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams

PARAMS = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)
SLIDES = [((1280, 1024), 4), ((1024, 768), 3), ((1024, 768), 7), ((768, 768), 4)]  # (size, seed): 4-30 tiles each

RUN = """
import sys, time, torch
torch.set_num_threads(1)
from gigaslide.encoders import build_encoder
from gigaslide.features.extract import encode_slides
from gigaslide.tiling import TilingParams
enc = build_encoder("test_resnet", "random", seed=0)
if sys.argv[2] == "slow":  # a rank slow enough to be killed in the middle of a slide: slow the model encode runs
    import gigaslide.features.extract as X
    real = X.for_inference
    def slow(e, **kw):
        f = real(e, **kw)
        fwd = f.forward
        f.forward = lambda x: (time.sleep(0.3), fwd(x))[1]
        return f
    X.for_inference = slow
r = encode_slides(sys.argv[3:], sys.argv[1], enc, TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5), batch_size=8,
                  workers=0, precision="fp32", overlays=False)
print("DONE", " ".join(sorted(r.done)), "| FAILED", " ".join(sorted(r.failed)))
"""


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("par")
    return [make_slide(d / f"s{i}.tiff", sz, seed=seed) for i, (sz, seed) in enumerate(SLIDES)]


@pytest.fixture(scope="module")
def reference(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = encode_slides(slides, out, build_encoder("test_resnet", "random", seed=0), PARAMS, batch_size=8, workers=0,
                        precision="fp32", overlays=False)
    assert len(res.done) == 4
    return {p.stem: store.load(p).features for p in (out / "features").glob("*.h5")}, out / "patches"


def _pretiled(out: Path, reference) -> Path:  # noqa: ANN001
    shutil.copytree(reference[1], out / "patches")  # tiling is not what these tests are about: reuse the grids
    return out


def _start(out: Path, slides, mode: str = "fast", rank: int = 0, world: int = 2) -> subprocess.Popen:  # noqa: ANN001
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), mode, *map(str, slides)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_same_as_reference(out: Path, reference) -> None:  # noqa: ANN001
    got = {p.stem: store.load(p).features for p in (out / "features").glob("*.h5")}
    assert sorted(got) == sorted(reference[0])
    for k, v in reference[0].items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k  # bit for bit
    assert not list(out.rglob(".tmp-*")) and not list((out / "locks").glob("*.lock"))


def test_rank_from_torchrun_or_slurm_env():
    assert rank_info({}) == RankInfo()
    t = rank_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (t.rank, t.world, t.local_rank, t.local_world, t.source) == (3, 8, 1, 4, "torchrun")
    s = rank_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "3(x2)"})
    assert (s.rank, s.world, s.local_rank, s.local_world, s.source) == (5, 6, 2, 3, "slurm")
    assert rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world == 1


def test_auto_workers_gives_a_cpu_reader_process_only_a_core_of_its_own():
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_workers(cpu, RankInfo(), cores=2, torch_threads=2) == 0  # reading inline: no core to spare
    assert auto_workers(cpu, RankInfo(), cores=4, torch_threads=2) == 1
    assert auto_workers(cpu, RankInfo(), cores=2, torch_threads=1) == 1
    assert auto_workers(cuda, RankInfo(), cores=16) == 15
    assert auto_workers(cuda, RankInfo(), cores=64) == MAX_GPU_READERS
    assert auto_workers(cuda, RankInfo(), cores=1) == 1  # a GPU always gets a reader process
    four_ranks = RankInfo(0, 4, 0, 4, "torchrun")
    assert auto_workers(cuda, four_ranks) == max(1, min(MAX_GPU_READERS, len(os.sched_getaffinity(0)) // 4 - 1))


def test_lpt_shares_balance_tile_counts_longest_first():
    sizes = [10, 9, 8, 7, 6, 5, 4, 3]
    owner = lpt_shares(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in (0, 1)]
    assert loads == [26, 26]
    order = rank_order(sizes, RankInfo(1, 2))
    assert order[0] == 1 and [sizes[i] for i in order[:4]] == sorted((s for s, o in zip(sizes, owner) if o == 1), reverse=True)


def _here(out: Path, slides, rank: int) -> list[str]:  # noqa: ANN001
    """This test process as one more rank (saves starting another Python with torch)."""
    res = encode_slides(slides, out, build_encoder("test_resnet", "random", seed=0), PARAMS, batch_size=8, workers=0,
                        precision="fp32", overlays=False, rank=RankInfo(rank, 2))
    assert not res.failed
    return sorted(res.done)


def test_two_processes_split_the_slides_byte_identical(tmp_path, slides, reference):
    _pretiled(tmp_path, reference)
    other = _start(tmp_path, slides, rank=1)
    time.sleep(2.0)  # let it start (importing torch) so both are encoding at once
    mine = _here(tmp_path, slides, rank=0)
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err[-500:]
    theirs = out.split("DONE", 1)[1].split("|")[0].split()
    assert sorted(mine + theirs) == ["s0", "s1", "s2", "s3"]  # every slide encoded exactly once
    _assert_same_as_reference(tmp_path, reference)
    man = json.loads((tmp_path / "manifest.json").read_text())  # one manifest with every process's slides
    assert {k: v["status"] for k, v in man["slides"].items()} == dict.fromkeys(["s0", "s1", "s2", "s3"], "done")
    assert {v["rank"] for v in man["slides"].values()} <= {0, 1} and all(v["tiles"] > 0 for v in man["slides"].values())


def test_killed_rank_is_taken_over(tmp_path, slides, reference):
    _pretiled(tmp_path, reference)
    slow = _start(tmp_path, slides, mode="slow", rank=1)
    deadline = time.time() + 60
    held = None
    while time.time() < deadline and held is None:  # wait until it is in the middle of encoding a slide
        for lk in (tmp_path / "locks").glob("*.lock") if (tmp_path / "locks").is_dir() else []:
            try:
                rec = json.loads(lk.read_text())
            except (OSError, ValueError):
                continue
            if rec["pid"] == slow.pid:
                held = lk.stem
        time.sleep(0.05)
    time.sleep(0.5)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    assert held is not None and not (tmp_path / "features" / f"{held}.h5").exists()
    assert (tmp_path / "locks" / f"{held}.lock").exists()  # left behind by the dead rank
    assert held in _here(tmp_path, slides, rank=0)  # the survivor takes the dead rank's slide over
    _assert_same_as_reference(tmp_path, reference)

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


def _broken(d: Path) -> Path:
    p = d / "broken.tiff"
    p.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    return p


def test_rank0_stays_until_the_other_ranks_slides_are_done(tmp_path, slides, reference):
    """torchrun stops every rank when one exits with an error: rank 0, which alone reports a failed slide, must not
    end (and so stop the others) while another rank is still encoding -- it used to leave their slides and return."""
    _pretiled(tmp_path, reference)
    broken = _broken(tmp_path)
    slow = _start(tmp_path, [*slides, broken], mode="slow", rank=1)
    time.sleep(2.0)
    res = encode_slides([*slides, broken], tmp_path, build_encoder("test_resnet", "random", seed=0), PARAMS,
                        batch_size=8, workers=0, precision="fp32", overlays=False, rank=RankInfo(0, 2))
    on_disk = sorted(p.stem for p in (tmp_path / "features").glob("*.h5"))  # when rank 0 returns
    out, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, err[-500:]
    assert on_disk == ["s0", "s1", "s2", "s3"] and not res.others
    assert "broken" in {**res.failed, **res.failed_elsewhere}  # rank 0 reports the job's failures, wherever they were
    _assert_same_as_reference(tmp_path, reference)


def test_a_slide_another_rank_of_this_job_failed_is_not_tried_again(tmp_path, slides, reference):
    _pretiled(tmp_path, reference)
    (tmp_path / "locks").mkdir()
    old = tmp_path / "locks" / "s1.failed"  # a failure of an earlier job: tried again
    old.write_text(json.dumps({"error": "old", "pid": -1}))
    os.utime(old, (time.time() - 60, time.time() - 60))
    enc = build_encoder("test_resnet", "random", seed=0)

    def mark_s0(*a, **kw):  # noqa: ANN002, ANN003
        (tmp_path / "locks" / "s0.failed").write_text(json.dumps({"error": "s0: unreadable on rank 1", "pid": -1}))

    import gigaslide.features.extract as X

    real = X._Run.collect

    def collect(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        mark_s0()  # rank 1 fails s0 after this rank started
        return real(self, *a, **kw)

    X._Run.collect = collect
    try:
        res = encode_slides(slides, tmp_path, enc, PARAMS, batch_size=8, workers=0, precision="fp32", overlays=False,
                            rank=RankInfo(0, 2))
    finally:
        X._Run.collect = real
    assert res.failed_elsewhere == {"s0": "s0: unreadable on rank 1"} and not res.failed
    assert sorted(res.done) == ["s1", "s2", "s3"] and not (tmp_path / "features" / "s0.h5").exists()
    assert not old.exists()  # s1 encoded: its old mark is gone


def test_encode_exit_status_comes_from_rank0(tmp_path, monkeypatch, capsys):
    from gigaslide.cli.spine import encode
    from gigaslide.errors import GigaslideError

    broken = _broken(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    encode([str(broken)], str(tmp_path / "o1"), encoder="test_resnet", weights="random", mpp=1.0, tile_size=64)
    assert "rank 1: 1 slide(s) failed here" in capsys.readouterr().err  # printed, but no error exit
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(GigaslideError):
        encode([str(broken)], str(tmp_path / "o0"), encoder="test_resnet", weights="random", mpp=1.0, tile_size=64)


def test_failure_marks_are_judged_by_the_launchers_job_id_not_by_clocks(tmp_path, slides, reference):
    """A mark's mtime comes from the clock of the node (or file server) that wrote it: with a job id from the
    launcher, a mark of this job counts however old it looks, and one of an earlier job is tried again however
    new it looks."""
    _pretiled(tmp_path, reference)
    (tmp_path / "locks").mkdir()
    ours = tmp_path / "locks" / "s0.failed"  # this job's rank 1, whose clock is a minute behind
    ours.write_text(json.dumps({"error": "s0: unreadable on rank 1", "pid": -1, "job": "slurm-7.0.0"}))
    os.utime(ours, (time.time() - 60, time.time() - 60))
    earlier = tmp_path / "locks" / "s1.failed"  # an earlier job's mark, dated ahead by a skewed clock
    earlier.write_text(json.dumps({"error": "old", "pid": -1, "job": "slurm-6.0.0"}))
    os.utime(earlier, (time.time() + 3600, time.time() + 3600))
    res = encode_slides(slides, tmp_path, build_encoder("test_resnet", "random", seed=0), PARAMS, batch_size=8,
                        workers=0, precision="fp32", overlays=False, rank=RankInfo(0, 2, job="slurm-7.0.0"))
    assert res.failed_elsewhere == {"s0": "s0: unreadable on rank 1"} and not res.failed
    assert sorted(res.done) == ["s1", "s2", "s3"] and not earlier.exists()


def test_the_launchers_job_id_is_read_from_torchrun_and_slurm():
    from gigaslide.features.parallel import rank_info

    assert rank_info({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}).job == "torchrun-abc"
    assert rank_info({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}).job is None  # its default
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3"}
    assert rank_info(env).job == "slurm-42.3.0"
    assert rank_info({**env, "SLURM_RESTART_COUNT": "1"}).job == "slurm-42.3.1"  # a requeued job is a new job

"""`pretrain --devices N` inside a SLURM job: Lightning took every SLURM job for srun-started processes (a one-task
job failed with a Lightning traceback; a job of N tasks per node run without srun waited forever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.lightning import slurm_layout
from gigaslide.testing import make_tile_folder

JOB = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "job.sh", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
       "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize(("env", "devices", "expected"), [
    ({}, 2, (True, 1)),  # no SLURM: this command starts its processes
    ({**JOB, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}, 2, (True, 1)),
    ({**JOB, "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "interactive"}, 2, (True, 1)),
    ({**JOB, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NNODES": "2"}, 2, (False, 2)),
    ({**JOB, "SLURM_NTASKS": "2", "SLURM_NNODES": "1"}, 2, (False, 1)),
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_NTASKS": "1"}, 2, (False, 1)),  # torchrun's variables win
])
def test_slurm_layout(env, devices, expected):
    assert slurm_layout(devices, env) == expected


def test_a_job_of_several_tasks_per_node_other_than_devices_is_one_line_naming_srun():
    env = {**JOB, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1"}
    with pytest.raises(GigaslideError, match=r"runs 4 task\(s\) per node .* --devices is 2.*srun gigaslide pretrain "
                                             r"--devices 4"):
        slurm_layout(2, env)


def test_a_one_task_slurm_job_runs_its_devices_as_its_own_processes(tmp_path):
    pytest.importorskip("pytorch_lightning")
    exe = Path(sys.executable).parent / "gigaslide"
    if not exe.is_file():
        pytest.skip("console script not installed")
    data = make_tile_folder(tmp_path / "tiles", size=40, flat=16)
    run = tmp_path / "run"
    env = {**os.environ, **JOB, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
           "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    r = subprocess.run([str(exe), "pretrain", "--data", str(data), "--out", str(run), "--method", "simclr",
                        "--backbone", "test_resnet", "--tile-size", "32", "--batch-size", "4", "--workers", "0",
                        "--devices", "2", "--steps", "1", "--method-args", '{"hidden_dim": 16, "out_dim": 8}'],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "run.json").read_text())["summary"]
    assert s["devices"] == 2 and s["steps"] == 1

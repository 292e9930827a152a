"""`gigaslide pretrain --devices 2`: two DDP processes through PyTorch Lightning (gloo on CPU).

The same launcher and strategy run on GPUs (NCCL); here each process gets its own shard of every
step's batch (``StepSampler`` rank/world_size) and SimCLR gathers negatives across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gigaslide.encoders import build_encoder
from gigaslide.testing import make_tile_folder

pytest.importorskip("pytorch_lightning")


def test_two_process_ddp_run_trains_resumes_and_exports(tmp_path):
    data = make_tile_folder(tmp_path / "tiles", size=40, flat=16)
    exe = Path(sys.executable).parent / "gigaslide"
    if not exe.is_file():
        pytest.skip("console script not installed")
    run = tmp_path / "run"
    cmd = [str(exe), "pretrain", "--data", str(data), "--out", str(run), "--method", "simclr", "--backbone", "test_resnet",
           "--tile-size", "32", "--batch-size", "4", "--workers", "0", "--devices", "2",
           "--method-args", '{"hidden_dim": 16, "out_dim": 8}']
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    r = subprocess.run([*cmd, "--steps", "2"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run / "run.json").read_text())["summary"]
    assert s["devices"] == 2 and s["engine"] == "pytorch-lightning" and s["steps"] == 2
    first = build_encoder(str(run / "encoder"))
    r = subprocess.run([*cmd, "--steps", "3"], capture_output=True, text=True, env=env, timeout=240)  # resume: one more step
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["summary"]["steps"] == 3
    second = build_encoder(str(run / "encoder"))
    assert second.weights_id != first.weights_id

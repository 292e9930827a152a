"""Review round 5: Ctrl-C / SIGTERM stop ``nuclei-train`` with a non-zero status (the run is not finished)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import TINY

SCRIPT = "import sys; from gigaslide.cli.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_training_exits_non_zero_and_resumes(tiny_run: Path, tmp_path: Path, sig: int, status: int) -> None:
    """A Ctrl-C'd nuclei-train printed "stopped after 1 epochs" and exited 0, so `nuclei-train && nuclei-eval` went on
    without a model (pretrain, train-streaming and pretrain-slides exit 130 / 143)."""
    out = tmp_path / "run"
    args = ["nuclei-train", "--images", str(tiny_run / "images"), "--annotations", str(tiny_run / "annotations"),
            "--out", str(out)]
    args += [a for k, v in {**TINY, "epochs": 50}.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    rec = out / "checkpoint" / "last.json"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if json.loads(rec.read_text())["payload"]["epoch"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    p.send_signal(sig)
    o, e = p.communicate(timeout=300)
    err = e.decode()
    assert p.returncode == status, err[-2000:]
    assert "Traceback" not in err and "re-run the same command to resume" in err
    assert "stopped after" in o.decode() and not (out / "model").exists()

"""benchmarks/_common.py: a benchmark that runs training in-process stops when that run was interrupted, instead
of going on to the next run with a half-trained encoder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import stop_if_interrupted  # noqa: E402


@pytest.mark.parametrize("reason", ["signal", "interrupt"])
def test_interrupted_run_stops_the_benchmark(reason: str) -> None:
    with pytest.raises(SystemExit, match="interrupted during /runs/a .*re-run this command to resume"):
        stop_if_interrupted({"stopped_by": reason, "run": "/runs/a"})


@pytest.mark.parametrize("reason", ["steps", "budget", None])
def test_finished_run_passes_through(reason: str | None) -> None:
    summary = {"stopped_by": reason, "steps": 3}
    assert stop_if_interrupted(summary) is summary


def test_make_bench_reruns_the_recorded_commands(tmp_path: Path) -> None:
    """run_all re-runs what a results file says measured it (footers and section lines, `nice` / `cd ... &&` dropped,
    each once), so `make bench` reproduces RESULTS.md rather than the scripts' defaults."""
    import run_all

    text = ("## a\nCommand: `nice .venv/bin/python benchmarks/bench_mil.py --quick --x 1`  \n"
            "## b\nCommand: `cd /w && .venv/bin/python benchmarks/bench_mil.py`\n"
            "_Measured 2026 on cpu; command: `python benchmarks/bench_mil.py --quick --x 1`_\n"
            "_Measured 2026 on cpu; command: `python benchmarks/not_a_bench.py`_\n")
    cmds = run_all.recorded_commands(text)
    script = str(run_all.HERE / "bench_mil.py")
    assert cmds == [[sys.executable, script, "--quick", "--x", "1"], [sys.executable, script]]


def test_child_peak_rss_is_the_childs_own_not_the_forking_parents() -> None:
    """ru_maxrss survives fork + exec: a child of a big process would report the parent's RSS. The child here
    allocates ~200 MB while this process holds ~600 MB: the measured peak must be the child's."""
    import numpy as np
    from _common import run_child_peak_rss

    held = np.ones(600 * 2**20 // 8)  # touched: 600 MB resident in this process
    gb, out = run_child_peak_rss("import numpy as np\na = np.ones(200 * 2**20 // 8)\nprint(int(a.sum()))")
    assert int(out.strip()) == 200 * 2**20 // 8 and held[0] == 1.0
    assert 0.2 < gb < 0.45, gb  # 200 MB + the interpreter and numpy, far below the parent's 600 MB

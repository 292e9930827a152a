"""Shared helpers for benchmark scripts: machine description, result files, peak RSS of a child."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def write_result(topic: str, markdown: str, command: list[str] | None = None, stamp: str | None = None) -> Path:
    """``results/<topic>.md`` with the time and machine of the measurement and the command that made it (``command`` /
    ``stamp``: those of an earlier measurement whose saved rows are re-rendered)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{topic}.md"
    stamp = stamp or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = " ".join([Path(sys.executable).name, *(command if command is not None else sys.argv)])
    p.write_text(f"{markdown.rstrip()}\n\n_Measured {stamp} on {machine()}; command: `{cmd}`_\n")
    return p


#: The child's own peak RSS in kB: VmHWM of its memory map (Linux). Not ``ru_maxrss``: across fork + exec that keeps
#: the forking parent's RSS at the fork, so a child of a 2 GB benchmark process would report at least 2 GB.
PEAK_KB_CODE = ("def _peak_kb():\n"
                "    try:\n"
                "        for _l in open('/proc/self/status'):\n"
                "            if _l.startswith('VmHWM:'):\n"
                "                return int(_l.split()[1])\n"
                "    except OSError:\n"
                "        pass\n"
                "    import resource\n"
                "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n")


def run_child_peak_rss(code: str, timeout: float = 1800) -> tuple[float, str]:
    """Run ``python -c code`` and return (peak RSS in GB of that child, its stdout)."""
    wrapper = ("import sys\n" + code + "\n" + PEAK_KB_CODE + "print('PEAK_KB', _peak_kb(), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    kb = max(int(ln.split()[1]) for ln in proc.stderr.splitlines() if ln.startswith("PEAK_KB"))
    return kb / 1024**2, proc.stdout


def stop_if_interrupted(summary: dict) -> dict:
    """A training run that stopped on SIGTERM / Ctrl-C has saved its checkpoint and returned; the benchmark that
    called it in-process must stop too (re-running the benchmark resumes that run), not go on to the next run."""
    if summary.get("stopped_by") in ("signal", "interrupt"):
        sys.exit(f"interrupted during {summary.get('run', 'a training run')} (checkpoint saved; re-run this command to resume)")
    return summary


_START_LOAD = os.getloadavg()[0]  # taken when a benchmark imports this module, before it loads the machine itself


def load_note() -> str:
    """How busy the machine was when the benchmark started (1-minute load average over the cores): measured, not assumed."""
    load, cores = _START_LOAD, os.cpu_count() or 1
    state = "quiet" if load < 0.5 * cores else ("busy" if load > 1.5 * cores else "partly loaded")
    return f"machine {state} at start (1-min load average {load:.1f} on {cores} cores)"

"""Start-up cost of ``gigaslide tile`` (issue #18: "start-up under 0.5 s, lazy imports of heavy optional parts").

Every number is measured in fresh processes, one at a time (median of --repeats):

* ``python -c pass`` and ``import numpy``: the interpreter's own floor on this machine;
* every module a real ``gigaslide tile`` run imports (listed by ``python -X importtime``), imported in a fresh process;
* ``gigaslide tile --help`` and ``gigaslide tile`` end to end on a small generated slide;
* which heavy modules the tile command loads (and which it does not), and where the import time goes.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, load_note, write_result  # noqa: E402

GOAL_S = 0.5
HEAVY = ("torch", "timm", "scipy.signal", "skimage", "sklearn", "matplotlib", "scipy.ndimage", "h5py", "openslide",
         "jsonargparse")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-800:]}")
    return dt


def _in_process(code: str) -> float:
    """Seconds the statements take inside a fresh interpreter (interpreter start-up excluded)."""
    wrapped = f"import time; t0 = time.perf_counter()\n{code}\nprint(time.perf_counter() - t0)"
    p = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, env=_env(), timeout=600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-800:])
    return float(p.stdout.strip().splitlines()[-1])


def _importtime(argv: list[str]) -> list[tuple[str, float, int]]:
    """(module, self s, nesting depth) of every import the command does, from ``python -X importtime``."""
    p = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=_env(), timeout=600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-800:])
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cum_us, raw = line[len("import time:"):].split("|")
        name = raw.strip()
        rows.append((name, int(self_us) / 1e6, len(raw.rstrip()) - len(name)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from gigaslide.testing import make_slide

    work = Path(tempfile.mkdtemp(prefix="gs-startup-"))
    slide = make_slide(work / "small.tiff", (2048, 1536), mpp=0.5, seed=1)
    cli = str(Path(sys.executable).with_name("gigaslide"))
    samples: dict[str, list[float]] = {k: [] for k in ("pass", "numpy", "imports", "help", "tile")}
    times: list[tuple[str, float, float]] = []
    for i in range(args.repeats):  # interleaved, so a busy spell hits every row alike
        samples["pass"].append(_wall([sys.executable, "-c", "pass"]))
        samples["numpy"].append(_in_process("import numpy"))
        if i == 0:  # which modules a real run imports, in its order; then timed without -X importtime's overhead
            times = _importtime([cli, "tile", str(slide), "--out", str(work / "imp")])
            outer = [n for n, _s, depth in times if depth == min(d for _n, _s, d in times) and n not in sys.builtin_module_names]
            replay = "import importlib\nfor m in %r:\n    importlib.import_module(m)" % outer
        samples["imports"].append(_in_process(replay))
        samples["help"].append(_wall([cli, "tile", "--help"]))
        samples["tile"].append(_wall([cli, "tile", str(slide), "--out", str(work / f"out{i}")]))
    med = {k: statistics.median(v) for k, v in samples.items()}
    rng = {k: (min(v), max(v)) for k, v in samples.items()}

    loaded = {t[0] for t in times}
    heavy_in = [m for m in HEAVY if any(n == m or n.startswith(m + ".") for n in loaded)]
    heavy_out = [m for m in HEAVY if m not in heavy_in]
    per_pkg: dict[str, float] = {}
    for name, self_s, _depth in times:  # import time under -X importtime, summed per top-level package
        per_pkg[name.split(".")[0]] = per_pkg.get(name.split(".")[0], 0.0) + self_s
    top = sorted(per_pkg.items(), key=lambda kv: -kv[1])[:10]

    met = med["imports"] < GOAL_S
    rows = ["# `gigaslide tile` start-up", "",
            f"Fresh processes, one at a time, interleaved; median of {args.repeats} [min, max]; {load_note()}. "
            "Slide: generated 2048×1536 pyramidal TIFF at 0.5 µm/px.", "",
            "| what | seconds |", "|---|---|",
            f"| `python -c pass` (interpreter start-up) | {med['pass']:.3f} [{rng['pass'][0]:.3f}, {rng['pass'][1]:.3f}] |",
            f"| `import numpy` | {med['numpy']:.3f} [{rng['numpy'][0]:.3f}, {rng['numpy'][1]:.3f}] |",
            f"| every module a `gigaslide tile` run imports, imported in a fresh process | **{med['imports']:.3f}** [{rng['imports'][0]:.3f}, {rng['imports'][1]:.3f}] |",
            f"| `gigaslide tile --help` | {med['help']:.3f} [{rng['help'][0]:.3f}, {rng['help'][1]:.3f}] |",
            f"| `gigaslide tile` end to end (one small slide) | {med['tile']:.3f} [{rng['tile'][0]:.3f}, {rng['tile'][1]:.3f}] |",
            "", "Where the import time goes (`-X importtime` self times summed per top-level package, one run):", "",
            "| package | seconds |", "|---|---|", *[f"| {name} | {sec:.3f} |" for name, sec in top], "",
            f"Heavy modules loaded by the tile command: {', '.join(heavy_in) or 'none'}; not loaded: {', '.join(heavy_out)}.", "",
            f"Verdict (computed): imports {med['imports']:.3f} s vs the goal < {GOAL_S} s: "
            + ("**met**." if met else f"**not met** (over by {med['imports'] - GOAL_S:.3f} s)."),
            ]
    print(write_result("startup", "\n".join(rows)).read_text())


if __name__ == "__main__":
    main()

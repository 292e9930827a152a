"""Run every benchmark (or the ones named) and collect benchmarks/results/*.md into benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py                 # all
    .venv/bin/python benchmarks/run_all.py encode tiling   # some
    .venv/bin/python benchmarks/run_all.py --collect       # only rebuild RESULTS.md
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Sections in data-flow order; any other bench_<name>.py / results/<name>.md follows alphabetically.
ORDER = ["reader", "encode", "tiling", "startup", "tile_ssl", "tile_finetune", "tile_ablation", "dinov2", "nuclei", "mil",
         "slide_ssl", "streaming", "viewer", "reliability"]  # tile_finetune: into tile_ssl.md


def scripts() -> list[str]:
    found = {p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def collect() -> Path:
    parts = ["# Benchmark results", "",
             "Each section is written by `benchmarks/bench_<topic>.py` (command and machine under each). "
             "Ratios are measured side by side in one run. This file is rebuilt by `benchmarks/run_all.py --collect`.", ""]
    names = [n for n in ORDER if (HERE / "results" / f"{n}.md").is_file()]
    names += sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER)
    for n in names:
        text = (HERE / "results" / f"{n}.md").read_text()
        parts += ["\n".join("#" + ln if ln.startswith("#") else ln for ln in text.splitlines()), ""]  # one level down
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(parts))
    return out


def main() -> None:
    args = sys.argv[1:]
    if args != ["--collect"]:
        for n in args or scripts():
            script = HERE / f"bench_{n}.py"
            if script.is_file():
                print(f"== {script.name}", flush=True)
                subprocess.run([sys.executable, str(script)], check=False)
    print(collect())


if __name__ == "__main__":
    main()

"""The run manifest's cost per slide as a batch grows (encode, tile and nuclei jobs write one entry per slide).

Two policies, side by side in one run, each in the same process on a fresh folder, the same entries:

* ``rewrite every update`` (gigaslide before the journal): every ``Manifest.set`` merges and rewrites the whole
  ``manifest.json`` (emulated with ``REWRITE_SHARE`` so large that every update is due);
* ``journal`` (now): every update appends one line to the journal, ``manifest.json`` is rewritten at most
  ``REWRITE_SHARE`` of the wall time, and ``flush()`` merges the rest at the end (counted in the total).

Updates run back to back with nothing between them (the worst case for the throttled rewrite; in a real job
each slide takes seconds and the journal's share is smaller still). Per-update ms = median over the last 10 %
of the updates (the cost at that batch size); total = all updates plus the final flush. The result is checked:
both folders' manifests hold the same entries.

    .venv/bin/python benchmarks/bench_manifest.py [--sizes 1000,2000,4000]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import load_note, write_result  # noqa: E402

from gigaslide.features import manifest as mf  # noqa: E402

INFO = dict(path="/data/slides/TCGA-XX-0000-01Z-00-DX1.svs", tiles=4321, seconds=12.345,
            precision={"requested": "auto", "resolved": "bf16", "bf16_cosine": 0.99999}, read_mpp=0.5, reader="direct",
            rank=0, stain=None, background="bright", stain_warning=None)  # the fields encode records per slide


def run(n: int, share: float, folder: Path) -> dict:
    old = mf.REWRITE_SHARE
    mf.REWRITE_SHARE = share
    try:
        m = mf.Manifest(folder / "manifest.json", {"command": "bench"})
        per: list[float] = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            m.set(f"slide-{i:06d}", "done", **INFO)
            per.append(time.perf_counter() - t)
        m.flush()
        total = time.perf_counter() - t0
    finally:
        mf.REWRITE_SHARE = old
    slides = json.loads((folder / "manifest.json").read_text())["slides"]
    return {"n": n, "per_update_ms": 1e3 * statistics.median(per[-max(1, n // 10):]), "total_s": total,
            "bytes": (folder / "manifest.json").stat().st_size, "slides": slides}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,2000,4000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="gs-bench-manifest-"))
    for n in sizes:
        every = run(n, 1e12, work / f"every-{n}")
        journal = run(n, mf.REWRITE_SHARE, work / f"journal-{n}")
        same = every["slides"].keys() == journal["slides"].keys() and all(
            {k: v for k, v in every["slides"][s].items() if k != "time"} == {k: v for k, v in journal["slides"][s].items() if k != "time"}
            for s in every["slides"])
        rows.append((n, every, journal, same))
        print(n, round(every["total_s"], 2), round(journal["total_s"], 3), same, flush=True)
    lines = ["# Run manifest: cost per slide as the batch grows", "",
             "Every `encode`, `tile` and `nuclei` job records each slide in `manifest.json` (status, error, timing). "
             "Two policies on the same entries, side by side in one run (`benchmarks/bench_manifest.py`): **rewrite every "
             "update** (gigaslide before this change: each slide's update re-read, merged and rewrote the whole file) and "
             f"**journal** (each update appends one JSON line to `.manifest.json.journal`; `manifest.json` is rewritten at most "
             f"{mf.REWRITE_SHARE:.0%} of the wall time and merged at the end by `flush()`, which the total includes). Updates run "
             "back to back with nothing between them. Per-update ms = median over the last 10 % of the updates (the cost at "
             f"that batch size). Load: {load_note()}.", "",
             "| slides | rewrite every update: ms per update | journal: ms per update | rewrite every update: total s | "
             "journal: total s (flush included) | speed-up of the total | manifest.json MB | same entries |",
             "|---|---|---|---|---|---|---|---|"]
    for n, e, j, same in rows:
        lines.append(f"| {n} | {e['per_update_ms']:.2f} | {j['per_update_ms']:.3f} | {e['total_s']:.2f} | {j['total_s']:.3f} | "
                     f"×{e['total_s'] / j['total_s']:.0f} | {j['bytes'] / 1e6:.2f} | {'yes' if same else 'NO'} |")
    n, e, j, _ = rows[-1]
    n0, e0, j0, _ = rows[0]
    growth = e["per_update_ms"] / e0["per_update_ms"]
    exp_every = math.log(e["total_s"] / e0["total_s"]) / math.log(n / n0) if n > n0 else float("nan")
    exp_journal = math.log(j["total_s"] / j0["total_s"]) / math.log(n / n0) if n > n0 else float("nan")
    lines += ["", "Verdicts (computed from the rows above):", "",
              f"- rewrite every update: one update costs ×{growth:.1f} more at {n} slides than at {n0}; the batch's total "
              f"grows as slides^{exp_every:.1f} (journal: slides^{exp_journal:.1f}).",
              f"- journal: {j['per_update_ms']:.3f} ms per update at {n} slides, ×{e['per_update_ms'] / j['per_update_ms']:.0f} "
              f"less than rewriting; the whole batch's manifest work {j['total_s']:.2f} s vs {e['total_s']:.1f} s.",
              f"- both policies leave the same entries: {'yes' if all(r[3] for r in rows) else 'NO'}."]
    write_result("manifest", "\n".join(lines))


if __name__ == "__main__":
    main()

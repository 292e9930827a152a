"""The run manifest's cost per slide as a batch grows (encode, tile and nuclei jobs write one entry per slide), and
the cost of a re-run's check of each finished slide (full read vs the stamp the manifest recorded).

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

import numpy as np

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


def resume_rows(work: Path, tiles: list[int], files: int = 10, dim: int = 1024) -> list[tuple[int, float, float, bool]]:
    """Per finished slide, the skip check of a re-run: the whole file read with its checksums verified (any file
    without a matching stamp) vs the stamp encode recorded + the attributes alone. Files just written, so both
    read from the page cache (a cold disk makes the full read slower still)."""
    from gigaslide.encoders import build_encoder
    from gigaslide.features import store
    from gigaslide.features.extract import file_stamp, is_finished
    from gigaslide.tiling import GRID_RULE, TilingParams

    enc = build_encoder("test_resnet", "random", seed=0)
    params = TilingParams(0.5, 224, 0, 0.25)
    attrs = {"encoder": enc.spec.name, "encoder_weights_sha256": enc.weights_id, "mpp": params.mpp,  # what is_finished compares
             "tile_size": params.tile_size, "overlap": params.overlap, "min_tissue": params.min_tissue,
             "background_option": params.background, "grid_rule": GRID_RULE}
    rows = []
    rng = np.random.default_rng(0)
    for n in tiles:
        paths = []
        for i in range(files):
            p = work / f"resume-{n}-{i}.h5"
            store.save(p, rng.random((n, dim), dtype=np.float32), np.zeros((n, 2), np.int64), attrs=attrs)
            paths.append(p)
        stamps = [file_stamp(p) for p in paths]
        t = time.perf_counter()
        full = [is_finished(p, enc, params) for p in paths]
        t_full = (time.perf_counter() - t) / files
        t = time.perf_counter()
        quick = [is_finished(p, enc, params, stamp=s) for p, s in zip(paths, stamps)]
        t_quick = (time.perf_counter() - t) / files
        rows.append((n, 1e3 * t_full, 1e3 * t_quick, all(full) and all(quick)))
        for p in paths:
            p.unlink()
    return rows


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
    resume = resume_rows(work, [2000, 10000])
    lines += ["", "## A re-run's check of each finished slide", "",
              "`encode` skips a finished slide after checking its feature file. A file whose size and mtime still match the "
              "stamp encode recorded in the manifest when it wrote it is checked by its attributes alone; any other file "
              "(no stamp, or changed since) is read in full with its checksums verified, so a damaged one is encoded again. "
              "Per file, mean of 10 files of random 1024-d fp32 features, just written (page cache warm):", "",
              "| tiles per slide | full read + checksums ms | stamp + attributes ms | both say finished |", "|---|---|---|---|"]
    for n, full, quick, ok in resume:
        lines.append(f"| {n} | {full:.1f} | {quick:.2f} | {'yes' if ok else 'NO'} |")
    n, full, quick, _ = resume[-1]
    lines += ["", f"- at {n} tiles per slide a re-run checks a finished slide ×{full / quick:.0f} faster with the stamp "
              f"({full:.1f} ms → {quick:.2f} ms; 10,000 finished slides: {10 * full:.0f} s → {10 * quick:.0f} s)."]
    write_result("manifest", "\n".join(lines))


if __name__ == "__main__":
    main()

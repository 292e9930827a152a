"""benchmarks/bench_downsample.py: both modes read the same tiles, and the report's verdicts come from its rows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_downsample as bd  # noqa: E402

from gigaslide.slides.writer import write_pyramidal_tiff  # noqa: E402
from gigaslide.testing import tissue_fn  # noqa: E402


def test_rows_and_verdicts(tmp_path):
    p = write_pyramidal_tiff(tmp_path / "one.tiff", 1024, 1024, tissue_fn(1024, 1024, 2), mpp=0.25, min_level_size=10**9)
    row = bd.measure(p, 0.5, repeats=2)
    assert row["k"] == 2 and row["used"] == "dct" and row["tiles"] == 4  # 448-px steps over 1024 px: 2 x 2
    assert row["decoded"][0] == row["decoded"][1] == 16  # every stored 256² tile, once, in each mode
    assert 0 < row["mean"] < 1 and row["max"] >= row["p99"]
    assert row["off_grid"] == 0 and row["mean_on"] == row["mean"]  # 448-px strides: every corner on the 1/2 grid
    box = dict(row, slide="fixed.tiff", speedup=0.8, speedups=[0.8, 0.8])  # a row where DCT was slower
    text = bd.report([row, box], 2)
    assert "| one.tiff | 0.5 | /2 | 4 |" in text
    n_faster = sum(r["speedup"] > 1 for r in (row, box))
    assert f"faster than box averaging on {n_faster} of 2 rows" in text
    lo = float(re.search(r"mean \|Δ\| ([0-9.]+)-", text).group(1))
    assert abs(lo - row["mean"]) < 0.006

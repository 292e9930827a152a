"""benchmarks/bench_streaming.py: sizes measured by separate invocations (hours each) make one table, each row
with the command that measured it, and a re-measured configuration replaces its old row."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_streaming  # noqa: E402


def _row(mode: str, size: int, pool: int, rss: float, **kw) -> dict:  # noqa: ANN003
    return {"mode": mode, "size": size, "tile": 2048 if mode == "stream" else size, "pool": pool, "peak_rss_gb": rss, **kw}


def test_rows_of_other_invocations_are_kept_and_the_same_configuration_replaced() -> None:
    stored = [_row("stream", 8192, 1, 2.6, command="A"), _row("stream", 4096, 8, 2.2, command="A"),
              _row("dense", 4096, 8, 7.6, command="A"), _row("stream", 8192, 8, 9.9, command="A")]
    new = [_row("stream", 16384, 8, 2.5), _row("stream", 8192, 8, 2.4)]
    rows = bench_streaming.merge_rows(stored, new, "B")
    got = [(r["size"], r["mode"], r["pool"], r["peak_rss_gb"], r["command"]) for r in rows]
    assert got == [(4096, "stream", 8, 2.2, "A"), (4096, "dense", 8, 7.6, "A"), (8192, "stream", 8, 2.4, "B"),
                   (8192, "stream", 1, 2.6, "A"), (16384, "stream", 8, 2.5, "B")]


def test_a_stream_run_and_a_dense_run_of_one_size_are_different_configurations() -> None:
    rows = bench_streaming.merge_rows([_row("dense", 2048, 8, 2.9, command="A")], [_row("stream", 2048, 8, 1.7)], "B")
    assert [(r["mode"], r["command"]) for r in rows] == [("stream", "B"), ("dense", "A")]

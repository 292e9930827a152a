"""bench_tile_precision: its verdict rule, and the code's bf16 choices against the measured rows it keeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_tile_precision  # noqa: E402

from gigaslide.ssl.tile.methods import SSL_METHODS  # noqa: E402


def _row(ci_low: float, finite: bool = True) -> dict:
    return {"diff": {"linear_balanced_accuracy": {"ci_low": ci_low}}, "bf16": {"finite": finite}}


def test_bf16_counts_as_good_only_above_the_margin_and_with_a_finite_loss() -> None:
    assert bench_tile_precision.bf16_as_good(_row(-0.009))
    assert not bench_tile_precision.bf16_as_good(_row(-0.011))
    assert not bench_tile_precision.bf16_as_good(_row(-0.010))  # the margin itself is not above it
    assert not bench_tile_precision.bf16_as_good(_row(+0.02, finite=False))


def test_the_methods_auto_trains_in_bf16_are_exactly_those_measured_as_good_in_it() -> None:
    """``pretrain --precision auto`` trains a method in bf16 on CPU iff it has a ``cpu_bf16_basis``; that must be
    what the saved measurement says, so a re-measured verdict and the code cannot drift apart."""
    rows = json.loads(bench_tile_precision.JSON.read_text())["rows"]
    measured = {r["method"]: bench_tile_precision.bf16_as_good(r) for r in rows}
    with_basis = {name for name in SSL_METHODS.names() if SSL_METHODS.get(name).cpu_bf16_basis}
    assert with_basis <= set(measured), "a bf16 basis without a measured row"
    assert with_basis == {m for m, good in measured.items() if good}

"""bench_encoder_leaderboard: its verdict lines are computed from the paired rows, per level and metric."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_encoder_leaderboard  # noqa: E402


def _d(diff: float, lo: float, hi: float) -> dict:
    return {"diff": diff, "ci_low": lo, "ci_high": hi}


def test_each_paired_row_gets_its_own_computed_verdict() -> None:
    paired = {"runs/x/encoder: tile linear": {"balanced_accuracy": _d(0.036, 0.018, 0.053),
                                              "auc": _d(0.052, 0.038, 0.065)},
              "runs/x/encoder: slide abmil": {"balanced_accuracy": _d(-0.01, -0.05, 0.03),
                                              "auc": _d(-0.08, -0.12, -0.01)}}
    lines = bench_encoder_leaderboard.verdict_lines(paired, "runs/x/encoder@random")
    assert lines[0] == ("- tile linear: `runs/x/encoder` vs `runs/x/encoder@random`: balanced accuracy better "
                        "(+0.036 [+0.018, +0.053]); AUC better (+0.052 [+0.038, +0.065])")
    assert "balanced accuracy not distinguishable" in lines[1] and "AUC worse (-0.080" in lines[1]
    assert lines[1].startswith("- slide abmil: `runs/x/encoder`")


def test_the_summary_counts_verdicts_per_level_and_metric() -> None:
    paired = {f"e{k}: slide abmil": {"balanced_accuracy": _d(0.1, lo, 0.2), "auc": _d(0.1, 0.01, 0.2)}
              for k, lo in enumerate((0.01, -0.01, 0.02))}
    paired["e0: tile linear"] = {"balanced_accuracy": _d(-0.1, -0.2, -0.05), "auc": _d(0.0, -0.1, 0.1)}
    lines = bench_encoder_leaderboard.summary_lines(paired)
    assert lines == ["- slide abmil, 3 encoder(s) vs the first: balanced accuracy: better 2, not distinguishable 1; "
                     "AUC: better 3",
                     "- tile linear, 1 encoder(s) vs the first: balanced accuracy: worse 1; AUC: not distinguishable 1"]

"""The context-task reference's contiguity score (benchmarks/bench_slide_context.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_slide_context")


def test_contiguity_known_values():
    row = np.array([[0, 0], [96, 0], [192, 0]])
    # tile 0's one neighbour is tumour (1), tile 1's two average 0.5; tumour-weighted mean 0.75 minus the mean 2/3
    assert bench.contiguity(row, np.array([1.0, 1.0, 0.0]), 96) == pytest.approx(0.75 - 2 / 3)
    assert bench.contiguity(row, np.zeros(3), 96) == 0.0


def test_one_region_scores_above_the_same_tumour_scattered():
    g = np.array([(x, y) for y in range(8) for x in range(8)]) * 96
    block = ((g[:, 0] < 3 * 96) & (g[:, 1] < 3 * 96)).astype(float)  # 9 tumour tiles in one 3x3 region
    scattered = np.zeros(64)
    scattered[[0, 3, 6, 17, 20, 23, 41, 44, 47]] = 1  # 9 tumour tiles, none touching another
    assert block.sum() == scattered.sum()
    assert bench.contiguity(g, scattered, 96) < 0 < bench.contiguity(g, block, 96)

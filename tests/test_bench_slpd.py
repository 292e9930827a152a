"""benchmarks/bench_slpd.py: the cohorts it builds and the verdicts it computes from its rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_slpd")


def test_cohort_regions_have_the_planned_shape(tmp_path):
    from gigaslide.features import store
    from gigaslide.ssl.slide.regions import regions_of

    nbytes = bench.make_cohort(tmp_path, 2, 4, 10, (2, 2))
    ff = store.load(tmp_path / "s000.h5")
    assert ff.features.dtype == np.float16 and nbytes == 2 * 10 * bench.DIM * 2
    regs = regions_of(ff, 4 * bench.TILE, 0.5)
    assert regs.grid == 4 and sum(len(m) for m in regs.members) == 10 and len(regs) <= 4


def _hist(d):
    return [{"dino": d, "intra": None, "inter": None}, {"dino": 6.0, "intra": 5.0 + d, "inter": 4.0}]


def test_verdicts_come_from_the_rows():
    runs = {True: [{"seconds": 10.0, "regions": 7, "history": _hist(1.0)}, {"seconds": 12.0, "regions": 7, "history": _hist(1.0)}],
            False: [{"seconds": 30.0, "regions": 7, "history": _hist(1.0 + 2e-3)}, {"seconds": 20.0, "regions": 7, "history": _hist(1.0)}]}
    row = {"cohort": "c", "slides": 3, "side": 4, "tissue": None, "features_gb": 0.001, "start_above_gb": 0.1, "runs": runs}
    mem = {"slides": 2, "tiles": 5, "dim": 4, "features_gb": 0.5, "start_above_gb": 0.6}
    text = bench.render([row], argparse.Namespace(epochs=2, rounds=2), mem)
    assert "| c | 3 | 7 | 16 | 0.001 | 0.10 | 25.0 | 11.0 | ×2.27 | 2.0e-03 |" in text
    assert "×2.27 as fast; the loss histories DIFFER (largest difference 2.0e-03" in text
    assert "| 0.50 | 0.60 | 1.20 |" in text and "start-up holds 1.20× the float16 features" in text

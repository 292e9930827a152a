"""benchmarks/bench_slide_pretrain_speed.py: the data it builds, its reference of the former sparse convolution,
and the verdicts it computes from its rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_slide_pretrain_speed")


def test_cohort_regions_have_the_planned_shape(tmp_path):
    from gigaslide.features import store
    from gigaslide.ssl.slide.regions import regions_of

    nbytes = bench.make_cohort(tmp_path, 2, 4, 10, (2, 2))
    ff = store.load(tmp_path / "s000.h5")
    assert ff.features.dtype == np.float16 and nbytes == 2 * 10 * bench.DIM * 2
    regs = regions_of(ff, 4 * bench.TILE, 0.5)
    assert regs.grid == 4 and sum(len(m) for m in regs.members) == 10 and len(regs) <= 4


def test_cache_trains_and_the_former_convolution_matches_the_current_one(tmp_path):
    from gigaslide.ssl.slide.sparse import SubmanifoldConv2d, neighbour_index

    bench.make_cache(tmp_path / "cache", 4, 3, 5, 12)
    res = bench.train("gigassl", tmp_path / "cache", tmp_path / "run", 2, True)
    assert len(res["losses"]) == 2 and all(np.isfinite(v) for e in res["losses"] for v in e)
    torch.manual_seed(0)
    conv = SubmanifoldConv2d(6, 5, 3)
    pos = torch.tensor([[0, 0], [1, 0], [3, 3], [0, 1], [2, 2]])
    nbr = neighbour_index(pos, torch.tensor([0, 0, 0, 1, 1]), 3)
    x = torch.randn(5, 6)
    torch.testing.assert_close(bench.gather_forward(conv, x, nbr), conv(x, nbr))


def _runs(current_s, former_s, former_loss):
    return {True: [{"seconds": s, "losses": [[1.0], [6.0, 5.0]], "regions": 7} for s in current_s],
            False: [{"seconds": s, "losses": [[1.0], [6.0, 5.0 + former_loss]], "regions": 7} for s in former_s]}


def test_verdicts_come_from_the_rows():
    row = {"method": "SLPD", "cohort": "c", "change": "x", "epochs": 2, "runs": _runs([10.0, 12.0, 11.0], [30.0, 20.0, 25.0], 2e-3)}
    mem = {"slides": 2, "tiles": 5, "dim": 4, "features_gb": 0.5, "start_above_gb": 0.6}
    text = bench.render([row], argparse.Namespace(rounds=3), mem)
    assert "| SLPD | c | x | 2 | 25.0 | 11.0 | ×2.27 | 2.0e-03 |" in text
    assert "×2.27 as fast; the loss histories DIFFER (largest difference 2.0e-03" in text
    assert "| 0.50 | 0.60 | 1.20 |" in text and "start-up holds 1.20× the float16 features" in text

"""Parsing of bench_slide_ssl's SLPD variants (the full SLPD pre-trained again with one setting changed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_slide_ssl as bench  # noqa: E402


def test_slpd_variants_name_rows_folders_and_overrides() -> None:
    got = bench.slpd_variants(" seed=1, epochs=8,prototypes=4")
    assert got == [("SLPD +intra+inter (seed 1)", "_seed1", {"seed": 1}),
                   ("SLPD +intra+inter (8 epochs)", "_epochs8", {"epochs": 8}),
                   ("SLPD +intra+inter (k = 4)", "_prototypes4", {"prototypes": 4})]
    assert bench.slpd_variants("") == []
    for bad in ("lr=0.1", "seed=x", "seed", "prototypes=1"):
        with pytest.raises(SystemExit, match="slpd-variants"):
            bench.slpd_variants(bad)


def test_the_slpd_claim_names_a_collapsed_run() -> None:
    assert bench.collapse_caveat({"SLPD DINO only": None, "SLPD +intra+inter": None, "SLPD +intra": "uniform"}) == ""
    got = bench.collapse_caveat({"SLPD DINO only": None, "SLPD +intra+inter": "uniform"})
    assert "SLPD +intra+inter (uniform) ended collapsed" in got and "DINO only" not in got

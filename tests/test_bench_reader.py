"""benchmarks/bench_reader.py: the decode limit counts exactly the stored tiles our reader decodes, and a peer
that did not run gets its reason in every cell, never a number."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_reader as br  # noqa: E402

from gigaslide.slides import Slide, TileReader  # noqa: E402
from gigaslide.testing import make_slide  # noqa: E402


def test_touched_tiles_are_the_tiles_the_reader_decodes(tmp_path: Path) -> None:
    path = make_slide(tmp_path / "s.tiff", (1500, 1100), mpp=0.5, seed=3)
    coords = np.array([[0, 0], [224, 0], [37, 500], [1300, 900], [1400, 1000]])  # unaligned, and past the edge
    with Slide(path) as s:
        r = TileReader(s, br.TILE, br.MPP)
        assert r.direct
        touched = br.touched_tiles(r, coords)
        for x, y in coords:
            r.read(x, y)
        assert len(touched) == len(set(touched)) == r.decoded_tiles
        page = r.tiff_level.page.index
    assert br.decode_limit(path, page, touched, len(coords), 1) > 0
    assert br.decode_limit(path, page, touched, len(coords), 2) > 0


def test_a_peer_that_did_not_run_has_its_reason_not_a_number() -> None:
    pair = ([100.0, 110.0], [1.0, 1.0])
    tile = [{"seconds": 0.2, "tiles": 5, "peak_rss_mb": 100.0, "import_rss_mb": 60.0}]
    res = {
        "coords": 5, "stored": 9, "raw": [900.0], "limit": {1: [500.0, 520.0], 2: [900.0, 950.0]},
        "read": {p: {"ours": ([400.0, 420.0], [1.0, 1.0]), "openslide": pair, "plain": pair, "hs2p": pair,
                     "tiatoolbox": ([], [])} for p in (1, 2)},
        "tile": {"gigaslide": tile, "hs2p": tile, "tiatoolbox": []},
        "check": {"gigaslide": (0, 4), "hs2p": (0, 4)},
        "rss": {("gigaslide", 1): 150.0, ("gigaslide", 2): 160.0, ("hs2p", 1): 140.0, ("hs2p", 2): 200.0},
        "failed": {("tiatoolbox", "tile"): "ImportError: no torch", ("tiatoolbox", 1): "ImportError: no torch",
                   ("tiatoolbox", 2): "ImportError: no torch"},
    }
    reading, tiling, verdicts = br.report(Path("x.svs"), res, ["hs2p", "tiatoolbox"])
    assert all("| not run: ImportError: no torch |" in row for row in reading)
    tia = next(row for row in tiling if "TIAToolbox" in row)
    assert tia.count("not run: ImportError: no torch") == 4 and "—" in tia
    assert "3.91x the best peer (plain OpenSlide)" in verdicts[0]  # median of 400 / 100 and 420 / 110
    _, _, verdicts = br.report(Path("gen20k.tiff"), res, ["hs2p", "tiatoolbox"])
    assert verdicts[-1] == ("gen20k.tiff: gigaslide seg + tiling 0.20 s at 100 MB peak RSS — goal ≤ 0.5 s and "
                            "≤ 300 MB met")

"""The shared MoNuSeg images: XML read safely, rasterised, split by organ."""

from __future__ import annotations

import pytest

from gigaslide.nuclei.data import find_pairs, load_item, make_split, read_organs
from gigaslide.testing import shared_data_dir

DATA = shared_data_dir()
MON = DATA / "nuclei" / "monuseg2018-test" if DATA else None

pytestmark = pytest.mark.realdata


@pytest.mark.skipif(MON is None or not MON.is_dir(), reason="shared MoNuSeg data absent")
def test_monuseg_pairs_rasterise_and_split() -> None:
    pairs, problems = find_pairs(MON / "images", MON / "annotations")
    assert len(pairs) == 10 and problems == []
    organs = read_organs(MON / "images")
    assert len(organs) == 10 and len(set(organs.values())) == 7
    p = next(q for q in pairs if q.id == "TCGA-2Z-A9J9-01A-01-TS1")
    from gigaslide.nuclei.annotations import read_annotation

    ann = read_annotation(p.annotation, (1000, 1000))
    n = ann.notes
    assert n["polygons"] == 575 and ann.mpp == pytest.approx(0.2527)
    assert ann.count == 575 - n["dropped_degenerate"] - n["dropped_outside"] - n.get("dropped_overlapped", 0)
    assert ann.count > 550
    item = load_item(p, 0.25)
    assert item.image.shape == (1011, 1011, 3) and item.inst_orig.shape == (1000, 1000)
    split = make_split([q.id for q in pairs], organs, seed=0)
    test = [i for i, s in split.items() if s == "test"]
    assert len(test) == 3 and len({organs[i] for i in test}) == 3

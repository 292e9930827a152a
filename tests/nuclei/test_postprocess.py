"""Watershed post-processing separates touching nuclei from ideal NP / HV maps."""

from __future__ import annotations

import numpy as np

from gigaslide.nuclei import metrics as M
from gigaslide.nuclei.data import hv_maps
from gigaslide.nuclei.postprocess import PostParams, instance_types, instances


def _touching_pair() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    inst = np.zeros((48, 64), np.int32)
    inst[(xx - 22) ** 2 + (yy - 24) ** 2 <= 81] = 1
    inst[((xx - 39) ** 2 + (yy - 24) ** 2 <= 81) & (inst == 0)] = 2  # touches the first
    inst[(xx - 55) ** 2 + (yy - 8) ** 2 <= 9] = 3
    return inst


def test_touching_nuclei_are_split_by_the_hv_maps() -> None:
    gt = _touching_pair()
    assert len(np.unique(gt[gt > 0])) == 3
    pred = instances((gt > 0).astype(np.float32), hv_maps(gt))
    st = M.image_stats(gt, pred)
    assert (st.tp, st.fp, st.fn) == (3, 0, 0)
    assert M.per_image(st)["pq"] > 0.8
    # without HV information (flat maps) the touching pair stays merged
    merged = instances((gt > 0).astype(np.float32), np.zeros((2,) + gt.shape, np.float32))
    assert len(np.unique(merged[merged > 0])) == 2


def test_small_objects_and_empty_maps() -> None:
    p = np.zeros((20, 20), np.float32)
    assert instances(p, np.zeros((2, 20, 20), np.float32)).max() == 0
    p[2:4, 2:4] = 1.0  # 4 px < min_size 10
    assert instances(p, np.zeros((2, 20, 20), np.float32), PostParams(min_size=10)).max() == 0


def test_instance_types_majority_vote() -> None:
    inst = np.zeros((6, 6), np.int32)
    inst[0:3, 0:3] = 1
    nc = np.zeros((3, 6, 6), np.float32)
    nc[0] = 1.0
    nc[:, 0:3, 0:3] = 0.0
    nc[2, 0:3, 0:3] = 0.9
    nc[1, 0, 0:3] = 1.0  # one row votes for type 1, two rows for type 2
    nc[2, 0, 0:3] = 0.0
    t, prob = instance_types(inst, nc)[1]
    assert t == 2 and abs(prob - 0.6) < 1e-6

"""Round 8 (mutation testing): fine-tuning's class weights against scikit-learn's balanced weights, and its lr
schedule (linear warm-up, then a cosine to 0) at worked-out steps. The test tiles of the other fine-tune tests are
balanced, where any class weighting gives weights of 1."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from gigaslide.ssl.tile.finetune import _lr_factor, class_weights


def test_class_weights_are_sklearns_balanced_weights_and_zero_for_an_absent_class():
    y = np.array([0] * 6 + [1] * 2 + [2] * 1)
    want = compute_class_weight("balanced", classes=np.arange(3), y=y)  # n / (C * count): 0.5, 1.5, 3
    np.testing.assert_allclose(class_weights(y, 3).numpy(), want, rtol=1e-6)
    y2 = np.array([0, 0, 0, 2])  # class 1 is missing from this label fraction's training tiles
    w = class_weights(y2, 3).numpy()
    np.testing.assert_allclose(w[[0, 2]], compute_class_weight("balanced", classes=np.array([0, 2]), y=y2) * 2 / 3,
                               rtol=1e-6)  # sklearn's C is 2 here, ours 3: n / (3 * count)
    assert w[1] == 0.0


@pytest.mark.parametrize(("step", "want"), [
    (0, 0.1), (4, 0.5), (9, 1.0),  # warm-up over 10 steps: (step + 1) / 10
    (10, 1.0), (50, 0.5), (90, 0.0),  # cosine from 1 at step 10 to 0 at step 90 (halfway at 50)
    (30, 0.853553)])  # a quarter of the cosine: (1 + cos(pi / 4)) / 2 -- a straight line would give 0.75
def test_finetune_lr_warms_up_then_follows_a_cosine_to_zero(step, want):
    assert _lr_factor(step, 90, 10) == pytest.approx(want, abs=1e-6)

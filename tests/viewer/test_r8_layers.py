"""Round 8 (lens U): a MIL run's overlay colours checked against the model's own outputs, not the viewer's values."""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy.stats import rankdata

from gigaslide.features import store
from gigaslide.mil.train import load_model, predict
from gigaslide.viewer import ViewerState, build_app
from gigaslide.viewer.overlays import lut


def _colours(c, layer: str, query: str) -> np.ndarray:  # noqa: ANN001
    """Slide s2's whole overlay at level-0 resolution, RGBA."""
    return sys.modules["gigaslide_tiny_project"].overlay_screen(c, "s2", layer, query)


def test_attention_layer_is_the_attention_percentile_and_prob_layer_the_tile_alone(tiny):
    """Each tile of the attention layer has the colour of its attention's percentile within the slide (CLAM's display:
    rank - 1 over n - 1, from the held-out fold's model), the probability layer that of P(class 1) of the tile alone
    (the model on a one-tile bag), the other fold's model when asked for; computed here from the models themselves."""
    from fastapi.testclient import TestClient

    ff = store.load(tiny.out / "features" / "s2.h5")
    c = TestClient(build_app(ViewerState([tiny.out], [tiny.run])))
    held = {lay["id"]: lay for lay in c.get("/api/slides/s2").json()["layers"]}["run0-attention"]["fold"]
    other = "fold0" if held == "fold1" else "fold1"
    bag = torch.from_numpy(ff.features)
    _, scores = predict(load_model(tiny.run / held)[0], [bag])
    pct = (rankdata(np.asarray(scores[0], np.float64)) - 1) / (len(ff) - 1)
    alone, _ = predict(load_model(tiny.run / other)[0], [bag[i:i + 1] for i in range(len(ff))])
    att, prob = _colours(c, "run0-attention", "?cmap=jet"), _colours(c, "run0-prob1", f"?cmap=magma&fold={other}")
    jet, magma = lut("jet"), lut("magma")
    for i, (x, y) in enumerate(ff.coords.astype(int) + 32):  # tile centres (64 px tiles)
        np.testing.assert_array_equal(att[y, x], [*jet[int(pct[i] * 255)], 255], err_msg=str(i))
        want = magma[int(np.clip(alone[i, 1] * 255, 0, 255))]
        np.testing.assert_array_equal(prob[y, x], [*want, 255], err_msg=str(i))

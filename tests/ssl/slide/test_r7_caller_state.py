"""Round 7, the Python API: slide-SSL calls from a notebook leave the caller's random streams as they were.

``pretrain_gigassl`` / ``pretrain_slpd`` reset torch's global generator to the run's seed (``torch.manual_seed``), a
resumed run set the Python, NumPy and torch generators to the checkpoint's, and ``embed_slides`` / ``tile_clusters`` /
``build_augment_cache`` drew from torch's generator building their models: every later ``torch.rand`` /
``np.random.rand`` of the caller changed (or repeated the same numbers after each call)."""
import random

import numpy as np
import pytest
import sklearn.cluster  # noqa: F401  (its first import draws from Python's generator: rich's, not ours)
import torch

from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.gigassl import pretrain_gigassl
from gigaslide.ssl.slide.slpd import pretrain_slpd

QUIET = dict(log=lambda *a: None, device="cpu")
GSSL = dict(out_dim=8, hidden=8, proj_dim=4, tiles_per_step=4, **QUIET)
SLPD = dict(region_size=256, prototypes=1, dim=16, heads=2, depth=1, head_dim=16, batch_size=8, warmup=1, **QUIET)


def _draws():  # noqa: ANN202
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _expected(seed: int = 123):  # noqa: ANN202
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return _draws()


def _after(call, seed: int = 123):  # noqa: ANN001, ANN202
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    call()
    return _draws()


def test_pretraining_and_embedding_leave_the_callers_streams(tmp_path, make_fake_cache):
    cache = make_fake_cache(tmp_path / "cache", n_slides=4)
    want = _expected()
    assert _after(lambda: pretrain_gigassl(cache, tmp_path / "g", epochs=1, **GSSL)) == want
    assert _after(lambda: pretrain_slpd(cache, tmp_path / "s", epochs=2, **SLPD)) == want
    assert _after(lambda: embed_slides(tmp_path / "g", cache, tmp_path / "g.h5", ensemble=2, device="cpu")) == want
    assert _after(lambda: embed_slides(tmp_path / "s", cache, tmp_path / "s.h5", device="cpu")) == want


def test_a_resumed_run_leaves_the_callers_streams_and_trains_as_before(tmp_path, make_fake_cache):
    """The resume path set every global generator to the checkpoint's; the run itself is unchanged (bit-exact)."""
    cache = make_fake_cache(tmp_path / "cache", n_slides=4)
    want = _expected()
    whole = pretrain_slpd(cache, tmp_path / "whole", epochs=3, **SLPD)
    pretrain_slpd(cache, tmp_path / "parts", epochs=3, stop_after=1, **SLPD)
    parts = {}
    assert _after(lambda: parts.update(pretrain_slpd(cache, tmp_path / "parts", epochs=3, **SLPD))) == want
    assert parts["history"] == [{**h, "seconds": p["seconds"]} for h, p in zip(whole["history"], parts["history"])]
    g_whole = pretrain_gigassl(cache, tmp_path / "gw", epochs=2, **GSSL)
    pretrain_gigassl(cache, tmp_path / "gp", epochs=2, stop_after_steps=1, **GSSL)
    g_parts = {}
    assert _after(lambda: g_parts.update(pretrain_gigassl(cache, tmp_path / "gp", epochs=2, **GSSL))) == want
    assert [h["loss"] for h in g_parts["history"]] == [h["loss"] for h in g_whole["history"]]


def test_the_run_does_not_depend_on_the_callers_streams(tmp_path, make_fake_cache):
    """Isolation must not make the run follow the caller: two calls after other global seeds give the same weights."""
    from safetensors.numpy import load_file

    cache = make_fake_cache(tmp_path / "cache", n_slides=4)
    for name, seed in (("a", 1), ("b", 2)):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        pretrain_slpd(cache, tmp_path / name, epochs=2, **SLPD)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["slpd", "gigassl"])
def test_tile_clusters_leave_the_callers_streams(tmp_path, make_fake_cache, method):
    from gigaslide.features import store
    from gigaslide.ssl.slide.assign import tile_clusters

    cache = make_fake_cache(tmp_path / "cache", n_slides=4, n_tiles=64)
    run = tmp_path / method
    if method == "slpd":
        pretrain_slpd(cache, run, epochs=1, **{**SLPD, "region_size": 128})
    else:
        pretrain_gigassl(cache, run, epochs=1, **GSSL)
    ff = store.load(cache / "features" / "slide0.h5")
    want = _expected()
    assert _after(lambda: tile_clusters(run, ff)) == want


def test_augment_cache_leaves_the_callers_streams(tmp_path):
    from gigaslide.ssl.slide.cache import build_augment_cache
    from gigaslide.testing import make_slide

    slide = make_slide(tmp_path / "s0.tiff", (640, 448), mpp=2.0, seed=0)
    kw = dict(encoder="test_resnet", weights="random", views=2, tiles_per_view=4, mpp=2.0, tile_size=32,
              log=lambda *a: None, device="cpu")
    want = _expected()
    assert _after(lambda: build_augment_cache([str(slide)], tmp_path / "c", **kw)) == want

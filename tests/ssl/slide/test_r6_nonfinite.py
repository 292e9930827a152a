"""Round 6, degenerate numbers: NaN / inf features never reach a cache, a training run or an embeddings file without
one line naming the file (before: a NaN embedding written without a word, a run stopped at "loss became nan" with the
advice to lower --lr, an augment cache written with NaN views)."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.gigassl import pretrain_gigassl
from gigaslide.ssl.slide.slpd import pretrain_slpd
from gigaslide.ssl.slide.views import load_cache

GIGA = dict(epochs=1, tiles_per_step=4, hidden=8, out_dim=8, device="cpu", log=lambda *a: None)
SLPD = dict(region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
            head_dim=32, n_local=2, epochs=1, device="cpu", log=lambda *a: None)


def _poison(path: Path, key: str, rows, value: float = np.nan) -> None:
    with h5py.File(path, "r+") as f:
        x = f[key][:]
        x[rows] = value
        del f[key]
        f.create_dataset(key, data=x)


@pytest.mark.parametrize("method", ["gigassl", "slpd"])
def test_embed_refuses_a_slide_with_a_nan_tile_and_writes_nothing(tmp_path, make_fake_cache, method):
    """One NaN tile of one slide: that slide's embedding was NaN (or, by the luck of the draw, not), written to the
    embeddings file without a word; now one line names the file and the output is not written."""
    cache = make_fake_cache(tmp_path / "c", n_slides=4, n_tiles=36)
    train = pretrain_gigassl if method == "gigassl" else pretrain_slpd
    train(cache, tmp_path / "run", **(GIGA if method == "gigassl" else SLPD))
    _poison(cache / "features" / "slide2.h5", "features", (slice(0, 36), 3))  # every tile: any draw sees it
    _poison(cache / "features" / "slide3.h5", "features", (5, 0), np.inf)
    with pytest.raises(GigaslideError, match=r"2 feature files have NaN/inf features: slide2.h5: 36 tile\(s\); "
                                             r"slide3.h5: 1 tile\(s\)"):
        embed_slides(tmp_path / "run", cache, tmp_path / "emb.h5", ensemble=4, device="cpu")
    assert not (tmp_path / "emb.h5").exists()


def test_gigassl_refuses_a_cache_with_nan_views_naming_the_file(tmp_path, make_fake_cache):
    """NaN cached views trained until the loss became NaN (the history recording a NaN monitor first) and then said
    "lower --lr"; now the file is named before a run folder is made."""
    cache = make_fake_cache(tmp_path / "c", n_slides=4)
    _poison(cache / "features" / "slide1.h5", "views", (slice(None), 0, 0))
    with pytest.raises(GigaslideError, match=r"slide1.h5: 4 cached view tile\(s\) have NaN/inf features.*"
                                             r"augment-cache"):
        pretrain_gigassl(cache, tmp_path / "run", **GIGA)
    assert not (tmp_path / "run").exists()


def test_slpd_refuses_features_with_nan_naming_the_file(tmp_path, make_fake_cache):
    feats = make_fake_cache(tmp_path / "f", n_slides=3, n_tiles=36)
    _poison(feats / "features" / "slide0.h5", "features", (7, 2))
    with pytest.raises(GigaslideError, match=r"slide0.h5: 1 tile\(s\) have NaN/inf features"):
        pretrain_slpd(feats, tmp_path / "run", **SLPD)
    assert not (tmp_path / "run").exists()


def test_load_cache_reads_views_only_not_the_plain_features(tmp_path, make_fake_cache, monkeypatch):
    """pretrain-slides read every slide's plain features (100 slides x 5,000 tiles x 256-d: 561 MB peak for 1.6 MB of
    views; a cohort's plain features are 100s of GB) only to drop them."""
    from gigaslide.features import store

    cache = make_fake_cache(tmp_path / "c", n_slides=3)
    seen = []
    real = store.load

    def spy(path, *, arrays=True):  # noqa: ANN001, ANN202
        seen.append(arrays)
        return real(path, arrays=arrays)

    monkeypatch.setattr(store, "load", spy)
    vc = load_cache(cache)
    assert len(vc) == 3 and vc.views[0].shape == (4, 6, 8) and vc.pos[0].shape == (4, 6, 2)
    assert seen == [False, False, False]


def test_embed_refuses_a_model_that_embeds_finite_features_as_nan(tmp_path, make_fake_cache):
    """A model with NaN weights (a run exported from a diverged checkpoint) embedded every slide as NaN."""
    from safetensors.torch import load_file, save_file

    cache = make_fake_cache(tmp_path / "c", n_slides=4)
    pretrain_gigassl(cache, tmp_path / "run", **GIGA)
    w = load_file(tmp_path / "run" / "model.safetensors")
    w = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in w.items()}
    save_file(w, tmp_path / "run" / "model.safetensors")
    with pytest.raises(GigaslideError, match=r"slide 'slide0': the model embeds finite features as NaN/inf"):
        embed_slides(tmp_path / "run", cache, tmp_path / "emb.h5", ensemble=2, device="cpu")
    assert not (tmp_path / "emb.h5").exists()


@pytest.mark.parametrize("where", ["plain", "views", "fp16"])
def test_augment_cache_never_writes_nan_features(tmp_path, monkeypatch, where):
    """An encoder giving NaN (on the plain tiles, or on the augmented views only), or view features beyond float16's
    range (the views' dtype in the cache): the slide's cache file was written with NaN / inf (pretrain-slides then
    failed at "loss became nan", embed-slides wrote NaN); now that slide fails in one line and nothing is written."""
    from gigaslide.encoders import build_encoder
    from gigaslide.ssl.slide import cache as cache_mod
    from gigaslide.testing import make_slide

    slide = make_slide(tmp_path / "s0.tiff", (640, 448), mpp=2.0, seed=0)
    enc = build_encoder("test_resnet", "random", seed=0)

    def hook(module, args, out):  # noqa: ANN001, ANN202
        if where == "fp16":
            return out * 0 + 1e6  # finite in fp32, inf in float16
        plain = args[0].dtype == torch.uint8  # plain tiles go in as uint8, augmented views as float
        return out * float("nan") if plain == (where == "plain") else out

    enc.register_forward_hook(hook)
    monkeypatch.setattr(cache_mod, "for_inference", lambda e: e.eval())
    res = cache_mod.build_augment_cache([str(slide)], tmp_path / "c", enc, views=3, tiles_per_view=6, mpp=2.0,
                                        tile_size=32, precision="fp32", device="cpu", log=lambda *a: None)
    assert res.done == [] and list(res.failed) == ["s0"]
    want = {"plain": r"NaN features for \d+ of \d+ tiles of slide s0", "views": r"NaN features for \d+ of \d+ tiles of "
            r"the augmented views of slide s0", "fp16": r"exceed float16's range"}[where]
    import re

    assert re.search(want, res.failed["s0"]), res.failed["s0"]
    assert not (tmp_path / "c" / "features" / "s0.h5").exists()


def test_a_nan_loss_says_a_fix_that_can_be_followed(tmp_path, make_fake_cache):
    """A loss that became NaN said "lower --lr; ... a re-run resumes from [the last good checkpoint]": a re-run with
    another --lr is refused (a run keeps its options) and the same command resumes bit-exactly into the same NaN. It
    also named the 0-based epoch that the log calls epoch 2."""
    cache = make_fake_cache(tmp_path / "c", n_slides=6)
    kw = dict(GIGA, epochs=20, lr=1e9, temperature=1e-4, norm="none")
    for _ in range(2):  # the re-run resumes into the same NaN
        with pytest.raises(GigaslideError, match=r"loss became nan at epoch 2 step 1 -- fix: start again with a lower "
                                                 r"--lr in a new --out"):
            pretrain_gigassl(cache, tmp_path / "run", **kw)
    with pytest.raises(GigaslideError, match="another run"):  # what the old advice led to
        pretrain_gigassl(cache, tmp_path / "run", **{**kw, "lr": 1e-4})


def test_slpd_refuses_features_that_are_the_same_for_every_tile(tmp_path, make_fake_cache):
    """Constant tile features (a broken encoder): SLPD trained, was not flagged as collapsed, and embed-slides gave
    every slide the same embedding; now one line says so before a run folder is made. Constant in one dimension only
    is fine."""
    feats = make_fake_cache(tmp_path / "f", n_slides=3, n_tiles=36)
    for s in range(3):
        _poison(feats / "features" / f"slide{s}.h5", "features", (slice(None), 0), 2.5)
    pretrain_slpd(feats, tmp_path / "ok", **SLPD)  # one constant dimension: trains
    for s in range(3):
        _poison(feats / "features" / f"slide{s}.h5", "features", slice(None), 2.5)
    with pytest.raises(GigaslideError, match=r"every tile feature is the same in all 3 slides"):
        pretrain_slpd(feats, tmp_path / "run", **SLPD)
    assert not (tmp_path / "run").exists()


def test_embed_fp16_refuses_embeddings_beyond_its_range(tmp_path, make_fake_cache):
    """--fp16 wrote an embedding beyond float16's range as inf; now one line says to embed without --fp16."""
    from safetensors.torch import load_file, save_file

    cache = make_fake_cache(tmp_path / "c", n_slides=4)
    pretrain_gigassl(cache, tmp_path / "run", **dict(GIGA, encoder="mean"))
    w = load_file(tmp_path / "run" / "model.safetensors")
    save_file({k: v * 1e4 if v.is_floating_point() else v for k, v in w.items()},
              tmp_path / "run" / "model.safetensors")
    e = embed_slides(tmp_path / "run", cache, tmp_path / "e32.h5", ensemble=2, device="cpu")
    assert np.isfinite(e.embeddings).all() and np.abs(e.embeddings).max() > 65504  # fine in float32
    with pytest.raises(GigaslideError, match=r"its embedding exceeds float16's range.*embed without --fp16"):
        embed_slides(tmp_path / "run", cache, tmp_path / "e16.h5", ensemble=2, fp16=True, device="cpu")
    assert not (tmp_path / "e16.h5").exists()

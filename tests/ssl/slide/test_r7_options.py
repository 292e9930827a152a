"""Round 7, the Python API's bad input: options a run cannot use are one line (GigaslideError) before a run folder.

Each of these failed deep inside as a bare library error (sklearn's InvalidParameterError for ``prototypes=0``,
ZeroDivisionError for ``batch_size=0``, torch's AssertionError for ``dim`` not divisible by ``heads``, "cannot convert
float NaN to integer" for ``region_mpp=nan``, a 15 PB allocation for ``region_size=1e9``, lightly's ValueError for
``temperature=0``), or trained nonsense without a word (``epochs=0`` exported the untrained encoder as a finished run,
``momentum=2`` moved the teacher away from the student)."""
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.gigassl import pretrain_gigassl
from gigaslide.ssl.slide.slpd import pretrain_slpd

QUIET = dict(log=lambda *a: None, device="cpu")
SLPD = dict(region_size=256, prototypes=1, dim=16, heads=2, depth=1, head_dim=16, batch_size=8, warmup=1, epochs=1,
            **QUIET)
GSSL = dict(out_dim=8, hidden=8, proj_dim=4, tiles_per_step=4, epochs=1, **QUIET)


@pytest.mark.parametrize("bad,says", [
    (dict(prototypes=0), "--prototypes 0 must be >= 1"), (dict(batch_size=0), "--batch-size 0 must be >= 1"),
    (dict(epochs=0), "--epochs 0 must be >= 1"), (dict(dim=15), "dim 15 is not divisible by heads 2"),
    (dict(heads=0), "heads 0 must be >= 1"), (dict(depth=0), "depth 0 must be >= 1"),
    (dict(n_global=0), "n_global 0 must be >= 1"), (dict(n_local=-1), "--n-local -1 must be >= 0"),
    (dict(region_mpp=float("nan")), "--region-mpp nan must be a positive number"),
    (dict(region_mpp=float("inf")), "--region-mpp inf must be a positive number"),
    (dict(lr=float("nan")), "--lr nan must be a number >= 0"), (dict(momentum=2.0), "momentum 2.0 must be in"),
    (dict(local_crop=(0.0, 0.3)), "local_crop (0.0, 0.3) must be fractions"),
    (dict(region_size=10**9), "tiles wide (at most 256)"),
])
def test_slpd_refuses_options_it_cannot_use_before_a_run_folder(tmp_path, make_fake_cache, bad, says):
    feats = make_fake_cache(tmp_path / "f", n_slides=3, n_tiles=36)
    with pytest.raises(GigaslideError) as ei:
        pretrain_slpd(feats, tmp_path / "run", **{**SLPD, **bad})
    assert says in ei.value.what
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad,says", [
    (dict(epochs=0), "--epochs 0 must be >= 1"), (dict(temperature=0.0), "--temperature 0.0 must be a positive"),
    (dict(lr=float("nan")), "--lr nan must be a number >= 0"), (dict(scale=(0.0, 0.0)), "scale (0.0, 0.0)"),
])
def test_gigassl_refuses_options_it_cannot_use_before_a_run_folder(tmp_path, make_fake_cache, bad, says):
    cache = make_fake_cache(tmp_path / "c", n_slides=3)
    with pytest.raises(GigaslideError) as ei:
        pretrain_gigassl(cache, tmp_path / "run", **{**GSSL, **bad})
    assert says in ei.value.what
    assert not (tmp_path / "run").exists()


def test_embed_refuses_a_bad_view_count_and_batches_the_views(tmp_path, make_fake_cache, monkeypatch):
    """A negative --tiles-per-view failed inside numpy; --ensemble encoded every view at once (10^7 views: every byte
    of the machine). The views go through the encoder VIEW_BATCH at a time, with the same embedding."""
    import numpy as np

    from gigaslide.ssl.slide import gigassl

    cache = make_fake_cache(tmp_path / "c", n_slides=3)
    pretrain_gigassl(cache, tmp_path / "run", **GSSL)
    for kw, says in ((dict(tiles_per_view=-3), "--tiles-per-view -3 must be >= 1"),
                     (dict(tiles_per_view=0), "--tiles-per-view 0 must be >= 1"),
                     (dict(ensemble=10**7), "--ensemble 10000000 must be in [1, 100000]")):
        with pytest.raises(GigaslideError, match=says.replace("[", r"\[").replace("]", r"\]")):
            embed_slides(tmp_path / "run", cache, tmp_path / "e.h5", device="cpu", **kw)
    whole = embed_slides(tmp_path / "run", cache, tmp_path / "a.h5", ensemble=7, device="cpu").embeddings
    monkeypatch.setattr(gigassl, "VIEW_BATCH", 3)
    batches = []
    enc, _ = gigassl.load_encoder(tmp_path / "run")
    enc.register_forward_hook(lambda mod, args, out: batches.append(len(args[0])))
    monkeypatch.setattr(gigassl, "load_encoder", lambda run: (enc, None))
    parts = embed_slides(tmp_path / "run", cache, tmp_path / "b.h5", ensemble=7, device="cpu").embeddings
    assert batches == [3, 3, 1] * 3  # 3 slides, 7 views each
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-7)

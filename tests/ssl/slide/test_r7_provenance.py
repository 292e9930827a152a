"""Round 7, stage contracts: what embed-slides records and refuses.

The embeddings file named the run's folder only: a run re-trained in the same folder (or a copied one) gave other
embeddings under the same record; it now records the slide encoder's sha256, the run's training seed and the features
folder. SLPD recorded ``seed: 0`` (embed's default) for an embedding that draws nothing. A run embedding features of
another tile encoder was refused with the fix of a mixed folder ("keep one encoder per folder")."""
import hashlib

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.gigassl import pretrain_gigassl
from gigaslide.ssl.slide.slpd import pretrain_slpd

QUIET = dict(log=lambda *a: None, device="cpu")


def _train(method, cache, run):  # noqa: ANN001, ANN202
    if method == "gigassl":
        pretrain_gigassl(cache, run, epochs=1, out_dim=8, hidden=8, proj_dim=4, tiles_per_step=4, seed=3, **QUIET)
    else:
        pretrain_slpd(cache, run, epochs=1, region_size=256, prototypes=1, dim=16, heads=2, depth=1, head_dim=16,
                      batch_size=8, warmup=1, seed=3, **QUIET)


@pytest.mark.parametrize("method", ["gigassl", "slpd"])
def test_embeddings_record_the_slide_encoder_its_seed_and_the_features(tmp_path, make_fake_cache, method):
    cache = make_fake_cache(tmp_path / "cache", n_slides=4)
    _train(method, cache, tmp_path / "run")
    e = embed_slides(tmp_path / "run", cache, tmp_path / "e.h5", ensemble=2, seed=5, device="cpu")
    want = hashlib.sha256((tmp_path / "run" / "model.safetensors").read_bytes()).hexdigest()
    assert e.attrs["slide_encoder_sha256"] == want and e.attrs["train_seed"] == 3
    assert e.attrs["features"] == str(cache.resolve()) and e.attrs["encoder_weights_sha256"] == "x"
    assert e.attrs.get("seed") == (5 if method == "gigassl" else None)  # SLPD draws no views


@pytest.mark.parametrize("method", ["gigassl", "slpd"])
def test_features_of_another_tile_encoder_are_refused_with_the_runs_own(tmp_path, make_fake_cache, method):
    cache = make_fake_cache(tmp_path / "cache", n_slides=4)
    _train(method, cache, tmp_path / "run")
    other = make_fake_cache(tmp_path / "other", n_slides=2, encoder="uni")
    with pytest.raises(GigaslideError) as ei:
        embed_slides(tmp_path / "run", other, tmp_path / "e.h5", device="cpu")
    msg = ei.value.one_line()
    assert "differ in encoder ('fake' vs 'uni')" in msg and str(tmp_path / "run") in msg
    assert "tile encoder fake" in ei.value.fix and "one encoder" not in ei.value.fix
    assert not (tmp_path / "e.h5").exists()

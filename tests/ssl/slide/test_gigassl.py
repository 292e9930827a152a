"""Giga-SSL pre-training: learns, resumes exactly, exports, embeds; bad input gives clear errors."""
import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.embed import embed_slides, load_embeddings
from gigaslide.ssl.slide.gigassl import pretrain_gigassl
from gigaslide.ssl.slide.views import load_cache

KW = dict(out_dim=16, hidden=16, proj_dim=8, batch_size=6, lr=1e-3, log=lambda *a: None)


def test_load_cache_reads_views_and_positions(fake_cache):
    vc = load_cache(fake_cache)
    assert len(vc) == 6 and vc.dim == 8
    assert vc.views[0].shape == (4, 6, 8) and vc.views[0].dtype == torch.float16
    assert vc.pos[0].dtype == torch.long and int(vc.pos[0].max()) <= 4  # 20 tiles on a 5x5 lattice


def test_pretrain_loss_decreases_and_exports(fake_cache, tmp_path):
    res = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=30, **KW)
    assert res["finished"]
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0] - 0.1
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_resume_equals_uninterrupted(fake_cache, tmp_path):
    pretrain_gigassl(fake_cache, tmp_path / "a", epochs=4, **KW)
    part = pretrain_gigassl(fake_cache, tmp_path / "b", epochs=4, stop_after=2, **KW)
    assert not part["finished"] and not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(GigaslideError, match="did not finish"):
        embed_slides(tmp_path / "b", fake_cache, tmp_path / "e.h5")
    pretrain_gigassl(fake_cache, tmp_path / "b", epochs=4, **KW)  # resumes at epoch 2
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(GigaslideError, match="other settings"):
        pretrain_gigassl(fake_cache, tmp_path / "b", epochs=4, **{**KW, "lr": 0.5})


def test_embed_slides_fp16_and_bytes(fake_cache, tmp_path):
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, **KW)
    e = embed_slides(tmp_path / "run", fake_cache, tmp_path / "emb.h5", ensemble=5, fp16=True)
    assert e.embeddings.shape == (6, 16) and e.embeddings.dtype == np.float16
    assert e.attrs["bytes_per_slide"] == 32
    back = load_embeddings(tmp_path / "emb.h5")
    assert back.slide_ids == [f"slide{i}" for i in range(6)]
    np.testing.assert_array_equal(back.embeddings, e.embeddings)
    with h5py.File(tmp_path / "emb.h5") as f:
        assert f.attrs["method"] == "gigassl" and f.attrs["ensemble"] == 5
    # ensembling is deterministic per seed
    e2 = embed_slides(tmp_path / "run", fake_cache, tmp_path / "emb2.h5", ensemble=5, fp16=True)
    np.testing.assert_array_equal(e.embeddings, e2.embeddings)


def test_bad_caches(tmp_path, make_fake_cache):
    with pytest.raises(GigaslideError, match="not found"):
        load_cache(tmp_path / "nope")
    (tmp_path / "empty" / "features").mkdir(parents=True)
    with pytest.raises(GigaslideError, match="empty cache"):
        load_cache(tmp_path / "empty")
    make_fake_cache(tmp_path / "mixed", n_slides=2, encoder="enc_a")
    make_fake_cache(tmp_path / "other", n_slides=1, encoder="enc_b")
    (tmp_path / "other" / "features" / "slide0.h5").rename(tmp_path / "mixed" / "features" / "zz.h5")
    with pytest.raises(GigaslideError, match="mixes encoders"):
        load_cache(tmp_path / "mixed")
    make_fake_cache(tmp_path / "one", n_slides=1)
    with pytest.raises(GigaslideError, match="at least 2 slides"):
        pretrain_gigassl(tmp_path / "one", tmp_path / "run", epochs=1, **KW)


@pytest.mark.parametrize("name", ["abmil", "mean"])
def test_other_slide_encoders_train(fake_cache, tmp_path, name):
    res = pretrain_gigassl(fake_cache, tmp_path / name, encoder=name, epochs=2, **KW)
    assert res["finished"] and np.isfinite(res["history"][-1]["loss"])

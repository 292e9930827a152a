"""Giga-SSL pre-training: learns slide structure, per-step views, bit-exact resume on the run layer, exports, embeds."""
import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.ssl.slide.embed import embed_slides, load_embeddings
from gigaslide.ssl.slide.gigassl import (GigaSSLModel, embed_views, learned_over, load_encoder, lr_at, make_encoder,
                                        pretrain_gigassl)
from gigaslide.ssl.slide.sampling import augment_grid, draw_pairs, raw_view_retrieval
from gigaslide.ssl.slide.views import load_cache

KW = dict(out_dim=16, hidden=16, proj_dim=8, batch_size=4, lr=1e-3, tiles_per_step=4, blocks=1, warmup_epochs=1,
          log=lambda *a: None)


def _one_nn(x, y):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return float((y[s.argmax(1)] == y).mean())


def test_load_cache_reads_views_and_positions(fake_cache):
    vc = load_cache(fake_cache)
    assert len(vc) == 6 and vc.dim == 8 and vc.provenance.mpp == 0.5 and vc.provenance.encoder == "fake"
    assert vc.views[0].shape == (4, 6, 8) and vc.views[0].dtype == np.float16
    assert vc.pos[0].dtype == np.int64 and int(vc.pos[0].max()) <= 4  # 20 tiles on a 5x5 lattice


def test_views_are_redrawn_every_step_and_grid_augment_keeps_geometry():
    rng = np.random.default_rng(0)
    views = [np.random.default_rng(1).normal(size=(3, 10, 4)).astype(np.float16)]
    pos = [np.stack([np.arange(10), np.zeros(10, int)], 1)[None].repeat(3, 0)]
    a = draw_pairs(views, pos, np.array([0]), 5, rng, grid_augment=False)
    b = draw_pairs(views, pos, np.array([0]), 5, rng, grid_augment=False)
    assert not torch.equal(a[0], b[0])  # not a frozen cached view
    few = draw_pairs(views, pos, np.array([0]), 15, rng)  # more tiles than cached: with replacement
    assert few[0].shape == (1, 15, 4)
    p = np.array([[0, 0], [3, 0], [3, 2], [5, 7]])
    d = lambda q: sorted(np.abs(q[:, None] - q[None]).sum(-1).ravel().tolist())  # noqa: E731
    for s in range(8):  # rotations / flips preserve all L1 distances; a scale multiplies them
        q = augment_grid(p, np.random.default_rng(s), scale=(1.0, 1.0))
        assert d(q) == d(p) and q.min() == 0
    q2 = augment_grid(p, np.random.default_rng(0), scale=(2.0, 2.0))
    assert d(q2) == [2 * v for v in d(p)]


def _views(identity: float, n: int = 40, t: int = 16, d: int = 32, common: float = 0.0, seed: int = 0):
    """Two views per slide: tiles drawn independently from one shared pool, plus a per-slide offset of size
    ``identity`` (0: the views share nothing slide-specific) and an offset ``common`` that every slide shares."""
    rng = np.random.default_rng(seed)
    off = rng.normal(scale=identity, size=(n, 1, d)) + common
    f0, f1 = (torch.as_tensor(rng.normal(size=(n, t, d)) + off, dtype=torch.float32) for _ in range(2))
    pos = torch.zeros(n, t, 2, dtype=torch.long)
    return f0, pos, f1, pos


def test_raw_view_retrieval_measures_the_identity_the_views_carry_whatever_every_slide_shares():
    strong, none_ = raw_view_retrieval(_views(1.0)), raw_view_retrieval(_views(0.0))
    assert strong["retrieval_top1"] == 1.0  # offset 1.0 vs a 16-tile mean's noise of 0.25 per dim
    assert none_["retrieval_top1"] <= 0.1  # chance is 1/40: no identity, no retrieval
    # a large offset shared by all slides (post-ReLU features' common mean) must not hide the identity:
    # without centring over slides every cosine would be ~1 and top-1 near chance
    assert raw_view_retrieval(_views(1.0, common=50.0)) == strong
    assert raw_view_retrieval(_views(0.0, common=50.0)) == none_


def test_the_untrained_run_records_how_much_identity_its_cache_carries(tmp_path, make_stain_cache):
    cache, _ = make_stain_cache(tmp_path / "c")
    logs = []
    res = pretrain_gigassl(cache, tmp_path / "run", epochs=1, **{**KW, "log": logs.append})
    raw = res["raw_monitor"]["retrieval_top1"]
    vc = load_cache(cache)  # the monitor's own fixed views (seed [0, 2]), scored without any model
    pairs = draw_pairs(vc.views, vc.pos, np.arange(len(vc)), KW["tiles_per_step"], np.random.default_rng([0, 2]))
    assert res["raw_monitor"] == raw_view_retrieval(pairs)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["raw_monitor"] == res["raw_monitor"]
    assert any(m.startswith("slide identity in the cached views before training") and f"{raw:.3f}" in m for m in logs)


def test_warmup_cosine_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1) and lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5) and lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_embeddings_separate_slide_types_better_than_the_untrained_encoder(tmp_path, make_stain_cache):
    cache, types = make_stain_cache(tmp_path / "c")
    kw = dict(out_dim=16, hidden=32, proj_dim=16, batch_size=8, lr=2e-3, tiles_per_step=16, blocks=1, temperature=0.1,
              warmup_epochs=2, log=lambda *a: None)
    res = pretrain_gigassl(cache, tmp_path / "run", epochs=40, **kw)
    assert res["finished"]
    enc, cfg = load_encoder(tmp_path / "run")
    torch.manual_seed(0)  # the initialisation training started from
    init = GigaSSLModel(make_encoder(cfg["encoder"], 16), 16, 16).encoder.eval()
    files = store.load_dir(cache)

    def emb(e):
        return np.stack([embed_views(e, ff.features, np.round(ff.coords / 64).astype(np.int64), ensemble=8,
                                     tiles_per_view=16, rng=np.random.default_rng(0)) for ff in files.values()])

    trained, untrained = _one_nn(emb(enc), types), _one_nn(emb(init), types)
    assert trained >= 0.85 and trained >= untrained + 0.2, (trained, untrained)
    hist = res["history"]
    assert hist[-1]["retrieval_top1"] > hist[0]["retrieval_top1"]  # the label-free monitor sees it too
    # ... and beats the untrained encoder, scored on the same monitor views before the first step
    assert res["learned"] is True and res["untrained_monitor"]["retrieval_top1"] < hist[res["exported_epoch"] - 1]["retrieval_top1"]
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["untrained_monitor"] == res["untrained_monitor"] and rec["summary"]["learned"] is True


def test_embeddings_do_not_depend_on_where_the_slide_starts_on_its_grid():
    """SparseConvMIL's stride-2 pooling pairs cells by their parity: embed_views places every view's top-left at cell
    0 as training does, so moving a slide by an odd number of cells leaves its embedding unchanged (bit-exact)."""
    torch.manual_seed(0)
    enc = make_encoder({"encoder": "sparseconvmil", "out_dim": 6, "hidden": 16, "blocks": 2, "norm": "batch",
                        "downsample": True}, 8).eval()
    r = np.random.default_rng(0)
    feats = r.normal(size=(40, 8)).astype(np.float32)
    pos = np.stack(np.unravel_index(r.choice(100, 40, replace=False), (10, 10)), 1).astype(np.int64)

    def emb(p):
        return embed_views(enc, feats, p, ensemble=4, tiles_per_view=12, rng=np.random.default_rng(1))

    np.testing.assert_array_equal(emb(pos + [3, 7]), emb(pos))
    assert not np.allclose(emb(pos[::-1].copy()), emb(pos))  # (the positions do matter)


def test_a_run_that_cannot_beat_the_untrained_encoder_is_finished_as_not_learned(fake_cache, tmp_path):
    logs = []
    # lr 0 and no BatchNorm: the exported encoder is the untrained one, so it cannot score above it
    res = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, out_dim=8, hidden=8, proj_dim=8, lr=0.0, norm="none",
                           tiles_per_step=4, warmup_epochs=0, log=logs.append)
    assert res["finished"] and res["learned"] is False
    assert res["history"][0]["retrieval_top1"] == pytest.approx(res["untrained_monitor"]["retrieval_top1"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["learned"] is False
    assert any(m.startswith("warning: pre-training did not beat the untrained encoder") for m in logs)


def test_learned_compares_the_exported_epoch_with_the_untrained_encoder():
    u = {"retrieval_top1": 0.10, "cosine_gap": 0.2}
    assert learned_over({"retrieval_top1": 0.12, "cosine_gap": 0.0}, u) is True
    assert learned_over({"retrieval_top1": 0.10, "cosine_gap": 0.1}, u) is False  # equal top-1: the gap decides
    assert learned_over({"retrieval_top1": 0.10, "cosine_gap": 0.2 + 1e-4}, u) is False  # noise (the demo's 40 epochs)
    assert learned_over({"retrieval_top1": 0.10, "cosine_gap": 0.2 + 0.02}, u) is True
    assert learned_over({"retrieval_top1": 0.05, "cosine_gap": 0.9}, u) is False
    assert learned_over(None, u) is None and learned_over(u, None) is None


def test_resume_mid_epoch_is_bit_exact_on_the_run_layer(fake_cache, tmp_path):
    pretrain_gigassl(fake_cache, tmp_path / "a", epochs=3, **KW)  # 2 steps per epoch
    part = pretrain_gigassl(fake_cache, tmp_path / "b", epochs=3, stop_after_steps=3, **KW)  # stops mid-epoch 2
    assert not part["finished"] and part["stopped"] == "stop_after" and not (tmp_path / "b" / "model.safetensors").exists()
    assert runs.read_run(tmp_path / "b")["status"] == "stopped"
    with pytest.raises(GigaslideError, match="did not finish"):
        embed_slides(tmp_path / "b", fake_cache, tmp_path / "e.h5")
    pretrain_gigassl(fake_cache, tmp_path / "b", epochs=3, **KW)  # resumes at epoch 1, step 1
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = runs.read_run(tmp_path / "b")
    assert rec["status"] == "finished" and len(rec["invocations"]) == 2 and rec["run_kind"] == "gigassl"
    assert rec["provenance"]["mpp"] == 0.5 and rec["inputs"]["cache"]["files"] >= 6
    assert not list((tmp_path / "b").glob("*.pt"))  # pickle-free
    c = pretrain_gigassl(fake_cache, tmp_path / "c", epochs=3, **{**KW, "select": "last", "seed": 1})
    assert c["finished"]
    cw = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not all(torch.equal(a[k], cw[k]) for k in a)  # the comparison above can fail
    with pytest.raises(GigaslideError, match="another run"):
        pretrain_gigassl(fake_cache, tmp_path / "b", epochs=3, **{**KW, "lr": 0.5})


def test_budget_is_a_clean_stop_that_resumes(fake_cache, tmp_path):
    st = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, budget=1e-9, **KW)
    assert st["stopped"] == "budget" and not st["finished"] and st["history"] == []
    done = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, **KW)
    assert done["finished"] and len(done["history"]) == 2


def test_slides_with_fewer_tiles_than_a_view_are_sampled_with_replacement_and_reported(fake_cache, tmp_path):
    logs = []
    res = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **{**KW, "tiles_per_step": 10, "log": logs.append})
    assert res["finished"] and any("fewer tiles than a view needs" in m for m in logs)
    assert len(runs.read_run(tmp_path / "run")["few_tiles"]) == 6  # every slide caches 6 tiles per view


def test_best_epoch_is_exported_by_the_monitor(fake_cache, tmp_path):
    res = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=4, **KW)
    rec = runs.read_run(tmp_path / "run")
    best = max(range(len(res["history"])), key=lambda i: (res["history"][i]["retrieval_top1"]
                                                          + 0.01 * res["history"][i]["cosine_gap"], -i))
    assert rec["summary"]["exported_epoch"] == best + 1
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    saved = runs.load_checkpoint(tmp_path / "run", "best")["encoder"]
    assert all(torch.equal(exported[k], saved[k].to(exported[k].dtype)) for k in exported)


def test_embed_slides_fp16_bytes_and_provenance(fake_cache, tmp_path):
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, **KW)
    e = embed_slides(tmp_path / "run", fake_cache, tmp_path / "emb.h5", ensemble=5, fp16=True)
    assert e.embeddings.shape == (6, 16) and e.embeddings.dtype == np.float16
    assert e.attrs["bytes_per_slide"] == 32
    back = load_embeddings(tmp_path / "emb.h5")
    assert back.slide_ids == [f"slide{i}" for i in range(6)]
    np.testing.assert_array_equal(back.embeddings, e.embeddings)
    with h5py.File(tmp_path / "emb.h5") as f:
        a = dict(f.attrs)
        assert a["method"] == "gigassl" and a["ensemble"] == 5 and a["mpp"] == 0.5 and a["tile_size"] == 64
        assert a["encoder"] == "fake" and a["encoder_weights_sha256"] == "x" and a["run"] == str(tmp_path / "run")
    e2 = embed_slides(tmp_path / "run", fake_cache, tmp_path / "emb2.h5", ensemble=5, fp16=True)
    np.testing.assert_array_equal(e.embeddings, e2.embeddings)  # deterministic per seed


def test_features_of_another_encoder_are_refused(fake_cache, tmp_path, make_fake_cache):
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **KW)
    other = make_fake_cache(tmp_path / "other", n_slides=2, encoder="enc_b")
    with pytest.raises(GigaslideError, match="differ in encoder"):
        embed_slides(tmp_path / "run", other, tmp_path / "e.h5")


def test_bad_caches(tmp_path, make_fake_cache):
    with pytest.raises(GigaslideError, match="not found"):
        load_cache(tmp_path / "nope")
    (tmp_path / "empty" / "features").mkdir(parents=True)
    with pytest.raises(GigaslideError, match="empty cache"):
        load_cache(tmp_path / "empty")
    make_fake_cache(tmp_path / "mixed", n_slides=2, encoder="enc_a")
    make_fake_cache(tmp_path / "other", n_slides=3, encoder="enc_b")  # slide2: an id the folder lacks
    (tmp_path / "other" / "features" / "slide2.h5").rename(tmp_path / "mixed" / "features" / "zz.h5")
    with pytest.raises(GigaslideError, match="differ in encoder"):
        load_cache(tmp_path / "mixed")
    make_fake_cache(tmp_path / "one", n_slides=1)
    with pytest.raises(GigaslideError, match="at least 2 slides"):
        pretrain_gigassl(tmp_path / "one", tmp_path / "run", epochs=1, **KW)
    plain = tmp_path / "plain"
    store.save(plain / "features" / "a.h5", np.zeros((3, 8), np.float32), np.zeros((3, 2)),
               attrs={"encoder": "fake"}, coords_attrs={"patch_size_level0": 64.0})
    with pytest.raises(GigaslideError, match="not an augmented-view cache"):
        load_cache(plain)


def test_a_cache_mixing_two_recipes_is_refused_before_training(tmp_path, make_fake_cache):
    """Files of a cache of another --views / --tiles-per-view (same encoder) copied into the folder: one line naming
    a slide of the other shape, no run started (the run would record the first slide's tiles per view for all)."""
    make_fake_cache(tmp_path / "mixed", n_slides=3, views=4, tiles=6)
    make_fake_cache(tmp_path / "other", n_slides=4, views=3, tiles=5)
    (tmp_path / "other" / "features" / "slide3.h5").rename(tmp_path / "mixed" / "features" / "slide3.h5")
    with pytest.raises(GigaslideError, match=r"mixes recipes: .*slide 'slide3' another shape .*3x5, 4x6") as e:
        pretrain_gigassl(tmp_path / "mixed", tmp_path / "run", epochs=1, **KW)
    assert "\n" not in e.value.one_line() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["abmil", "mean"])
def test_other_slide_encoders_train(fake_cache, tmp_path, name):
    res = pretrain_gigassl(fake_cache, tmp_path / name, encoder=name, epochs=2, **KW)
    assert res["finished"] and np.isfinite(res["history"][-1]["loss"])
    assert json.loads((tmp_path / name / "run.json").read_text())["config"]["encoder"]["encoder"] == name


def _sparse_encoder(seed=0):
    torch.manual_seed(seed)
    return make_encoder({"encoder": "sparseconvmil", "out_dim": 6, "hidden": 16, "blocks": 2, "norm": "batch",
                         "downsample": True}, 8).eval()


def test_slide_embedding_does_not_depend_on_the_order_of_tiles_in_the_file():
    """The same tiles listed in another order (another tool, a re-encode) give the same embedding for the same seed:
    views are drawn from the tiles in grid order."""
    enc = _sparse_encoder()
    r = np.random.default_rng(0)
    feats = r.normal(size=(40, 8)).astype(np.float32)
    pos = np.stack(np.unravel_index(r.choice(100, 40, replace=False), (10, 10)), 1).astype(np.int64)
    perm = r.permutation(40)

    def emb(f, p, seed=1, **kw):
        return embed_views(enc, f, p, **{"ensemble": 4, "tiles_per_view": 12, **kw}, rng=np.random.default_rng(seed))

    np.testing.assert_array_equal(emb(feats[perm], pos[perm]), emb(feats, pos))
    assert not np.allclose(emb(feats, pos, seed=2), emb(feats, pos))  # (the views are random draws)
    # every tile in one view: the encoder itself is invariant to tile order
    np.testing.assert_allclose(emb(feats[perm], pos[perm], ensemble=1, tiles_per_view=40),
                               emb(feats, pos, ensemble=1, tiles_per_view=40), atol=1e-5)


def test_eval_embedding_of_a_slide_does_not_depend_on_the_other_slides_in_its_batch():
    enc = _sparse_encoder()
    r = np.random.default_rng(0)
    f = torch.as_tensor(r.normal(size=(3, 10, 8)), dtype=torch.float32)
    p = torch.as_tensor(np.stack([np.stack(np.unravel_index(r.choice(25, 10, replace=False), (5, 5)), 1)
                                  for _ in range(3)]), dtype=torch.long)
    with torch.no_grad():
        together = enc(f, p)
        alone = torch.cat([enc(f[i:i + 1], p[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_the_simclr_loss_pairs_the_two_views_of_each_slide():
    """lightly's NTXentLoss as the trainer calls it (view 0 of every slide, then view 1) against NT-Xent by hand:
    row i's positive is row i + n (the other view of slide i), the 2n - 2 other rows its negatives."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    n, t = 5, 0.05
    z0, z1 = torch.randn(n, 7), torch.randn(n, 7)
    z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    sim = (z @ z.T / t).fill_diagonal_(float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    ref = torch.nn.functional.cross_entropy(sim, positive)
    torch.testing.assert_close(NTXentLoss(temperature=t)(z0, z1), ref)
    torch.testing.assert_close(NTXentLoss(temperature=t)(z0 * 3.0, z1), ref)  # cosine: the norm does not matter
    assert NTXentLoss(temperature=t)(z0, z0 + 1e-3) < NTXentLoss(temperature=t)(z0, z0.roll(1, 0))


def test_embed_slides_refuses_a_slide_without_tiles_naming_its_file(fake_cache, tmp_path, add_empty_slide):
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **KW)
    add_empty_slide(fake_cache)
    with pytest.raises(GigaslideError, match="no tiles") as e:
        embed_slides(tmp_path / "run", fake_cache, tmp_path / "e.h5")
    assert "empty.h5" in str(e.value) and not (tmp_path / "e.h5").exists()


def test_a_slides_embedding_does_not_depend_on_the_other_slides_in_the_folder(fake_cache, tmp_path):
    import shutil

    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **KW)
    full = embed_slides(tmp_path / "run", fake_cache, tmp_path / "all.h5", ensemble=3)
    sub = tmp_path / "sub" / "features"
    sub.mkdir(parents=True)
    for s in ("slide4", "slide1"):
        shutil.copy(fake_cache / "features" / f"{s}.h5", sub / f"{s}.h5")
    part = embed_slides(tmp_path / "run", sub.parent, tmp_path / "sub.h5", ensemble=3)
    assert part.slide_ids == ["slide1", "slide4"]
    for i, s in enumerate(part.slide_ids):  # each row is its own slide's, whatever else was embedded
        np.testing.assert_array_equal(part.embeddings[i], full.embeddings[full.slide_ids.index(s)])


def test_fp16_training_keeps_its_loss_scale_in_the_checkpoint(fake_cache, tmp_path):
    """fp16 autocast trains with a loss scaler (small gradients would flush to zero), whose state a resume needs."""
    st = pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, stop_after_steps=1, **{**KW, "precision": "fp16"})
    assert st["stopped"] == "stop_after"
    ck = runs.load_checkpoint(tmp_path / "run")
    assert {"scale", "growth_factor"} <= set(ck["scaler"])  # a scaler that is off keeps no state
    assert pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, **{**KW, "precision": "fp16"})["finished"]


@pytest.mark.parametrize("opt, value, says", [("hidden", 0, "--width 0"), ("blocks", -1, "--blocks -1"),
                                              ("warmup_epochs", -1, "--warmup-epochs -1"),
                                              ("patience", 0, "--patience 0"), ("norm", "group", "--norm 'group'")])
def test_options_the_run_cannot_use_are_one_line_before_the_run_folder(fake_cache, tmp_path, opt, value, says):
    """--width 0 / --norm group failed in the encoder with a traceback; --patience 0 stopped before the first epoch and
    exported the untrained encoder as a finished run; --blocks -1 trained without blocks."""
    from gigaslide.ssl.slide.gigassl import pretrain_gigassl

    with pytest.raises(GigaslideError, match=says):
        pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, log=lambda *a: None, **{opt: value})
    assert not (tmp_path / "run").exists()

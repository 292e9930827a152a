"""SLPD: region grouping, each loss on inputs with a known answer, training/resume/embedding."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.prototypes import (assign_nearest, nearest_slides, prototype_distill_loss, set_distance,
                                            slide_prototypes)
from gigaslide.ssl.slide.regions import group_regions, level0_mpp, pack, regions_of
from gigaslide.ssl.slide.slpd import RegionViT, pretrain_slpd


def test_group_regions_known_layout():
    # tiles of 256 level-0 px; regions of 512 px -> 2x2 lattice
    coords = np.array([[0, 0], [256, 0], [0, 256], [512, 0], [768, 256], [1024, 1024]])
    r = group_regions(coords, 256.0, 512.0)
    assert r.grid == 2 and len(r) == 3
    assert r.origins.tolist() == [[0, 0], [512, 0], [1024, 1024]]
    assert [m.tolist() for m in r.members] == [[0, 1, 2], [3, 4], [5]]
    assert r.local[1].tolist() == [[0, 0], [1, 1]]
    f, p, m = pack(np.eye(6, dtype=np.float32), r, [0, 1])
    assert f.shape == (2, 3, 6) and m.tolist() == [[True, True, True], [True, True, False]]
    assert p[1, :2].tolist() == [0, 3]  # lattice index y * 2 + x
    assert len(group_regions(coords, 256.0, 512.0, min_tiles=2)) == 2
    with pytest.raises(GigaslideError, match="smaller than a tile"):
        group_regions(coords, 256.0, 100.0)


def test_region_size_in_microns_at_any_mpp(tmp_path):
    # 4096 px at 0.5 µm/px = 2048 µm; at level-0 0.25 µm/px that is 8192 level-0 px
    coords = np.array([[0, 0], [8000, 0], [8200, 0]])
    store.save(tmp_path / "a.h5", np.zeros((3, 2), np.float32), coords, attrs={"mpp": 0.5, "tile_size": 256},
               coords_attrs={"patch_size_level0": 512.0, "level0_mpp": 0.25})
    ff = store.load(tmp_path / "a.h5")
    assert level0_mpp(ff) == 0.25
    r = regions_of(ff, 4096, 0.5)
    assert [m.tolist() for m in r.members] == [[0, 1], [2]] and r.grid == 16


def test_prototype_distill_loss_known_values():
    k = 5
    # uniform student -> cross-entropy log K whatever the teacher
    s = torch.zeros(3, k)
    t = torch.randn(3, k)
    assert prototype_distill_loss(s, t).item() == pytest.approx(math.log(k), abs=1e-6)
    # one-hot-like teacher on class 2, student logits l: loss = -log_softmax(l / 0.1)[2]
    t = torch.full((1, k), -1e4)
    t[0, 2] = 0
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.0, 0.0]])
    expect = -torch.log_softmax(logits / 0.1, -1)[0, 2].item()
    assert prototype_distill_loss(logits, t).item() == pytest.approx(expect, rel=1e-6)
    assert prototype_distill_loss(torch.zeros(0, k), torch.zeros(0, k)).item() == 0.0
    # centring by the teacher's own logits makes the target uniform: loss = mean_k -log_softmax(logits / 0.1)_k
    expect = -torch.log_softmax(logits / 0.1, -1).mean().item()
    assert prototype_distill_loss(logits, t, center=t).item() == pytest.approx(expect, rel=1e-6)


def test_dino_loss_known_value():
    from lightly.loss import DINOLoss

    loss = DINOLoss(output_dim=7, warmup_teacher_temp_epochs=1)
    zeros = [torch.zeros(4, 7)] * 2
    # teacher uniform after centring, student uniform -> log 7
    assert loss(zeros, zeros + [torch.zeros(4, 7)], epoch=0).item() == pytest.approx(math.log(7), abs=1e-5)


def test_set_distance_and_matching_known():
    e = np.eye(4)
    a = e[:2]
    assert set_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)  # permutation-invariant
    assert set_distance(a, e[2:]) == pytest.approx(1.0)  # orthogonal sets
    b = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0]])  # one of two matches
    assert set_distance(a, b) == pytest.approx(0.5)
    protos = [a, e[2:], b, None]
    assert nearest_slides(protos).tolist() == [2, 2, 0, -1]
    assert assign_nearest(np.array([[0.9, 0.1, 0, 0], [0, 0, 0, 1.0]]), e[[0, 3]]).tolist() == [0, 1]


def test_slide_prototypes_kmeans_and_skip():
    rng = np.random.default_rng(0)
    emb = np.concatenate([np.array([10, 0, 0]) + rng.normal(size=(10, 3)), np.array([0, 10, 0]) + rng.normal(size=(10, 3))])
    centres, labels = slide_prototypes(emb, 2)
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1 and labels[0] != labels[10]
    assert np.allclose(np.linalg.norm(centres, axis=1), 1.0)
    assert sorted(np.argmax(centres, axis=1).tolist()) == [0, 1]
    assert slide_prototypes(emb[:3], 2) is None  # fewer than 2k regions: skipped


def test_region_vit_masking():
    torch.manual_seed(0)
    vit = RegionViT(6, dim=12, depth=1, heads=2, grid=2).eval()
    f = torch.randn(1, 4, 6)
    p = torch.tensor([[0, 1, 2, 3]])
    m = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(vit(f, p, m), vit(f[:, :2], p[:, :2], m[:, :2]), rtol=1e-5, atol=1e-5)


KW = dict(region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
          head_dim=64, n_local=2, log=lambda *a: None)


def test_pretrain_slpd_resume_and_embed(tmp_path, make_fake_cache):
    # 6 slides of 36 tiles of 64 px at 0.5 µm/px; regions of 128 µm = 4x4 tiles -> 4 regions per slide
    feats = make_fake_cache(tmp_path / "f", n_slides=6, n_tiles=36)
    full = pretrain_slpd(feats, tmp_path / "a", epochs=3, **KW)
    h = full["history"]
    assert h[0]["intra"] is None and h[1]["intra"] is not None and h[1]["inter"] is not None
    part = pretrain_slpd(feats, tmp_path / "b", epochs=3, stop_after=2, **KW)
    assert not part["finished"]
    pretrain_slpd(feats, tmp_path / "b", epochs=3, **KW)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    e = embed_slides(tmp_path / "a", feats, tmp_path / "emb.h5")
    assert e.embeddings.shape == (6, 16) and np.isfinite(e.embeddings).all()
    assert e.attrs["method"] == "slpd"

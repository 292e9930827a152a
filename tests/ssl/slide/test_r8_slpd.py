"""Round 8, mutation testing of SLPD: each test pins a rule a subtle slip would break silently (teacher EMA direction,
teacher-temperature warm-up, input standardisation, prototype scale and the inter-slide partner's prototypes, the
collapse verdict written with the embeddings), against values derived by hand or from the papers' formulas."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.regions import group_regions
from gigaslide.ssl.slide.slpd import RegionViT, pretrain_slpd, prototype_targets

KW = dict(region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
          head_dim=64, n_local=2, device="cpu", log=lambda *a: None)


def test_the_region_encoder_standardises_its_input_with_the_cohort_statistics():
    """RegionViT(x) with the cohort's mean / sd in its buffers is the same network without them on (x - mean) / sd."""
    torch.manual_seed(0)
    vit = RegionViT(6, dim=12, depth=1, heads=2, grid=2).eval()
    plain = copy.deepcopy(vit)
    mean, sd = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 10.0]), torch.tensor([0.5, 2.0, 1.0, 4.0, 0.1, 3.0])
    vit.in_mean.copy_(mean)
    vit.in_std.copy_(sd)
    f = torch.randn(2, 4, 6) * sd + mean
    p, m = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), torch.tensor([[True] * 4, [True, True, True, False]])
    with torch.no_grad():
        torch.testing.assert_close(vit(f, p, m), plain((f - mean) / sd, p, m))
        assert not torch.allclose(vit(f, p, m), plain(f, p, m), atol=1e-3)


def test_the_region_encoder_reads_each_tiles_lattice_cell():
    """Tiles listed in another order with their cells give the same embedding; the same tiles on swapped cells do not
    (a ViT without the position embedding, or reading another tile's, is blind to the region's layout)."""
    torch.manual_seed(0)
    vit = RegionViT(5, dim=12, depth=1, heads=2, grid=2).eval()
    torch.nn.init.normal_(vit.pos, std=1.0)  # trained-size position embeddings
    f, p, m = torch.randn(1, 4, 5), torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4, dtype=torch.bool)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(vit(f[:, perm], p[:, perm], m), vit(f, p, m), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(vit(f, p[:, perm], m), vit(f, p, m), atol=1e-3)


def _weights(run):  # noqa: ANN001, ANN202
    return load_file(str(run / "model.safetensors"))


def test_the_teacher_is_an_ema_of_the_student(tmp_path, make_fake_cache):
    """teacher <- m * teacher + (1 - m) * student after each step: at m = 0 the exported teacher is the trained
    student; at m = 1 it stays at the initialisation (that of a run with lr 0, where nothing moves); an EMA pulling
    the student towards the teacher instead exports the initialisation at m = 0 too."""
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    for name, kw in (("m0", dict(momentum=0.0)), ("m1", dict(momentum=1.0)), ("still", dict(momentum=0.5, lr=0.0))):
        pretrain_slpd(feats, tmp_path / name, epochs=1, losses="dino", **{**KW, **kw})
    init, m0, m1 = _weights(tmp_path / "still"), _weights(tmp_path / "m0"), _weights(tmp_path / "m1")
    student = runs.load_checkpoint(tmp_path / "m0")["student"]
    assert m0.keys() == init.keys() == m1.keys()
    assert all(torch.equal(m0[k], student["backbone." + k]) for k in m0)
    assert all(torch.equal(m1[k], init[k]) for k in m1)
    assert not all(torch.equal(m0[k], init[k]) for k in m0)  # (the student did move)


@pytest.mark.parametrize("epochs_warm, want", [(3, [0.04, 0.055, 0.07, 0.07]), (0, [0.07, 0.07, 0.07, 0.07]),
                                               (1, [0.04, 0.07, 0.07, 0.07])])
def test_teacher_temperature_schedule(tmp_path, make_fake_cache, epochs_warm, want):
    """DINO's schedule (Caron et al. 2021, ``np.linspace(warmup_teacher_temp, teacher_temp, E)`` then teacher_temp):
    linear from warmup_teacher_temp at epoch 0 to teacher_temp at epoch E - 1 (E = teacher_temp_epochs), then
    constant; E = 0 is no warm-up, teacher_temp from the first epoch (it ran its first epoch at 0.04, as E = 1)."""
    feats = make_fake_cache(tmp_path / "f", n_slides=2, n_tiles=36)
    res = pretrain_slpd(feats, tmp_path / "run", epochs=4, losses="dino", warmup_teacher_temp=0.04, teacher_temp=0.07,
                        teacher_temp_epochs=epochs_warm, **KW)
    assert [h["teacher_temp"] for h in res["history"]] == pytest.approx(want, abs=1e-7)


class _MeanTile(torch.nn.Module):
    """A region 'encoder' returning the mean of its tiles: region embeddings are then known vectors."""

    grid = 1

    def forward(self, f, p, m):  # noqa: ANN001, ANN201
        return (f * m[..., None]).sum(1) / m.sum(1, keepdim=True)


def _unit(*v):  # noqa: ANN002, ANN202
    v = np.array(v, np.float64)
    return v / np.linalg.norm(v)


def test_prototype_targets_are_the_slides_centres_at_its_norm_and_the_partners_nearest():
    """Three slides of 4 one-tile regions, two directions each: A = 2 x (e0, e0, e1, e1), B = 3 x (u, u, e2, e2) with
    u = (1, .1, 0, 0) / |.|, C = (e2, e2, w, w) with w = (.1, 0, 0, 1) / |.|. Prototypes: the two directions at the
    slide's mean embedding norm (2, 3, 1). Set distances (mean 1 - cos of the best matching): A-B .5025, A-C .95,
    B-C .4505: partners A -> B, B -> C, C -> B. A region's inter target: the partner's prototype most similar to it."""
    e = np.eye(4)
    u, w = _unit(1, 0.1, 0, 0), _unit(0.1, 0, 0, 1)
    embs = [2 * np.stack([e[0], e[0], e[1], e[1]]), 3 * np.stack([u, u, e[2], e[2]]), np.stack([e[2], e[2], w, w])]
    coords = np.array([[0, 0], [256, 0], [512, 0], [768, 0]])
    slides = [(sid, x.astype(np.float32), group_regions(coords, 256.0, 256.0)) for sid, x in zip("ABC", embs)]
    got = prototype_targets(_MeanTile(), slides, 2, torch.device("cpu"), seed=0)
    intra = [[2 * e[0]] * 2 + [2 * e[1]] * 2, [3 * u] * 2 + [3 * e[2]] * 2, [e[2]] * 2 + [w] * 2]
    inter = [[3 * u] * 4, [w] * 2 + [e[2]] * 2, [3 * e[2]] * 2 + [3 * u] * 2]
    for s in range(3):
        for r in range(4):
            np.testing.assert_allclose(got["intra"][(s, r)], intra[s][r], atol=1e-6)
            np.testing.assert_allclose(got["inter"][(s, r)], inter[s][r], atol=1e-6)


def test_embeddings_record_whether_the_slpd_run_collapsed(tmp_path, make_fake_cache):
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    pretrain_slpd(feats, tmp_path / "ok", epochs=2, losses="dino", **KW)
    pretrain_slpd(feats, tmp_path / "hot", epochs=2, warmup_teacher_temp=100.0, teacher_temp=100.0, **KW)
    ok = embed_slides(tmp_path / "ok", feats, tmp_path / "ok.h5", device="cpu").attrs
    hot = embed_slides(tmp_path / "hot", feats, tmp_path / "hot.h5", device="cpu").attrs
    assert (ok["collapsed"], ok.get("collapse_kind")) == (0, None)
    assert (hot["collapsed"], hot["collapse_kind"]) == (1, "uniform")


def test_the_slpd_learning_rate_follows_the_steps_not_the_epochs(tmp_path, make_fake_cache):
    """4 slides of 4 regions, 8 regions per step: 2 steps an epoch, 2 epochs, 1 of warm-up: the last step (3) runs at
    0.5 * (1 + cos(pi * (3 - 2) / 2)) = 0.5 of the base rate (by epoch, lr_at(1, 4, 2): the full rate)."""
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    pretrain_slpd(feats, tmp_path / "run", epochs=2, losses="dino", **{**KW, "batch_size": 8, "lr": 0.01})
    ck = runs.load_checkpoint(tmp_path / "run")
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005, rel=1e-9)


def test_level0_resolution_from_the_tile_size_when_the_file_does_not_state_it(tmp_path):
    """256 px tiles at 0.5 µm/px spanning 512 level-0 px: level 0 is 0.5 * 256 / 512 = 0.25 µm/px (a file stating its
    level0_mpp is taken at its word)."""
    from gigaslide.features import store
    from gigaslide.ssl.slide.regions import level0_mpp

    coords = np.array([[0, 0], [512, 0]])
    store.save(tmp_path / "a.h5", np.zeros((2, 3), np.float32), coords, attrs={"mpp": 0.5, "tile_size": 256},
               coords_attrs={"patch_size_level0": 512.0})
    assert level0_mpp(store.load(tmp_path / "a.h5")) == pytest.approx(0.25)
    store.save(tmp_path / "b.h5", np.zeros((2, 3), np.float32), coords, attrs={"mpp": 0.5, "tile_size": 256},
               coords_attrs={"patch_size_level0": 512.0, "level0_mpp": 0.2431})
    assert level0_mpp(store.load(tmp_path / "b.h5")) == 0.2431


def test_an_slpd_slide_embedding_is_the_mean_of_its_region_embeddings(tmp_path):
    """Tiles a = (1, 0), b = (3, 0) in region 0 and c = (0, 4) in region 1 (regions of 512 level-0 px): with a
    mean-of-tiles region encoder the regions are (2, 0) and (0, 4), the slide their mean (1, 2), not the tiles' mean
    nor the first region."""
    from gigaslide.features import store
    from gigaslide.ssl.slide.slpd import embed_regions

    coords = np.array([[0, 0], [256, 0], [512, 0]])
    store.save(tmp_path / "s.h5", np.array([[1, 0], [3, 0], [0, 4]], np.float32), coords,
               attrs={"mpp": 0.5, "tile_size": 256}, coords_attrs={"patch_size_level0": 256.0, "level0_mpp": 0.5})
    cfg = {"data": {"region_size": 512, "region_mpp": 0.5}}
    np.testing.assert_allclose(embed_regions(_MeanTile(), store.load(tmp_path / "s.h5"), cfg), [1.0, 2.0], atol=1e-6)

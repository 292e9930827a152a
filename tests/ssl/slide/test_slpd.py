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
from gigaslide import runs
from gigaslide.ssl.slide.export import read_config
from gigaslide.ssl.slide.regions import grid_crop, group_regions, level0_mpp, pack, regions_of
from gigaslide.ssl.slide.slpd import (RegionViT, _pack_items, collapse_verdict, load_encoder, load_slides,
                                      pretrain_slpd, region_embeddings, slide_partners, teacher_stats)


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


def test_overlapping_tiles_get_their_own_lattice_cells(tmp_path):
    """Tiles overlapping by half step by half a side: the lattice is twice as fine, no two tiles share a cell."""
    k = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2)
    store.save(tmp_path / "a.h5", np.zeros((64, 2), np.float32), k * 256, attrs={"mpp": 0.5, "tile_size": 256, "overlap": 128},
               coords_attrs={"patch_size_level0": 512.0, "level0_mpp": 0.25})
    r = regions_of(store.load(tmp_path / "a.h5"), 4096, 0.5)  # 8192 level-0 px: one region, lattice side 32
    assert len(r) == 1 and r.grid == 32
    np.testing.assert_array_equal(r.local[0], k)


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


def test_teacher_monitor_and_collapse_verdict_known_values():
    k = 4
    zeros = [torch.zeros(4, k)] * 2
    st = teacher_stats(zeros, zeros, torch.zeros(1, 1, k), temp=0.04)
    assert st["teacher_entropy"] == pytest.approx(1.0) and st["teacher_batch_entropy"] == pytest.approx(1.0)
    assert st["kl"] == pytest.approx(0.0, abs=1e-6) and collapse_verdict(st) == "uniform"
    one = torch.full((4, k), -10.0)
    one[:, 2] = 10.0  # every sample on output 2
    st = teacher_stats([one, one], [one, one], torch.zeros(1, 1, k), temp=0.04)
    assert st["teacher_entropy"] < 1e-3 and st["teacher_batch_entropy"] < 1e-3 and collapse_verdict(st) == "single-output"
    diverse = torch.eye(k) * 20 - 10  # sample i on output i: sharp and spread, no collapse
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.0]]).repeat(k, 1)
    st = teacher_stats([diverse], [logits], torch.zeros(1, 1, k), temp=0.04)
    assert st["teacher_entropy"] < 1e-3 and st["teacher_batch_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert collapse_verdict(st) is None
    expect = float(np.mean([-torch.log_softmax(logits[0] / 0.1, -1)[i].item() for i in range(k)]))
    assert st["kl"] == pytest.approx(expect, rel=1e-4)  # KL(one-hot || s) = -log s at the hot output
    # the centre is subtracted before sharpening: centring on the outputs themselves leaves a uniform teacher
    st = teacher_stats([one], [one], one.mean(0, keepdim=True)[None], temp=0.04)
    assert st["teacher_entropy"] == pytest.approx(1.0)


def test_grid_crops_are_contiguous_non_empty_sub_grids():
    rng = np.random.default_rng(0)
    grid = 6
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(50, grid * grid, generator=g) < 0.6
    mask[:, 0] = True
    lattice = torch.arange(grid * grid).expand(50, -1)
    for side, max_side in (((0.5, 1.0), 6), ((0.2, 0.45), 3)):
        crop = grid_crop(lattice, mask, grid, side, rng)
        assert (crop & ~mask).sum() == 0 and crop.any(dim=1).all()
        for r in range(50):
            idx = torch.nonzero(crop[r]).squeeze(1)
            x, y = idx % grid, idx // grid
            assert int(x.max() - x.min()) < max_side and int(y.max() - y.min()) < max_side
    small = grid_crop(lattice, mask, grid, (0.2, 0.45), rng).sum(1).float().mean()
    big = grid_crop(lattice, mask, grid, (0.5, 1.0), rng).sum(1).float().mean()
    assert small < big / 2


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


def _planted(folder, write, n_pairs=3, regions=8, dim=12, seed=0):
    """Slides in pairs; both slides of pair j hold regions of the same two planted types (2j, 2j+1),
    4 x 4 tiles of 64 px per region (128 µm at 0.5 µm/px). Returns (folder, per-slide region types)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(2 * n_pairs, dim))
    kinds = []
    for s in range(2 * n_pairs):
        types = np.array([2 * (s // 2) + (r % 2) for r in range(regions)])
        write(folder / f"s{s}.h5", f"s{s}", types, dim, means, rng)
        kinds.append(types)
    return folder, kinds


def test_prototypes_recover_planted_region_types_and_the_right_partner(tmp_path, planted_slide):
    from sklearn.metrics import adjusted_rand_score

    feats, kinds = _planted(tmp_path / "f", planted_slide)
    res = pretrain_slpd(feats, tmp_path / "run", epochs=3, **KW)
    assert res["finished"] and len(res["history"]) == 3
    backbone, _ = load_encoder(tmp_path / "run")
    _, slides = load_slides(feats, 256, 0.5)
    order = [int(sid[1:]) for sid, _, _ in slides]
    _, fits, _, partner = slide_partners(backbone, slides, 2, torch.device("cpu"), seed=0)
    for i, fit in enumerate(fits):
        regs = slides[i][2]
        truth = [kinds[order[i]][int(o[1] // 256 * 4 + o[0] // 256)] for o in regs.origins]
        assert adjusted_rand_score(truth, fit[1]) == pytest.approx(1.0)
    # each slide's inter-slide partner is the other slide of its pair
    assert [order[j] // 2 for j in partner] == [order[i] // 2 for i in range(len(order))]
    assert all(order[j] != order[i] for i, j in enumerate(partner))


def test_pretrain_slpd_resume_embed_and_region_export(tmp_path, make_fake_cache):
    # 6 slides of 36 tiles of 64 px at 0.5 µm/px; regions of 128 µm = 4x4 tiles -> 4 regions per slide
    feats = make_fake_cache(tmp_path / "f", n_slides=6, n_tiles=36)
    full = pretrain_slpd(feats, tmp_path / "a", epochs=3, **KW)
    h = full["history"]
    assert h[0]["intra"] is None and h[1]["intra"] is not None and h[1]["inter"] is not None
    assert all(0 <= x["teacher_entropy"] <= 1 and x["kl"] >= 0 for x in h)
    part = pretrain_slpd(feats, tmp_path / "b", epochs=3, stop_after=2, **KW)
    assert not part["finished"]
    pretrain_slpd(feats, tmp_path / "b", epochs=3, **KW)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = runs.read_run(tmp_path / "b")
    assert rec["status"] == "finished" and rec["run_kind"] == "slpd" and "collapse" in rec
    e = embed_slides(tmp_path / "a", feats, tmp_path / "emb.h5", regions_out=tmp_path / "regions")
    assert e.embeddings.shape == (6, 16) and np.isfinite(e.embeddings).all()
    assert e.attrs["method"] == "slpd" and e.attrs["mpp"] == 0.5 and "collapsed" in e.attrs
    reg = store.load_dir(tmp_path / "regions")
    ff = reg["slide0"]
    assert len(ff) == 4 and ff.dim == 16 and ff.require_tile_size_level0() == pytest.approx(256.0)
    np.testing.assert_allclose(ff.features.mean(0), e.embeddings[e.slide_ids.index("slide0")], rtol=1e-5, atol=1e-6)


def test_dino_only_ablation_and_collapse_is_named(tmp_path, make_fake_cache, capsys):
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    d = pretrain_slpd(feats, tmp_path / "dino", epochs=2, **{**KW, "losses": "dino"})
    assert all(x["intra"] is None and x["inter"] is None for x in d["history"])
    # a teacher temperature of 100 makes the teacher uniform: the run must say it collapsed
    logs = []
    c = pretrain_slpd(feats, tmp_path / "hot", epochs=2, **{**KW, "warmup_teacher_temp": 100.0, "teacher_temp": 100.0,
                                                              "log": logs.append})
    assert c["collapse"] == "uniform" and any("COLLAPSED" in m for m in logs)
    rec = runs.read_run(tmp_path / "hot")
    assert rec["collapse"]["collapsed"] and rec["summary"]["collapse_kind"] == "uniform"
    assert read_config(tmp_path / "dino")["collapse"]["collapsed"] is False
    with pytest.raises(GigaslideError, match="--losses"):
        pretrain_slpd(feats, tmp_path / "x", epochs=1, **{**KW, "losses": "intra"})


def test_float16_features_stay_float16_and_input_stats_cover_every_tile(tmp_path, planted_slide):
    feats, _ = _planted(tmp_path / "f", planted_slide, n_pairs=2)
    half = tmp_path / "half"
    half.mkdir()
    for p in sorted(feats.glob("*.h5")):  # the same cohort, stored as float16 (encode's default)
        ff = store.load(p)
        keep = ("encoder", "encoder_weights_sha256", "mpp", "tile_size", "slide_id")
        store.save(half / p.name, ff.features.astype(np.float16), ff.coords, attrs={k: ff.attrs[k] for k in keep},
                   coords_attrs={"patch_size_level0": 64.0, "level0_mpp": 0.5})
    _, slides = load_slides(half, 256, 0.5)
    assert all(f.dtype == np.float16 for _, f, _ in slides)  # no float32 copy of the cohort is held
    res = pretrain_slpd(half, tmp_path / "run", epochs=1, **KW)
    assert res["finished"]
    backbone, _ = load_encoder(tmp_path / "run")
    allf = np.concatenate([f for _, f, _ in slides]).astype(np.float64)
    np.testing.assert_allclose(backbone.in_mean.numpy(), allf.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(backbone.in_std.numpy(), allf.std(0), rtol=1e-5)


def test_compact_crops_keep_the_encoder_output_and_drop_the_padding():
    from gigaslide.ssl.slide.regions import compact

    torch.manual_seed(0)
    grid, r, t, d = 4, 6, 16, 8
    feats = torch.randn(r, t, d)
    lattice = torch.arange(t).repeat(r, 1)
    mask = torch.rand(r, t) < 0.7
    mask[:, 0] = True
    crop = grid_crop(lattice, mask, grid, (0.2, 0.5), np.random.default_rng(0))
    f, p, m = compact(feats, lattice, crop)
    assert m.shape[1] == int(crop.sum(1).max()) < t  # only as long as the largest crop
    for i in range(r):  # each region's kept tiles, in order, then padding
        k = int(crop[i].sum())
        assert m[i, :k].all() and not m[i, k:].any()
        assert torch.equal(p[i, :k], lattice[i][crop[i]]) and torch.equal(f[i, :k], feats[i][crop[i]])
    enc = RegionViT(d, dim=16, depth=2, heads=2, grid=grid).eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(f, p, m), enc(feats, lattice, crop), atol=1e-5, rtol=1e-5)


def test_the_readme_flow_trains_mil_over_slpd_regions(tmp_path, make_fake_cache):
    """embed-slides --regions-out, then train-mil on the region folder: one instance per region, provenance kept."""
    from gigaslide.cli.main import main
    from gigaslide.evaluation.slides import read_predictions

    feats = make_fake_cache(tmp_path / "f", n_slides=10, n_tiles=36)
    pretrain_slpd(feats, tmp_path / "slpd", epochs=1, **KW)
    assert main(["embed-slides", "--model", str(tmp_path / "slpd"), "--features", str(feats), "--out",
                 str(tmp_path / "e.h5"), "--regions-out", str(tmp_path / "regions")]) == 0
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"slide{s},{s % 2}\n" for s in range(10)))
    assert main(["train-mil", "--features", str(tmp_path / "regions"), "--labels", str(tmp_path / "labels.csv"),
                 "--model", "abmil", "--folds", "2", "--epochs", "2", "--bootstrap", "50", "--out",
                 str(tmp_path / "mil")]) == 0
    pred = read_predictions(tmp_path / "mil" / "predictions.csv")
    assert sorted(pred.slide_ids) == sorted(f"slide{s}" for s in range(10))
    assert runs.read_run(tmp_path / "mil")["encoder"] == "slpd:slpd"  # the instances are that run's regions
    assert len(store.load(tmp_path / "regions" / "features" / "slide0.h5")) == 4  # 36 tiles -> 4 regions of 4x4


def _lattice_pair(tmp_path):
    """The same 4 x 4 tiles (512 level-0 px, 256 px at 0.5 µm/px) of one region in two files whose level-0 µm/px
    differ (0.25 and 0.243, as magnification-based tilers write them): the region of 4096 px at 0.5 µm/px is 16
    tiles wide in the first, 16.9 -> a lattice of 17 in the second; the tiles sit on the same (x, y) cells."""
    rng = np.random.default_rng(0)
    coords = np.array([[x * 512, y * 512] for y in range(4) for x in range(4)])
    feats = rng.normal(size=(16, 8)).astype(np.float32)
    out = []
    for name, l0 in (("a", 0.25), ("b", 0.243)):
        store.save(tmp_path / f"{name}.h5", feats, coords, attrs={"mpp": 0.5, "tile_size": 256, "slide_id": name},
                   coords_attrs={"patch_size_level0": 512, "level0_mpp": l0})
        ff = store.load(tmp_path / f"{name}.h5")
        out.append((ff, regions_of(ff, 4096, 0.5)))
    return out


def test_slides_with_lattices_of_other_sides_read_the_models_position_embeddings(tmp_path):
    """A cohort's slides can have region lattices of different sides; the model's is the largest. A tile's lattice
    index must be y * (the model's side) + x: with the slide's own side, the tile at (0, 1) of a 16-wide lattice read
    cell (16, 0) of the model's 17-wide one, and the same tiles got another region embedding."""
    (fa, ra), (fb, rb) = _lattice_pair(tmp_path)
    assert (ra.grid, rb.grid) == (16, 17) and all(np.array_equal(x, y) for x, y in zip(ra.local, rb.local))
    torch.manual_seed(0)
    vit = RegionViT(8, dim=16, depth=1, heads=2, grid=17)
    ea = region_embeddings(vit, fa.features, ra, torch.device("cpu"))
    eb = region_embeddings(vit, fb.features, rb, torch.device("cpu"))
    np.testing.assert_array_equal(ea, eb)
    loc = ra.local[0]
    _, p, _ = pack(fa.features, ra, [0], grid=17)
    assert p[0].tolist() == (loc[:, 1] * 17 + loc[:, 0]).tolist()
    _, p, _ = _pack_items([("a", fa.features, ra)], [(0, 0)], 17)  # what a training step packs
    assert p[0].tolist() == (loc[:, 1] * 17 + loc[:, 0]).tolist()
    small = RegionViT(8, dim=16, depth=1, heads=2, grid=4)  # cells beyond a model's lattice go to its last row / column
    _, p, _ = pack(fa.features, ra, [0], grid=small.grid)
    assert int(p.max()) == 15


def test_the_slide_embedding_does_not_depend_on_tile_order_or_region_batches(tmp_path):
    (fa, _), _ = _lattice_pair(tmp_path)
    rng = np.random.default_rng(1)
    coords = np.concatenate([fa.coords, fa.coords + [4 * 512, 0], fa.coords + [0, 4 * 512]])  # 3 regions
    feats = rng.normal(size=(48, 8)).astype(np.float32)
    perm = rng.permutation(48)
    torch.manual_seed(0)
    vit = RegionViT(8, dim=16, depth=1, heads=2, grid=4).eval()
    regs, regs_p = group_regions(coords, 512.0, 2048.0), group_regions(coords[perm], 512.0, 2048.0)
    e = region_embeddings(vit, feats, regs, torch.device("cpu"))
    np.testing.assert_allclose(region_embeddings(vit, feats[perm], regs_p, torch.device("cpu")), e, atol=1e-5)
    np.testing.assert_allclose(region_embeddings(vit, feats, regs, torch.device("cpu"), bs=1), e, atol=1e-5)
    assert not np.allclose(e[0], e[1], atol=1e-3)  # (the regions do differ)


def test_embed_slides_refuses_a_slide_without_tiles_naming_its_file(tmp_path, make_fake_cache, add_empty_slide):
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    pretrain_slpd(feats, tmp_path / "run", epochs=1, **KW)
    add_empty_slide(feats)
    with pytest.raises(GigaslideError, match="no tiles") as e:
        embed_slides(tmp_path / "run", feats, tmp_path / "e.h5")
    assert "empty.h5" in str(e.value) and not (tmp_path / "e.h5").exists()


def test_prototype_losses_that_cannot_act_are_named_not_silently_dropped(tmp_path, make_fake_cache):
    """dino+intra+inter on slides of 4 regions with 3 prototypes (6 regions needed), or a warm-up as long as the run:
    the run is DINO only; the log and run.json say so (the run used to look like the paper's objective)."""
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)  # 4 regions per slide
    logs: list[str] = []
    res = pretrain_slpd(feats, tmp_path / "few", epochs=2, **{**KW, "prototypes": 3, "log": logs.append})
    assert all(h["intra"] is None and h["inter"] is None for h in res["history"])
    assert any("no slide has the 6 regions" in m and "DINO only" in m for m in logs), logs
    assert runs.read_run(tmp_path / "few")["prototype_slides"] == {"with_prototypes": 0, "of": 4, "min_regions": 6}
    logs.clear()
    res = pretrain_slpd(feats, tmp_path / "warm", epochs=2, **{**KW, "warmup": 2, "log": logs.append})
    assert all(h["intra"] is None for h in res["history"])
    assert any("--warmup 2 >= --epochs 2" in m for m in logs), logs
    logs.clear()
    pretrain_slpd(feats, tmp_path / "ok", epochs=2, **{**KW, "log": logs.append})  # 2 prototypes: every slide has them
    assert not any(m.startswith("warning") for m in logs), logs


@pytest.mark.parametrize("opt, value, says", [("head_dim", 1, "--head-dim 1"),
                                              ("teacher_temp", 0.0, "--teacher-temp 0")])
def test_a_head_of_one_output_or_a_zero_teacher_temperature_is_refused(tmp_path, make_fake_cache, opt, value, says):
    """--head-dim 1 ended in a ZeroDivisionError traceback (the collapse monitor's log K); a teacher temperature of 0
    divides the teacher's logits by zero once its warm-up ends."""
    feats = make_fake_cache(tmp_path / "f", n_slides=2, n_tiles=36)
    with pytest.raises(GigaslideError, match=says):
        pretrain_slpd(feats, tmp_path / "run", epochs=1, **{**KW, opt: value})
    assert not (tmp_path / "run").exists()

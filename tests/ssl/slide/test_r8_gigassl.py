"""Round 8, mutation testing of Giga-SSL: each test pins a rule a subtle slip would break silently, against values
derived by hand (the dihedral group, cosine tables, the mean of identical views), not the code's own formula."""
import h5py
import numpy as np
import pytest
import torch

from gigaslide import runs
from gigaslide.features import store
from gigaslide.ssl.slide.encoders import build_slide_encoder
from gigaslide.ssl.slide.gigassl import embed_views, pretrain_gigassl
from gigaslide.ssl.slide.sampling import augment_grid, draw_pairs, view_retrieval
from gigaslide.ssl.slide.views import load_cache


def _dihedral_images(p: np.ndarray) -> set:
    """The 8 images of the point set ``p`` under the symmetries of the square (4 rotations, each with and without a
    mirror), each moved to its own per-axis top-left 0: written out as matrices, independently of augment_grid."""
    mats = [np.array(m) for m in ([[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
                                  [[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]])]
    out = set()
    for m in mats:
        q = p @ m.T
        out.add(tuple(sorted(map(tuple, (q - q.min(axis=0)).tolist()))))
    return out


def test_grid_augmentation_reaches_all_8_symmetries_of_the_square_with_each_axis_at_0():
    """An L-shaped view (no symmetry of its own) under augment_grid at scale 1: every one of the square's 8 symmetries
    appears, nothing else, and each view's top-left cell is (0, 0) on both axes (a transpose for the 90-degree turn
    reached only 4 of them; a shift by the overall minimum left one axis off 0, so stride-2 pooling paired its cells
    otherwise than embed-slides does)."""
    p = np.array([[0, 0], [1, 0], [2, 0], [0, 1]])
    want = _dihedral_images(p)
    assert len(want) == 8
    seen = set()
    for s in range(200):
        q = augment_grid(p + [5, 9], np.random.default_rng(s), scale=(1.0, 1.0))
        assert q.dtype == np.int64 and q.min(axis=0).tolist() == [0, 0]
        seen.add(tuple(sorted(map(tuple, q.tolist()))))
    assert seen == want


def _one_version_per_value(n_versions: int = 5, tiles: int = 10, dim: int = 3):
    """Cached views of one slide whose version v has features v + 0.01 * tile index (so a row names its version and
    tile), on a 10 x 1 line of cells starting at (4, 6)."""
    v = np.arange(n_versions)[:, None, None] + 0.01 * np.arange(tiles)[None, :, None] + np.zeros((1, 1, dim))
    pos = np.stack([np.arange(tiles) + 4, np.full(tiles, 6)], 1)[None].repeat(n_versions, 0)
    return [v.astype(np.float16)], [pos]


def test_a_pair_is_two_different_cached_versions_of_whole_tiles_without_repeats():
    """Two views of a slide come from two different cached augmented versions (the same version twice is no
    augmentation), and a view of as many tiles as cached holds each tile once."""
    views, pos = _one_version_per_value()
    rng = np.random.default_rng(0)
    versions = set()
    for _ in range(60):
        f0, p0, f1, p1 = draw_pairs(views, pos, np.array([0]), 10, rng, grid_augment=False)
        a, b = (np.floor(f[0, :, 0].numpy() + 1e-3) for f in (f0, f1))
        assert len(set(a)) == 1 and len(set(b)) == 1 and a[0] != b[0]
        versions |= {int(a[0]), int(b[0])}
        for f, p in ((f0, p0), (f1, p1)):
            tile = np.rint((f[0, :, 0].numpy() - np.floor(f[0, :, 0].numpy() + 1e-3)) * 100).astype(int)
            assert sorted(tile.tolist()) == list(range(10))  # every tile once, no duplicate
            # without grid augmentation a tile keeps its place, the view's top-left moved to 0 on each axis
            assert p[0].tolist() == [[int(t), 0] for t in tile]
    assert versions == set(range(5))


class _FirstTile(torch.nn.Module):
    """A slide 'encoder' returning the first tile's features: the monitor then scores known vectors."""

    def forward(self, f, p):  # noqa: ANN001, ANN201
        return f[:, 0, :]


def test_view_retrieval_on_a_hand_computed_cosine_table():
    """z0 = the identity, z1 rows (0.6, 0, 0.8), (0, 1, 0), (0, 0, 1): cosines [[.6, 0, 0], [0, 1, 0], [.8, 0, 1]].
    Each row's best column is its own (top-1 = 1; by columns, column 0 would pick row 2); the mean positive is
    2.6 / 3, the mean of the 6 off-diagonal cosines 0.8 / 6: gap 11 / 15."""
    z0 = torch.eye(3)[:, None, :]
    z1 = torch.tensor([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[:, None, :] * 5.0  # norms do not matter
    pos = torch.zeros(3, 1, 2, dtype=torch.long)
    got = view_retrieval(_FirstTile(), (z0, pos, z1, pos), torch.device("cpu"))
    assert got["retrieval_top1"] == 1.0
    assert got["cosine_gap"] == pytest.approx(11 / 15, abs=1e-6)


def test_a_slide_embedding_averages_its_views():
    """With a view as large as the slide, every view holds all tiles (once each): an order-free encoder gives every view
    the slide's own output, and their average is that output, whatever --ensemble is (not their sum, and no view
    with a tile twice)."""
    torch.manual_seed(0)
    enc = build_slide_encoder("mean", in_dim=6, out_dim=5, hidden=8).eval()
    r = np.random.default_rng(0)
    feats = r.normal(size=(9, 6)).astype(np.float32)
    pos = np.stack([np.arange(9) % 3, np.arange(9) // 3], 1).astype(np.int64)
    with torch.no_grad():
        alone = enc(torch.from_numpy(feats)[None], torch.from_numpy(pos)[None])[0].numpy()
    for ensemble in (1, 3, 7):
        got = embed_views(enc, feats, pos, ensemble=ensemble, tiles_per_view=9, rng=np.random.default_rng(ensemble))
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)
    more = embed_views(enc, feats, pos, ensemble=3, tiles_per_view=50, rng=np.random.default_rng(0))  # 50 > 9 tiles
    np.testing.assert_allclose(more, alone, rtol=1e-5, atol=1e-6)


KW = dict(out_dim=16, hidden=16, proj_dim=8, batch_size=4, lr=1e-3, tiles_per_step=4, blocks=1, warmup_epochs=1,
          device="cpu", log=lambda *a: None)


def test_cached_view_positions_are_the_tiles_lattice_cells(fake_cache):
    """The fake cache's tiles sit at level-0 (64 gx, 64 gy) with 64 px tiles: a view tile's position is (gx, gy), in
    that order (the file's top-left tile at 0), not merely a cell within the lattice's range."""
    vc = load_cache(fake_cache)
    for sid, p in zip(vc.slide_ids, vc.pos):
        with h5py.File(fake_cache / "features" / f"{sid}.h5") as f:
            vcoords = f["view_coords"][:]
        assert p.dtype == np.int64 and p.shape == vcoords.shape
        np.testing.assert_array_equal(p, vcoords // 64)


def test_embed_slides_places_tiles_on_their_grid_cells(fake_cache, tmp_path):
    """One view of every tile: the embedding is the encoder on all tiles at their cells ((level-0 corner) / 64 px here),
    up to float rounding (the encoder is order-free) -- not at raw level-0 pixels, where no tile has a neighbour."""
    from gigaslide.ssl.slide.embed import embed_slides
    from gigaslide.ssl.slide.gigassl import load_encoder

    from safetensors.torch import save_file

    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **KW)
    enc, _ = load_encoder(tmp_path / "run")
    for block in enc.blocks:  # a block that mixes neighbours as a trained one does (it starts as the identity)
        torch.nn.init.ones_(block.norm2.weight)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "run" / "model.safetensors"))
    e = embed_slides(tmp_path / "run", fake_cache, tmp_path / "e.h5", ensemble=1, tiles_per_view=20, device="cpu")
    for sid, row in zip(e.slide_ids, e.embeddings):
        ff = store.load(fake_cache / "features" / f"{sid}.h5")
        cells = torch.from_numpy(ff.coords // 64)
        with torch.no_grad():
            want = enc(torch.from_numpy(ff.features)[None], cells[None])[0].numpy()
            at_pixels = enc(torch.from_numpy(ff.features)[None], torch.from_numpy(ff.coords.astype(np.int64))[None])[0]
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-5)
        assert not np.allclose(at_pixels.numpy(), want, atol=1e-2)  # (the cells matter)


def test_the_learning_rate_follows_the_steps_not_the_epochs(fake_cache, tmp_path):
    """6 slides, 4 per step: 2 steps an epoch, 2 epochs, 1 of warm-up: steps 0-1 warm up, steps 2-3 decay by cosine
    to 0 at step 4; the last step (3) runs at 0.5 * (1 + cos(pi / 2)) = 0.5 of the base rate (by epoch: 1.0)."""
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=2, **{**KW, "lr": 0.01})
    ck = runs.load_checkpoint(tmp_path / "run")
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005, rel=1e-9)


def test_a_slide_cached_with_replacement_is_reported_by_pretraining(fake_cache, tmp_path):
    """augment-cache flags a slide whose views repeat tiles (``with_replacement``): pretraining names it in its warning
    and in run.json, even where its views have as many tiles as a step draws."""
    with h5py.File(fake_cache / "features" / "slide2.h5", "a") as f:
        f.attrs["with_replacement"] = 1
    logs = []
    pretrain_gigassl(fake_cache, tmp_path / "run", epochs=1, **{**KW, "log": logs.append})
    assert any("1 slide(s) have fewer tiles than a view needs" in m and "slide2" in m for m in logs), logs
    assert runs.read_run(tmp_path / "run")["few_tiles"] == ["slide2"]

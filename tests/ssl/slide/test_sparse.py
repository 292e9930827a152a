"""SparseConvMIL: the submanifold conv is exact against a dense conv2d on the scattered grid."""
import pytest
import torch

from gigaslide.ssl.slide.encoders import SLIDE_ENCODERS, build_slide_encoder
from gigaslide.ssl.slide.sparse import (SubmanifoldConv2d, dense_reference, neighbour_index,
                                        segment_max, segment_mean, sparse_max_pool)



def _sites(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(h * w, generator=g)[:n]
    return torch.stack([flat % w, flat // w], dim=1)  # (x, y)


@pytest.mark.parametrize("k,seed,shape", [(3, 0, (6, 7)), (5, 1, (9, 4)), (1, 2, (5, 5)), (3, 3, (1, 12))])
def test_submanifold_conv_matches_dense_conv2d(k, seed, shape):
    torch.manual_seed(seed)
    h, w = shape
    pos = _sites(min(17, h * w - 1), h, w, seed) + torch.tensor([5, -3])  # offset: any integer origin
    feats = torch.randn(len(pos), 4, dtype=torch.float64)
    conv = SubmanifoldConv2d(4, 3, k).double()
    nbr = neighbour_index(pos, torch.zeros(len(pos), dtype=torch.long), k)
    out = conv(feats, nbr)
    ref = dense_reference(feats, pos, conv)
    assert out.shape == (len(pos), 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_submanifold_conv_under_bf16_autocast_and_with_no_sites():
    torch.manual_seed(0)
    pos = _sites(12, 5, 5, 0)
    feats = torch.randn(len(pos), 8)
    conv = SubmanifoldConv2d(8, 6, 3)
    nbr = neighbour_index(pos, torch.zeros(len(pos), dtype=torch.long), 3)
    ref = dense_reference(feats, pos, conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # products in bf16, summed in one dtype
        out = conv(feats, nbr)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    empty = conv(feats[:0], neighbour_index(pos[:0], torch.zeros(0, dtype=torch.long), 3))
    assert empty.shape == (0, 6)


def test_batches_do_not_see_each_other():
    pos = torch.tensor([[0, 0], [1, 0], [0, 0], [1, 0]])
    batch = torch.tensor([0, 0, 1, 1])
    nbr = neighbour_index(pos, batch, 3)
    # centre offset (index 4) is the site itself; right neighbour (index 5) is in the same bag
    assert nbr[:, 4].tolist() == [0, 1, 2, 3]
    assert nbr[0, 5].item() == 1 and nbr[2, 5].item() == 3
    assert nbr[1, 3].item() == 0 and nbr[3, 3].item() == 2
    assert (nbr[:, [0, 1, 2, 6, 7, 8]] == -1).all()


def test_segment_pooling():
    x = torch.tensor([[1.0], [3.0], [5.0]])
    b = torch.tensor([0, 0, 2])
    assert segment_mean(x, b, 3).squeeze(1).tolist() == [2.0, 0.0, 5.0]
    assert segment_max(x, b, 3).squeeze(1).tolist() == [3.0, 0.0, 5.0]


def test_sparse_max_pool_merges_2x2_cells_per_bag():
    x = torch.tensor([[1.0], [5.0], [2.0], [7.0], [3.0]])
    pos = torch.tensor([[0, 0], [1, 1], [2, 0], [0, 0], [3, 1]])
    batch = torch.tensor([0, 0, 0, 1, 0])
    out, p, b = sparse_max_pool(x, pos, batch)
    got = {(int(bb), int(pp[0]), int(pp[1])): float(v) for v, pp, bb in zip(out[:, 0], p, b)}
    assert got == {(0, 0, 0): 5.0, (0, 1, 0): 3.0, (1, 0, 0): 7.0}  # bags never merge


@pytest.mark.parametrize("name,kw", [("sparseconvmil", {}), ("sparseconvmil", {"blocks": 3, "norm": "layer"}),
                                     ("sparseconvmil", {"blocks": 2, "norm": "none", "downsample": False}),
                                     ("abmil", {}), ("mean", {})])
def test_slide_encoders_shapes_and_mask(name, kw):
    torch.manual_seed(0)
    enc = build_slide_encoder(name, in_dim=8, out_dim=16, hidden=12, **kw).eval()
    feats = torch.randn(2, 5, 8)
    pos = torch.stack([torch.arange(5), torch.zeros(5, dtype=torch.long)], 1).expand(2, 5, 2)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = enc(feats, pos, mask)
    assert out.shape == (2, 16)
    # masked-out tiles do not change the output: same as the bag truncated to its valid tiles
    alone = enc(feats[1:, :3], pos[1:, :3], None)
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)
    assert set(SLIDE_ENCODERS.names()) >= {"sparseconvmil", "abmil", "mean"}


def test_sparseconvmil_uses_geometry():
    torch.manual_seed(0)
    enc = build_slide_encoder("sparseconvmil", in_dim=4, out_dim=6, hidden=8).eval()
    assert len(enc.blocks) == 2 and sum(isinstance(m, torch.nn.BatchNorm1d) for m in enc.modules()) == 4
    feats = torch.randn(1, 4, 4)
    line = torch.tensor([[[0, 0], [1, 0], [2, 0], [3, 0]]])
    spread = torch.tensor([[[0, 0], [5, 0], [10, 0], [15, 0]]])
    assert not torch.allclose(enc(feats, line), enc(feats, spread))
    mean = build_slide_encoder("mean", in_dim=4, out_dim=6, hidden=8).eval()
    torch.testing.assert_close(mean(feats, line), mean(feats, spread))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_normalised_residual_block_starts_as_the_identity(norm):
    """The last norm's scale is zero-initialised, so a fresh block passes its (post-ReLU) input through
    unchanged; with the default unit scale its conv branch (random weights over random neighbourhoods)
    swamps the tile features, and Giga-SSL on real mosaic views learned nothing (view retrieval fell below
    the untrained encoder's)."""
    from gigaslide.ssl.slide.encoders import SparseBasicBlock

    torch.manual_seed(0)
    block = SparseBasicBlock(8, 3, norm)
    pos = _sites(12, 5, 5, 0)
    h = torch.relu(torch.randn(len(pos), 8))
    nbr = neighbour_index(pos, torch.zeros(len(pos), dtype=torch.long), 3)
    for mode in (True, False):
        block.train(mode)
        torch.testing.assert_close(block(h, nbr), h)
    # ... and it is a block, not a constant identity: once its scale moves it mixes neighbours
    torch.nn.init.ones_(block.norm2.weight)
    assert not torch.allclose(block(h, nbr), h, atol=1e-3)

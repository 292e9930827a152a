"""Review round 8: post-processing thresholds, window stitching, per-tile counts and training crops, each against an
independent reference (a brute-force loop, a per-pixel formula, or the labelled mask itself)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from gigaslide.nuclei.data import Item, hv_maps
from gigaslide.nuclei.export import tile_counts
from gigaslide.nuclei.infer import predict_maps
from gigaslide.nuclei.postprocess import PostParams, _local_norm01, instance_types, instances


def test_a_nucleus_of_exactly_min_size_pixels_is_kept_and_one_pixel_less_is_not() -> None:
    """``min_size`` removes objects *smaller* than it (skimage's / HoVer-Net's ``remove_small_objects(min_size=10)``):
    a 2 x 5 blob (10 px, too thin for a marker after the opening: kept whole as its own marker) is one nucleus with
    exactly its pixels; a 9 px blob is gone."""
    hv = np.zeros((2, 20, 30), np.float32)
    p = np.zeros((20, 30), np.float32)
    p[3:5, 3:8] = 1.0  # 10 px
    p[12:15, 20:23] = 1.0  # 9 px
    inst = instances(p, hv, PostParams(min_size=10))
    want = np.zeros((20, 30), np.int32)
    want[3:5, 3:8] = 1
    np.testing.assert_array_equal(inst, want)


def test_local_scaling_uses_the_square_window_of_the_radius() -> None:
    """``(x - min) / (max - min)`` over the (2 r + 1)^2 window around each pixel (cut at the image's edge), 0 where
    the window is flat: a brute-force loop."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(13, 17))
    x[:4, :4] = 2.0  # a flat corner: span 0 in windows that see only it
    for r in (1, 3):
        want = np.zeros_like(x)
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                w = x[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1]
                span = w.max() - w.min()
                want[i, j] = (x[i, j] - w.min()) / span if span > 0 else 0.0
        np.testing.assert_allclose(_local_norm01(x, r), want, atol=1e-12)


def test_a_nucleus_mostly_called_background_takes_its_foreground_type() -> None:
    """HoVer-Net's rule: the most common type inside the nucleus, the next one where that is background. Here 6 of 9
    pixels say background, 2 type 2 and 1 type 1: type 2, with its mean probability over the whole nucleus."""
    inst = np.zeros((5, 5), np.int32)
    inst[1:4, 1:4] = 1
    nc = np.zeros((3, 5, 5), np.float32)
    nc[0] = 0.6
    nc[1] = 0.2
    nc[2] = 0.2
    nc[:, 1, 1] = (0.1, 0.2, 0.7)
    nc[:, 1, 2] = (0.2, 0.1, 0.7)
    nc[:, 2, 2] = (0.1, 0.5, 0.4)
    t, prob = instance_types(inst, nc)[1]
    assert t == 2 and prob == pytest.approx((0.7 + 0.7 + 0.4 + 6 * 0.2) / 9, rel=1e-6)


class _PixelModel(torch.nn.Module):
    """A "network" that reads each pixel on its own: NP logit 8 (r - 0.5), HV = (g, b), NC logits 3 (r, g, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.spec = SimpleNamespace(crop=None, n_types=2)
        self.encoder = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r = x[:, :1]
        return {"np": torch.cat([torch.zeros_like(r), 8 * (r - 0.5)], 1), "hv": x[:, 1:3].clone(), "nc": 3 * x}


@pytest.mark.parametrize(("tile", "margin", "batch"), [(64, 16, 3), (96, 8, 1)])
def test_overlapping_windows_stitch_every_pixel_from_its_own_input(tile: int, margin: int, batch: int) -> None:
    """With a per-pixel model the stitched maps are the per-pixel formula at every pixel: a window centre placed
    one pixel off, or an edge padding shifting the image, moves the maps against the image."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    npp, hv, nc = predict_maps(_PixelModel(), img, tile=tile, margin=margin, batch_size=batch)
    x = img.astype(np.float64) / 255.0
    np.testing.assert_allclose(npp, 1 / (1 + np.exp(-8 * (x[..., 0] - 0.5))), atol=1e-5)
    np.testing.assert_allclose(hv, np.moveaxis(x[..., 1:3], -1, 0), atol=1e-6)
    e = np.exp(3 * np.moveaxis(x, -1, 0))
    np.testing.assert_allclose(nc, e / e.sum(0), atol=1e-5)


def test_tile_counts_are_half_open_on_both_axes() -> None:
    """A centroid on a tile's right or bottom edge belongs to the next tile (tiles are [x0, x0 + side) like pixels),
    counted once; a brute-force loop over tiles and nuclei is the reference."""
    coords = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [30, 30]], np.int64)
    cents = np.array([[0.0, 0.0], [10.0, 5.0], [5.0, 10.0], [10.0, 10.0], [9.999, 9.999], [20.0, 3.0], [19.99, 19.99],
                      [3.0, 20.0]])
    areas = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    types = np.array([1, 2, 1, 2, 1, 1, 2, 2])
    got = tile_counts(coords, 10.0, cents, areas, types, 2)
    count, area, per = [], [], []
    for x0, y0 in coords:
        inside = [(k) for k, (cx, cy) in enumerate(cents) if x0 <= cx < x0 + 10 and y0 <= cy < y0 + 10]
        count.append(len(inside))
        area.append(np.mean(areas[inside]) if inside else 0.0)
        per.append([sum(types[k] == t for k in inside) for t in (1, 2)])
    assert got["count"].tolist() == count == [2, 1, 1, 2, 0]
    np.testing.assert_allclose(got["mean_area_um2"], area, rtol=1e-6)
    assert got["type_count"].tolist() == per


def test_training_crops_keep_the_targets_on_their_nuclei_through_flips_and_rotations() -> None:
    """Each augmented crop's NP target is its dark pixels (the nuclei drawn dark on white), and its HV target is
    :func:`hv_maps` of that mask's components: the image and its labels are flipped / rotated together."""
    from gigaslide.nuclei.train import sample_batch

    inst = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[0:64, 0:64]
    for k, (cy, cx, r) in enumerate([(10, 12, 5), (40, 20, 7), (20, 45, 4), (50, 50, 6), (12, 30, 3)], start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    inst[2:5, 55:62] = 6  # asymmetric: no flip or rotation maps the layout onto itself
    img = np.where(inst[..., None] > 0, 30, 240).astype(np.uint8).repeat(3, -1)
    item = Item("a", img, inst, inst, None, 0.25)
    x, np_t, hv_t, _ = sample_batch([item], 8, 64, np.random.default_rng(0), 0, 0, 0, 0)
    moved = 0
    for k in range(8):
        dark = x[k].mean(0).numpy() < 0.5
        assert (dark == np_t[k].numpy().astype(bool)).mean() > 0.99
        np.testing.assert_allclose(hv_t[k].numpy(), hv_maps(ndi.label(np_t[k].numpy())[0]), atol=1e-6)
        moved += not np.array_equal(np_t[k].numpy(), inst > 0)
    assert moved >= 4  # the crops were flipped / rotated (an unaugmented run would not test the pairing)


def test_outline_simplification_chooses_the_points_skimage_chooses() -> None:
    """The export's Douglas-Peucker (segments of one depth at once) keeps exactly the vertices
    :func:`skimage.measure.approximate_polygon` keeps: on nucleus contours, irregular blobs and random chains with
    ties (half-integer points), at several tolerances."""
    from skimage.measure import approximate_polygon, find_contours

    from gigaslide.nuclei.export import _approximate_polygon

    rng = np.random.default_rng(5)
    chains = []
    for _ in range(15):
        m = ndi.gaussian_filter(rng.random((40, 40)), 2) > 0.5
        chains += find_contours(np.pad(m, 1).astype(np.float32), 0.5)
    chains += [rng.normal(size=(int(rng.integers(1, 60)), 2)) * 10 for _ in range(30)]
    chains += [np.round(rng.normal(size=(int(rng.integers(2, 60)), 2)) * 4) / 2 for _ in range(30)]
    assert len(chains) > 100
    for c in chains:
        for tol in (0.5, 2.0):
            want = approximate_polygon(c, tol)
            got = _approximate_polygon(c, tol)
            assert got.shape == want.shape and np.array_equal(got, want)


def test_outline_vertices_lie_half_way_between_pixel_centres() -> None:
    """A 4 x 3 px rectangle (columns 3..6, rows 2..4) is traced between its pixels and the background ones: every
    vertex (x, y), in pixel-index coordinates, lies on x = 2.5 or 6.5 (rows 2..4) or on y = 1.5 or 4.5 (columns
    3..6), and the ring is closed -- an outline shifted by the pad or by half a pixel is not."""
    from gigaslide.nuclei.export import polygons_of

    m = np.zeros((8, 10), bool)
    m[2:5, 3:7] = True
    polys = polygons_of(m)
    assert len(polys) == 1 and len(polys[0]) == 1
    ring = polys[0][0]
    assert ring[0].tolist() == ring[-1].tolist() and len(ring) >= 4
    for x, y in ring.tolist():
        assert (x in (2.5, 6.5) and y in (2, 3, 4)) or (y in (1.5, 4.5) and x in (3, 4, 5, 6)), (x, y)
    xs, ys = ring[:, 0], ring[:, 1]
    assert xs.min() == 2.5 and ys.min() == 1.5 and ys.max() == 4.5  # it reaches three sides of the box


def test_a_regions_nuclei_are_placed_on_the_slide_in_level0_corner_coordinates() -> None:
    """A region read at (100, 40) on a slide scanned twice as fine as the model (f = 2 level-0 px per model px): model
    pixel (col i, row j) spans level-0 [100 + 2 i, 100 + 2 i + 2) x [40 + 2 j, ...). A 4 x 3 px rectangle (columns
    3..6, rows 2..4) is outlined on x = 106 / 114 or y = 44 / 50, through pixel centres on the other axis; its
    centroid (4.5, 3) px -> (110, 47), bbox (106, 44, 114, 50), area 12 px x 0.5^2 µm^2; a second nucleus the owner
    refuses is not yielded."""
    from gigaslide.nuclei.slide import _nuclei_of_region

    inst = np.zeros((12, 16), np.int32)
    inst[2:5, 3:7] = 1
    inst[8:10, 10:14] = 2
    seen = []

    def owner(c: np.ndarray) -> bool:
        seen.append(c.tolist())
        return c[0] < 120

    out = list(_nuclei_of_region(inst, {1: (2, 0.8), 2: (1, 0.7)}, np.ones((12, 16), np.float32), (100, 40), 2.0, 0.5,
                                 owner, {"2": "tumor"}, (1000.0, 1000.0)))
    assert seen == [[110.0, 47.0], [124.0, 58.0]] and len(out) == 1
    polys, c, area, bbox, t, name, prob = out[0]
    assert c == (110.0, 47.0) and area == pytest.approx(12 * 0.25) and bbox == (106.0, 44.0, 114.0, 50.0)
    assert (t, name, prob) == (2, "tumor", 0.8)
    assert len(polys) == 1 and len(polys[0]) == 1
    for x, y in polys[0][0].tolist():
        assert (x in (106, 114) and y in (45, 47, 49)) or (y in (44, 50) and x in (107, 109, 111, 113)), (x, y)


def test_type_colours_follow_hovernets_pannuke_palette() -> None:
    """HoVer-Net's ``type_info.json`` for PanNuke: 1 neoplastic [255, 0, 0], 2 inflammatory [0, 255, 0], 3 connective
    [0, 0, 255], 4 dead [255, 255, 0], 5 non-neoplastic epithelial [255, 165, 0]; past the palette the colours repeat
    (type 11 is type 1's), and a nucleus without a type is grey."""
    from gigaslide.nuclei.export import TYPE_COLORS, type_color

    assert [type_color(t) for t in range(1, 6)] == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                                                    [255, 165, 0]]
    assert type_color(len(TYPE_COLORS) + 1) == [255, 0, 0] and type_color(None) == type_color(0) == [128, 128, 128]

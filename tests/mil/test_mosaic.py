import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from gigaslide.errors import GigaslideError
from gigaslide.mil.mosaic import (MosaicConfig, build_mosaic, grow_region, parse_range, read_ground_truth,
                                  tissue_mask, tumor_labels_for_coords)
from gigaslide.slides import open_slide
from gigaslide.testing import shared_data_dir


def _tile_folder(tmp_path, n=6, size=32):
    d = tmp_path / "tiles"
    colours = {"0": (230, 120, 180), "1": (90, 40, 140)}  # normal pink, tumour dark purple
    for cls, col in colours.items():
        (d / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), col, np.uint8)).save(d / cls / f"t{i}.png")
    return d


def test_masks_and_regions_are_contiguous():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = tissue_mask(24, 0.45, rng)
        assert ndimage.label(m)[1] == 1 and 0.25 < m.mean() <= 0.46
        assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()
        r = grow_region(m, 20, rng)
        assert r.sum() == 20 and (r <= m).all()
        assert ndimage.label(r)[1] == 1  # 4-connected: one piece


def test_parse_range():
    assert parse_range("0.02-0.2") == (0.02, 0.2)
    assert parse_range("0.1") == (0.1, 0.1)
    with pytest.raises(GigaslideError):
        parse_range("abc")
    with pytest.raises(GigaslideError):
        parse_range("0.5-0.1")
    # numbers in exponent notation (refused as 'not a number or range': the exponent's '-' was read as the range's)
    assert parse_range("5e-2") == (0.05, 0.05)
    assert parse_range("1e-3-2E-1") == (0.001, 0.2)
    assert parse_range(" 0.02 - 0.2 ") == (0.02, 0.2)
    with pytest.raises(GigaslideError, match="not a number or range"):
        parse_range("0.1-0.2-0.3")


@pytest.mark.parametrize("slides,fraction", [(2, 0.2), (4, 0.9)])
def test_a_mosaic_of_one_class_is_refused_before_any_slide_is_written(tmp_path, slides, fraction):
    """0.2 of 2 slides rounds to 0 positive slides, 0.9 of 4 to 4: a one-class cohort that train-mil refuses only
    after every slide was built; refused up front."""
    with pytest.raises(GigaslideError, match=f"of {slides} slides gives .* positive slides: one class"):
        build_mosaic(_tile_folder(tmp_path), tmp_path / "m", MosaicConfig(slides=slides, positive_fraction=fraction,
                                                                          grid=8), verbose=False)
    assert not (tmp_path / "m").exists()


def test_build_mosaic_layout_and_ground_truth(tmp_path):
    tiles = _tile_folder(tmp_path)
    out = tmp_path / "mosaic"
    cfg = MosaicConfig(slides=6, positive_fraction=0.5, tumor_fraction=(0.1, 0.1), grid=10, seed=1)
    meta = build_mosaic(tiles, out, cfg, verbose=False)
    assert meta["n_positive"] == 3 and meta["tile_size"] == 32
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 6 and sum(int(r["label"]) for r in rows) == 3
    for r in rows:
        gt = read_ground_truth(out / "ground_truth" / f"{r['slide_id']}.csv")
        n_tum = int(gt[:, 3].sum())
        assert n_tum == int(r["n_tumor_tiles"]) and len(gt) == int(r["n_tissue_tiles"])
        assert (n_tum > 0) == (r["label"] == "1")
        if n_tum:
            assert n_tum == round(0.1 * len(gt))
        s = open_slide(out / "slides" / f"{r['slide_id']}.tiff")
        assert s.dimensions == (320, 320) and s.mpp == pytest.approx(0.97, abs=1e-3)
        # pixels agree with the ground truth: tumour tiles are dark purple, normal pink, background white
        px = s.read_region((0, 0), (320, 320), 0.97)
        for x, y, size, t in gt[:10]:
            c = px[y + size // 2, x + size // 2].astype(int)
            assert (abs(c[0] - 90) < 25) if t else (abs(c[0] - 230) < 25)
        assert px[2, 2].min() > 230
    mtime = (out / "slides" / "mosaic_0000.tiff").stat().st_mtime_ns
    build_mosaic(tiles, out, cfg, verbose=False)
    assert (out / "slides" / "mosaic_0000.tiff").stat().st_mtime_ns == mtime  # resumed


def test_slide_stain_gives_each_slide_its_own_colour(tmp_path):
    """Per-slide stain: tissue colours change consistently within a slide and differ between slides; the layout,
    labels and glass are those of the same mosaic without it; the draws are recorded."""
    import json

    from gigaslide.mil.mosaic import apply_stain

    tiles = _tile_folder(tmp_path)
    base = dict(slides=4, tumor_fraction=(0.2, 0.2), grid=8, seed=3)
    build_mosaic(tiles, tmp_path / "plain", MosaicConfig(**base), verbose=False)
    build_mosaic(tiles, tmp_path / "stained", MosaicConfig(**base, slide_stain=0.3), verbose=False)
    meta = json.loads((tmp_path / "stained" / "mosaic.json").read_text())
    assert set(meta["slide_stain_draws"]) == {f"mosaic_{i:04d}" for i in range(4)}
    assert "slide_stain_draws" not in json.loads((tmp_path / "plain" / "mosaic.json").read_text())
    assert (tmp_path / "plain" / "labels.csv").read_text() == (tmp_path / "stained" / "labels.csv").read_text()
    normal_colours = []
    for i in range(4):
        sid = f"mosaic_{i:04d}"
        gt = read_ground_truth(tmp_path / "stained" / "ground_truth" / f"{sid}.csv")
        assert (gt == read_ground_truth(tmp_path / "plain" / "ground_truth" / f"{sid}.csv")).all()
        plain = open_slide(tmp_path / "plain" / "slides" / f"{sid}.tiff").read_region((0, 0), (256, 256), 0.97).astype(int)
        px = open_slide(tmp_path / "stained" / "slides" / f"{sid}.tiff").read_region((0, 0), (256, 256), 0.97).astype(int)
        glass = np.ones((256, 256), bool)
        for x, y, size, _ in gt:
            glass[y:y + size, x:x + size] = False
        glass_full = glass.copy()
        glass = ndimage.binary_erosion(glass, iterations=8)  # away from tissue: JPEG blocks straddle the tile edges
        assert np.abs(px[glass] - plain[glass]).max() <= 2  # glass untouched (JPEG rounding only)
        normal = [px[y + size // 2, x + size // 2] for x, y, size, t in gt if not t]
        assert np.ptp(np.array(normal), axis=0).max() <= 6  # one stain per slide: all normal tiles alike
        # the recorded draw, applied to the unstained slide's tissue, gives the stained slide (up to JPEG rounding),
        # and fits it better than any other slide's draw
        tissue = ~glass_full

        def err(draw):
            e = apply_stain(plain[tissue][None].astype(np.uint8), np.array(draw["scale"]), np.array(draw["shift"]))[0]
            return np.abs(px[tissue] - e.astype(int)).mean()

        errs = {other: err(draw) for other, draw in meta["slide_stain_draws"].items()}
        assert errs[sid] <= 5 and errs[sid] == min(errs.values()), errs
        normal_colours.append(normal[0])
    spread = np.ptp(np.array(normal_colours), axis=0).max()
    assert spread > 15, f"slides should differ in colour, spread {spread}"


def _two_kind_folder(tmp_path):
    """:func:`_tile_folder` plus a second normal kind: six blue tiles ``u*.png`` beside the pink ones."""
    tiles = _tile_folder(tmp_path)
    for i in range(6):
        Image.fromarray(np.full((32, 32, 3), (120, 150, 230), np.uint8)).save(tiles / "0" / f"u{i}.png")
    return tiles


def test_slide_composition_gives_each_slide_its_own_tissue_mix(tmp_path):
    """Two visibly different normal kinds (pink, blue): k-means finds them exactly; with a small Dirichlet
    concentration each slide is dominated by one kind and the slides differ, without it every slide mixes
    both; masks, labels and ground truth stay those of the plain mosaic; the mixes are recorded."""
    import json

    from gigaslide.mil.mosaic import list_tiles, tissue_kinds

    tiles = _two_kind_folder(tmp_path)
    normal = list_tiles(tiles, "0")
    kinds = tissue_kinds(normal, 2, seed=2)  # the mosaic's own seed: the same k-means labels
    blue = np.array([p.name.startswith("u") for p in normal])
    assert len(set(kinds[blue])) == 1 and len(set(kinds[~blue])) == 1 and kinds[blue][0] != kinds[~blue][0]
    base = dict(slides=8, tumor_fraction=(0.1, 0.1), grid=10, seed=2)
    build_mosaic(tiles, tmp_path / "plain", MosaicConfig(**base), verbose=False)
    build_mosaic(tiles, tmp_path / "mixed", MosaicConfig(**base, slide_composition=0.05, tissue_kinds=2), verbose=False)
    meta = json.loads((tmp_path / "mixed" / "mosaic.json").read_text())
    assert meta["tissue_kinds"] == [6, 6] and len(meta["slide_composition_draws"]) == 8
    assert "slide_composition_draws" not in json.loads((tmp_path / "plain" / "mosaic.json").read_text())
    assert (tmp_path / "plain" / "labels.csv").read_text() == (tmp_path / "mixed" / "labels.csv").read_text()

    def blue_share(folder, sid):
        gt = read_ground_truth(folder / "ground_truth" / f"{sid}.csv")
        px = open_slide(folder / "slides" / f"{sid}.tiff").read_region((0, 0), (320, 320), 0.97).astype(int)
        centre = np.array([px[y + s // 2, x + s // 2] for x, y, s, t in gt if not t])
        return float((centre[:, 2] > centre[:, 0]).mean())  # blue channel above red: the blue kind

    shares = []
    for i in range(8):
        sid = f"mosaic_{i:04d}"
        assert (read_ground_truth(tmp_path / "mixed" / "ground_truth" / f"{sid}.csv")
                == read_ground_truth(tmp_path / "plain" / "ground_truth" / f"{sid}.csv")).all()
        plain, mixed = blue_share(tmp_path / "plain", sid), blue_share(tmp_path / "mixed", sid)
        assert 0.2 < plain < 0.8  # the pool's mix: both kinds in every slide
        w = meta["slide_composition_draws"][sid][int(kinds[blue][0])]  # the recorded weight of the blue kind
        assert abs(mixed - w) < 0.25, (sid, mixed, w)
        shares.append(mixed)
    assert np.mean([max(s, 1 - s) for s in shares]) > 0.85  # one kind dominates a slide ...
    assert min(shares) < 0.2 and max(shares) > 0.8  # ... and not the same one in every slide


def test_composition_task_labels_slides_by_their_tissue_mix(tmp_path):
    """task=composition: no tumour anywhere, and each class's recorded half of the kinds carries more of its
    slides' weight than of the other class's slides (Dirichlet base 3:1); without a composition it is refused."""
    import json

    tiles = _two_kind_folder(tmp_path)
    cfg = MosaicConfig(slides=16, grid=8, seed=4, task="composition", slide_composition=1.0, tissue_kinds=2)
    build_mosaic(tiles, tmp_path / "m", cfg, verbose=False)
    meta = json.loads((tmp_path / "m" / "mosaic.json").read_text())
    halves = meta["composition_classes"]
    assert sorted(halves["0"] + halves["1"]) == [0, 1] and len(halves["1"]) == 1
    rows = list(csv.DictReader(open(tmp_path / "m" / "labels.csv")))
    assert sum(int(r["label"]) for r in rows) == 8 and all(r["n_tumor_tiles"] == "0" for r in rows)
    w1 = {r["slide_id"]: meta["slide_composition_draws"][r["slide_id"]][halves["1"][0]] for r in rows}
    pos = np.mean([w1[r["slide_id"]] for r in rows if r["label"] == "1"])
    neg = np.mean([w1[r["slide_id"]] for r in rows if r["label"] == "0"])
    assert pos - neg > 0.25, (pos, neg)  # expected 0.75 vs 0.25
    with pytest.raises(GigaslideError, match="needs --slide-composition"):
        build_mosaic(tiles, tmp_path / "n", MosaicConfig(slides=4, grid=8, task="composition"), verbose=False)


def test_resume_refuses_other_settings(tmp_path):
    tiles = _tile_folder(tmp_path)
    out = tmp_path / "m"
    build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=0), verbose=False)
    labels = (out / "labels.csv").read_text()
    build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=0), verbose=False)  # same settings: resumes
    assert (out / "labels.csv").read_text() == labels
    with pytest.raises(GigaslideError, match=r"other settings \(slide_stain 0.0 -> 0.1\)"):
        build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=0, slide_stain=0.1), verbose=False)
    with pytest.raises(GigaslideError, match=r"other settings \(slide_composition 0.0 -> 0.5\)"):
        build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=0, slide_composition=0.5), verbose=False)
    build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=0, tissue_kinds=3), verbose=False)  # unused: resumes
    with pytest.raises(GigaslideError, match="seed 0 -> 1"):
        build_mosaic(tiles, out, MosaicConfig(slides=4, grid=8, seed=1), verbose=False)
    # more slides would re-draw which slides are positive while the old images are kept: refused too
    with pytest.raises(GigaslideError, match="slides 4 -> 6"):
        build_mosaic(tiles, out, MosaicConfig(slides=6, grid=8, seed=0), verbose=False)
    assert (out / "labels.csv").read_text() == labels


def test_tumor_labels_for_coords():
    gt = np.array([[0, 0, 96, 0], [96, 0, 96, 1], [0, 96, 96, 0]])
    coords = np.array([[96, 0], [0, 0], [100, 10], [0, 96]])
    assert tumor_labels_for_coords(gt, coords, 96).tolist() == [1, 0, 1, 0]


def test_bad_tile_folder(tmp_path, cli, capsys):
    assert cli(["mosaic", "--tiles", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no class folder '0/'" in capsys.readouterr().err


@pytest.mark.realdata
def test_pcam_mosaic_cli(tmp_path, cli):
    data = shared_data_dir()
    if data is None:
        pytest.skip("no shared data")
    rc = cli(["mosaic", "--tiles", str(data / "tiles/pcam/train"), "--out", str(tmp_path / "m"), "--slides", "2",
              "--grid", "8", "--tumor-fraction", "0.2"])
    assert rc == 0
    s = open_slide(tmp_path / "m" / "slides" / "mosaic_0000.tiff")
    assert s.dimensions == (768, 768)
    from gigaslide.tiling import segment_tissue

    tm, _ = segment_tissue(s)
    gt = read_ground_truth(tmp_path / "m" / "ground_truth" / "mosaic_0000.csv")
    cells = np.zeros((768, 768), bool)
    for x, y, size, _ in gt:
        cells[y:y + size, x:x + size] = True
    m = np.asarray(Image.fromarray(tm.mask).resize((768, 768), Image.NEAREST)) if tm.mask.shape != (768, 768) else tm.mask
    assert m.mean() > 0.1  # the spine's tissue detector finds the mosaic's tissue ...
    assert cells[m].mean() > 0.9  # ... and almost nothing on the glass

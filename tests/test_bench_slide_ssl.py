"""bench_slide_ssl's own logic: SLPD variants (the full SLPD pre-trained again with one setting changed), the SLPD
claim's collapse caveat, and the detected-vs-exact tissue pairing (--tissue both)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_slide_ssl as bench  # noqa: E402


def test_slpd_variants_name_rows_folders_and_overrides() -> None:
    got = bench.slpd_variants(" seed=1, epochs=8,prototypes=4")
    assert got == [("SLPD +intra+inter (seed 1)", "_seed1", {"seed": 1}),
                   ("SLPD +intra+inter (8 epochs)", "_epochs8", {"epochs": 8}),
                   ("SLPD +intra+inter (k = 4)", "_prototypes4", {"prototypes": 4})]
    assert bench.slpd_variants("") == []
    for bad in ("lr=0.1", "seed=x", "seed", "prototypes=1"):
        with pytest.raises(SystemExit, match="slpd-variants"):
            bench.slpd_variants(bad)


def test_the_slpd_claim_names_a_collapsed_run() -> None:
    assert bench.collapse_caveat({"SLPD DINO only": None, "SLPD +intra+inter": None, "SLPD +intra": "uniform"}) == ""
    got = bench.collapse_caveat({"SLPD DINO only": None, "SLPD +intra+inter": "uniform"})
    assert "SLPD +intra+inter (uniform) ended collapsed" in got and "DINO only" not in got


def test_region_variant_sets_the_region_size() -> None:
    assert bench.slpd_variants("region=1490") == [("SLPD +intra+inter (regions 1490 px)", "_region1490",
                                                    {"region_size": 1490})]
    with pytest.raises(SystemExit, match="region=PX"):
        bench.slpd_variants("region=1")


def test_tissue_both_runs_each_task_twice_in_its_own_folder() -> None:
    ns = argparse.Namespace
    assert bench.tissue_runs("context", ns(tissue="annotations")) == [("context", "context", "annotations")]
    assert bench.tissue_runs("context", ns(tissue="detected")) == [("context", "context", "detected")]
    both = [("context (detected tissue)", "context", "detected"), ("context (exact tissue)", "context_annotated",
                                                                   "annotations")]
    assert bench.tissue_runs("context", ns(tissue="both", thinned_control=False)) == both
    assert bench.tissue_runs("context", ns(tissue="both", thinned_control=True)) == both + [
        ("context (thinned exact tissue)", "context_thinned", "thinned")]


def _mosaic(root: Path, gt_row: str = "0,0,1\n", composition: float = 0.3, created: str = "t0") -> Path:
    (root / "ground_truth").mkdir(parents=True)
    (root / "labels.csv").write_text("slide_id,label\ns0,1\n")
    (root / "ground_truth" / "s0.csv").write_text("x,y,tumor\n" + gt_row)
    (root / "mosaic.json").write_text(json.dumps({"created": created, "config": {"slide_composition": composition}}))
    return root


def test_mosaic_digest_tells_identical_mosaics_from_different_ones(tmp_path: Path) -> None:
    a, b = _mosaic(tmp_path / "a"), _mosaic(tmp_path / "b", created="t1")  # built at another time: the same slides
    assert bench.mosaic_digest(a) == bench.mosaic_digest(b)
    assert bench.mosaic_digest(a) != bench.mosaic_digest(_mosaic(tmp_path / "c", "0,0,0\n"))
    # same layout and labels, other tissue in the cells (per-slide composition): not the same slides
    assert bench.mosaic_digest(a) != bench.mosaic_digest(_mosaic(tmp_path / "d", composition=0.0))


def _result(ids: list[str], y: np.ndarray, preds: dict, digest: str = "d") -> dict:
    return {"y": y, "preds": {k: {"all": v[None]} for k, v in preds.items()},
            "info": {"slide_ids": ids, "mosaic_sha256": digest}}


def test_tissue_pairs_pair_each_method_on_the_same_slides() -> None:
    rng = np.random.default_rng(0)
    ids = [f"s{i:02d}" for i in range(40)]
    y = np.tile([0, 1], 20)
    noise = rng.random(40)
    args = argparse.Namespace(tissue="both", tasks="context", ns=["all"], bootstrap=300, thinned_control=False)
    det = _result(ids, y, {"cue": y * 0.8 + 0.1, "same": noise})
    # the exact tiling lists the slides in another order: pairing must follow the ids, not the positions
    order = rng.permutation(40)
    ex = _result([ids[i] for i in order], y[order], {"cue": noise[order], "same": noise[order]})
    md = "\n".join(bench.tissue_pairs({"context (detected tissue)": det, "context (exact tissue)": ex}, args))
    assert "| same | " in md and "+0.000 [+0.000, +0.000]" in md
    line = next(s for s in md.splitlines() if s.startswith("- context, n = all"))
    assert "higher on detected tissue (CI above 0): cue +" in line and "higher on exact tissue (CI below 0): none" in line and "not distinguishable: same +0.000" in line
    assert "folds and few-shot draws are identical" in md and "tissue mix" not in md
    det["info"]["mix_r2"], ex["info"]["mix_r2"] = {"same": 0.5, "cue": 0.25}, {"same": 0.875}
    md = "\n".join(bench.tissue_pairs({"context (detected tissue)": det, "context (exact tissue)": ex}, args))
    assert "(CV R², detected tissue → exact tissue): same 0.500 → 0.875." in md  # only what both runs measured
    # a slide detection found no tissue in: pairs on the slides both have, and says so
    det2 = _result(ids[1:], y[1:], {"same": noise[1:]})
    md2 = "\n".join(bench.tissue_pairs({"context (detected tissue)": det2, "context (exact tissue)": ex}, args))
    assert "1 slide(s) left without tissue: pairs are on the 39 slides" in md2
    with pytest.raises(SystemExit, match="mosaics differ"):
        bench.tissue_pairs({"context (detected tissue)": _result(ids, y, {}, "x"), "context (exact tissue)": ex}, args)


def test_mix_r2_reads_the_tissue_mix_out_of_an_embedding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"s{i:03d}" for i in range(120)]
    mix = rng.dirichlet(np.full(4, 0.3), size=120)
    (tmp_path / "mosaic.json").write_text(json.dumps({"slide_composition_draws": dict(zip(ids, mix.tolist()))}))
    carries = mix @ rng.normal(size=(4, 16)) + 0.01 * rng.normal(size=(120, 16))  # the mix, linearly, plus noise
    got = bench.mix_r2({"carries": carries, "noise": rng.normal(size=(120, 16))}, tmp_path, ids)
    assert got["carries"] > 0.95 and got["noise"] < 0.05
    (tmp_path / "mosaic.json").write_text(json.dumps({"config": {}}))  # no per-slide composition
    assert bench.mix_r2({"carries": carries}, tmp_path, ids) == {}


def _solid_mosaic(tmp_path: Path) -> Path:
    """4 mosaic slides on an 8 x 8 grid of 32-px cells at 1 µm/px: pale normal and dark tumour tiles."""
    from PIL import Image

    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic

    tiles = tmp_path / "tiles"
    for cls, col in {"0": (230, 200, 220), "1": (90, 40, 140)}.items():  # pale normal, dark tumour
        (tiles / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), col, np.uint8)).save(tiles / cls / f"t{i}.png")
    mosaic = tmp_path / "mosaic"
    build_mosaic(tiles, mosaic, MosaicConfig(slides=4, grid=8, tumor_fraction=(0.3, 0.3), seed=0, mpp=1.0),
                 verbose=False)
    return mosaic


def test_thinned_control_keeps_detections_count_of_exact_cells_at_random(tmp_path: Path) -> None:
    from gigaslide.features import store
    from gigaslide.mil.mosaic import read_ground_truth
    from gigaslide.tiling import read_polygons
    from gigaslide.tiling.annotations import rasterize

    mosaic = _solid_mosaic(tmp_path)
    counts = {"mosaic_0000": 3, "mosaic_0001": 5, "mosaic_0002": 1, "mosaic_0003": 7}
    for sid, k in counts.items():  # the detected arm's cache: only its tile counts matter here
        store.save(tmp_path / "det" / "features" / f"{sid}.h5", np.zeros((k, 2), np.float32),
                   np.zeros((k, 2), np.int64), attrs={"encoder": "x", "mpp": 1.0, "tile_size": 32, "slide_id": sid})
    out = bench.write_thinned(mosaic, tmp_path / "det", tmp_path / "thin")
    for sid, k in counts.items():
        gt = read_ground_truth(mosaic / "ground_truth" / f"{sid}.csv")
        cells = rasterize(read_polygons(out / f"{sid}.geojson"), (8, 8), 32.0)  # one pixel per cell
        assert cells.sum() == k  # detection's count ...
        truth = np.zeros((8, 8), bool)
        truth[gt[:, 1] // 32, gt[:, 0] // 32] = True
        assert not (cells & ~truth).any()  # ... of the slide's own tissue cells only
    again = bench.write_thinned(mosaic, tmp_path / "det", tmp_path / "thin2")  # seeded per slide: the same cells
    assert all((out / f"{s}.geojson").read_bytes() == (again / f"{s}.geojson").read_bytes() for s in counts)


def test_kept_by_tissue_detection_measures_which_cells_were_dropped(tmp_path: Path) -> None:
    from gigaslide.mil.mosaic import read_ground_truth

    mosaic = _solid_mosaic(tmp_path)

    class Bag:  # what the function reads of a feature file: its tiles' level-0 coordinates
        def __init__(self, coords: np.ndarray) -> None:
            self.coords = coords

        def __len__(self) -> int:
            return len(self.coords)

    ids = [f"mosaic_{i:04d}" for i in range(4)]
    gts = {s: read_ground_truth(mosaic / "ground_truth" / f"{s}.csv") for s in ids}
    t = argparse.Namespace(slide_ids=ids, labels=np.array([0, 1, 0, 1]))
    # "detection" keeps only the pale normal cells: the dropped ones are the dark tumour cells
    files = {s: Bag(np.array([g[:2] for g in gts[s] if g[3] == 0])) for s in ids}
    got = bench.kept_by_tissue_detection(mosaic, files, t)
    assert got["bright_dropped"] == pytest.approx(np.mean((90, 40, 140)), abs=1)
    assert got["bright_kept"] == pytest.approx(np.mean((230, 200, 220)), abs=1)
    # every cell kept: nothing to compare, no slide read
    whole = bench.kept_by_tissue_detection(mosaic, {s: Bag(np.array([g[:2] for g in gts[s]])) for s in ids}, t)
    assert whole["pos"] == whole["neg"] == 1.0 and "bright_dropped" not in whole


def test_brightness_word_names_only_a_real_difference() -> None:
    assert bench.brightness_word({"bright_dropped": 210.0, "bright_kept": 149.0}) == "paler than"
    assert bench.brightness_word({"bright_dropped": 166.0, "bright_kept": 165.0}) == "about as bright as"
    assert bench.brightness_word({"bright_dropped": 90.0, "bright_kept": 220.0}) == "darker than"

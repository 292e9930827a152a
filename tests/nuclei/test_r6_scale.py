"""Round 6: counts at scale (thousands of nuclei per image, thousands of images, long polygons) and undefined metrics
(images without a nucleus) written without NaN."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaslide.cli.main import main
from gigaslide.nuclei import annotations as A
from gigaslide.nuclei import evaluate as E
from gigaslide.nuclei import metrics as M

from .conftest import write_xml


def _peak_mb(fn) -> tuple[object, float]:  # noqa: ANN001
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _squares(n_side: int, step: int = 6, side: int = 4) -> np.ndarray:
    """``n_side``² square nuclei (``side`` px) on a grid of ``step`` px."""
    inst = np.zeros((n_side * step, n_side * step), np.int32)
    for k in range(n_side * n_side):
        y, x = (k // n_side) * step, (k % n_side) * step
        inst[y:y + side, x:x + side] = k + 1
    return inst


def test_matching_memory_grows_with_the_nuclei_not_their_square() -> None:
    """3025 nuclei, each predicted 1 px off (IoU 12 / 20): a dense nG x nP overlap table was 9 M entries per array
    (several of them, hundreds of MB; 10 000 nuclei took 4 GB); the pairs that touch are a few thousand."""
    gt = _squares(55)
    pred = np.roll(gt, 1, axis=1)
    st, peak = _peak_mb(lambda: M.image_stats(gt, pred))
    m = M.per_image(st)
    assert (st.tp, st.fp, st.fn) == (3025, 0, 0)
    assert m["sq"] == pytest.approx(0.6) and m["pq"] == pytest.approx(0.6) and m["aji"] == pytest.approx(0.6)
    assert peak < 40, f"{peak:.0f} MB for a {gt.shape} image"


def test_aji_ties_and_unpaired_nuclei_on_sparse_pairs() -> None:
    """A true nucleus overlapping two predictions with the same IoU is paired with the lower id (HoVer-Net's argmax);
    the other prediction and a true nucleus overlapping nothing add their areas to the union."""
    gt = np.zeros((10, 20), np.int32)
    gt[0:4, 2:6] = 5  # 16 px
    gt[8:10, 15:17] = 9  # 4 px, no prediction
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 3  # 12 px, 4 in common: IoU 4 / 24
    pred[0:4, 4:14] = 2  # 40 px, 8 in common: IoU 8 / 48, the same: the tie goes to id 2
    c, u = M._aji(M.sparse_overlaps(gt, pred))
    assert (c, u) == (8, 48 + 12 + 4)  # (pairing id 3 instead: C 4, U 24 + 40 + 4)
    swapped = np.where(pred == 3, 2, np.where(pred == 2, 3, 0))  # the lower id on the smaller one: it is paired
    assert M._aji(M.sparse_overlaps(gt, swapped)) == (4, 24 + 40 + 4)


def test_rasterise_makes_no_image_sized_array_per_polygon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each polygon was drawn into a mask of the whole image (four passes over it per nucleus: 10 000 nuclei on a
    2000 px image took a minute, 1000 on 2000 px 6 s; now 6.5 s and 2 s). A polygon now costs its own box: the
    image-sized arrays made are a fixed few, however many polygons."""
    side, n = 600, 400
    k = int(np.ceil(np.sqrt(n)))
    polys = [np.array([[x, y], [x + 5, y], [x + 5, y + 5], [x, y + 5]], float) + 3
             for i in range(n) for x, y in [((i % k) * side / k, (i // k) * side / k)]]
    big = [0]

    class CountingNumpy:
        def __getattr__(self, name: str) -> object:
            attr = getattr(np, name)
            if name not in ("zeros", "zeros_like", "full", "ones", "empty"):
                return attr

            def made(*a, **kw) -> np.ndarray:  # noqa: ANN002, ANN003
                out = attr(*a, **kw)
                big[0] += out.size >= side * side
                return out
            return made

    monkeypatch.setattr(A, "np", CountingNumpy())
    ann = A.rasterise(polys, (side, side))
    monkeypatch.undo()
    assert ann.count == n and (ann.inst > 0).sum() == n * 36
    assert big[0] <= 3, f"{big[0]} image-sized arrays for {n} polygons"


def test_rasterise_holes_and_pieces_as_before() -> None:
    """A nucleus in two pieces, one with a hole; a hole larger than its piece leaves nothing (dropped)."""
    sq = np.array([[0, 0], [8, 0], [8, 8], [0, 8]], float)
    hole = np.array([[3, 3], [5, 3], [5, 5], [3, 5]], float)
    ann = A.rasterise([[[sq + 1, hole + 1], [sq + 20]], [[sq * 0.5 + 30, sq * 2 + 24]]], (40, 40))
    want = np.zeros((40, 40), np.int32)
    want[1:10, 1:10] = 1
    want[4:7, 4:7] = 0
    want[20:29, 20:29] = 1
    assert np.array_equal(ann.inst, want) and ann.notes["dropped_degenerate"] == 1


def test_self_intersection_of_a_long_ring_in_bounded_memory() -> None:
    """An outline of 6000 vertices was compared edge with edge in [n, n] tables (GB; 32 000 vertices did not fit)."""
    t = np.linspace(0, 2 * np.pi, 6000, endpoint=False)
    circle = np.stack([500 + 300 * np.cos(t), 500 + 300 * np.sin(t)], 1)
    eight = np.stack([500 + 300 * np.sin(t), 500 + 150 * np.sin(2 * t)], 1)  # a figure eight: crosses itself once
    crossed, peak = _peak_mb(lambda: (A._self_intersects(circle), A._self_intersects(eight)))
    assert crossed == (False, True)
    assert peak < 100, f"{peak:.0f} MB"
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float)
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert A._self_intersects(bowtie) and not A._self_intersects(square)


def _stats(n: int, seed: int = 0, typed: bool = False) -> list[M.ImageStats]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tp, fp, fn = (int(v) for v in rng.integers(0, 6, 3))
        out.append(M.ImageStats(tp, fp, fn, tp * float(rng.uniform(0.55, 0.95)), 50, 120, 40, 90,
                                {1: (tp, fp, fn, tp * 0.7)} if typed else {}))
    return out


def test_summarize_computes_each_images_metrics_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bootstrap recomputed every image's metrics from its record for every resample and metric (n x B x 6
    calls: a minute for 1000 images, ten for 10 000); they are computed once and resampled as arrays."""
    calls = [0]
    real = M.per_image

    def counting(st: M.ImageStats) -> dict[str, float]:
        calls[0] += 1
        return real(st)

    stats = _stats(40)
    want = {name: float(np.mean([real(s)[name] for s in stats if not np.isnan(real(s)[name])]))
            for name in M.METRIC_NAMES}
    monkeypatch.setattr(M, "per_image", counting)
    s = M.summarize(stats, n_bootstrap=100, seed=1)
    assert calls[0] <= 2 * len(stats) * len(M.METRIC_NAMES), calls[0]
    for name in M.METRIC_NAMES:
        assert s["image_mean"][name]["value"] == pytest.approx(want[name])
        assert s["image_mean"][name]["ci_low"] <= s["image_mean"][name]["value"] <= s["image_mean"][name]["ci_high"]
    assert s["pooled"]["pq"]["value"] == pytest.approx(M.pooled(stats)["pq"])


def test_summarize_with_typed_and_empty_images_bootstraps_mpq() -> None:
    """An image with no nucleus has no per-type statistics: a resample of only such images has no mPQ (it raised a
    KeyError, so nuclei-eval of a typed model failed on a test set with an empty image)."""
    empty = M.ImageStats()
    typed = _stats(1, typed=True)[0]
    s = M.summarize([typed, empty], n_bootstrap=200, seed=0)
    assert s["pooled"]["mpq"]["value"] == pytest.approx(M.pooled([typed])["mpq"])
    assert s["image_mean"]["pq"]["images"] == 1  # the empty image's PQ is undefined (0 / 0)


def test_eval_of_images_without_nuclei_writes_no_nan(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Blank images annotated empty, nothing predicted: every metric is 0 / 0. The report said 'PQ nan [nan, nan]',
    report.json held NaN (refused by strict JSON readers) and per_image.csv 'nan'; now the metric is null / empty,
    and the report says why."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for k in range(3):
        Image.fromarray(np.full((96, 96, 3), 255, np.uint8)).save(tmp_path / "images" / f"b{k}.png")
        write_xml(tmp_path / "annotations" / f"b{k}.xml", [])
    monkeypatch.setattr(E, "predict_item", lambda model, item, precision="fp32": (np.zeros_like(item.inst_orig), {}))
    rc = main(["nuclei-eval", "--model", str(tiny_run / "run"), "--images", str(tmp_path / "images"), "--annotations",
               str(tmp_path / "annotations"), "--subset", "all", "--bootstrap", "20", "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0 and "PQ undefined" in out and "nan" not in out.lower()

    def refuse(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    rep = json.loads((tmp_path / "rep" / "report.json").read_text(), parse_constant=refuse)
    assert rep["metrics"]["image_mean"]["pq"] == {"value": None, "ci_low": None, "ci_high": None, "images": 0}
    assert all(r["pq"] is None for r in rep["per_image"])
    csv = (tmp_path / "rep" / "per_image.csv").read_text().splitlines()
    assert csv[1] == "b0,,0,0,,,,,,,," and "nan" not in "".join(csv).lower()
    assert "PQ is defined on 0 of 3 images" in (tmp_path / "rep" / "report.md").read_text()


def test_training_with_validation_images_without_nuclei_selects_by_loss(tmp_path: Path) -> None:
    """Validation images without an annotated nucleus: PQ is 0 / 0 every epoch. Training printed 'best epoch 0 (pq
    -1.0)' (the stand-in for NaN), kept the first epoch whatever followed, and wrote NaN into run.json's history."""
    from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei

    from .conftest import TINY, disc_image

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for k in range(2):
        img, _, polys = disc_image(96, 6, seed=k)
        Image.fromarray(img).save(tmp_path / "images" / f"img{k}.png")
        write_xml(tmp_path / "annotations" / f"img{k}.xml", polys)
    Image.fromarray(np.full((96, 96, 3), 255, np.uint8)).save(tmp_path / "images" / "blank.png")
    write_xml(tmp_path / "annotations" / "blank.xml", [])
    (tmp_path / "split.csv").write_text("image_id,split\nimg0,train\nimg1,train\nblank,val\n")
    s = train_nuclei(NucleiTrainConfig(images=str(tmp_path / "images"), annotations=str(tmp_path / "annotations"),
                                       out=str(tmp_path / "run"), split=str(tmp_path / "split.csv"), **TINY))
    losses = [h["train_loss"] for h in s["history"]]
    assert s["selection"] == "loss" and s["best_value"] == min(losses) and s["best_epoch"] == int(np.argmin(losses))
    assert any("no validation image has an annotated nucleus" in p for p in s["problems"])

    def refuse(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    rec = json.loads((tmp_path / "run" / "run.json").read_text(), parse_constant=refuse)
    assert [h["val_pq"] for h in rec["history"]] == [None, None]


def test_typed_label_map_of_thousands_of_nuclei_reads_in_one_pass(tmp_path: Path) -> None:
    """A HoVer-Net .npy (RGB, instance, type) with 2500 nuclei: each nucleus's type was read by comparing the whole
    image with its id (10 000 nuclei on 2000 px: 126 s; now 2 s)."""
    side, step = 1000, 20
    arr = np.zeros((side, side, 5), np.int32)
    k = 0
    for y in range(0, side, step):
        for x in range(0, side, step):
            k += 1
            arr[y:y + 10, x:x + 10, 3] = 7 * k  # sparse ids
            arr[y:y + 10, x:x + 10, 4] = k % 3 + 1
            arr[y, x, 4] = 0  # one background-typed pixel: the majority still wins
    np.save(tmp_path / "a.npy", arr)
    t = time.perf_counter()
    ann = A.read_label_image(tmp_path / "a.npy")
    took = time.perf_counter() - t
    assert ann.count == k == 2500
    assert ann.types == {i: i % 3 + 1 for i in range(1, k + 1)}  # compacted in id order: the k-th nucleus is id k
    assert took < 2.5, f"{took:.1f} s"


def test_a_model_that_outputs_nan_stops_instead_of_finding_no_nucleus(tiny_run: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN probabilities are under every threshold: a model whose output became NaN (broken weights, an overflow at
    reduced precision) found no nucleus anywhere and a whole slide was written 'done' with 0 nuclei."""
    import torch

    from gigaslide.errors import GigaslideError
    from gigaslide.nuclei import infer
    from gigaslide.nuclei import slide as nslide
    from gigaslide.slides.writer import write_pyramidal_tiff

    from .conftest import disc_image

    def nan_model(path, device="cpu"):  # noqa: ANN001, ANN202
        m = infer.load_model(path, device)
        with torch.no_grad():
            next(m.parameters()).fill_(float("nan"))
        return m

    img, _, _ = disc_image(200, 20, seed=1)
    with pytest.raises(GigaslideError, match="not finite"):
        infer.segment(nan_model(tiny_run / "run"), img)
    write_pyramidal_tiff(tmp_path / "s.tiff", 200, 200,
                         lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(ds),
                                                      int(x0):int(x0) + w * int(ds):int(ds)],
                         mpp=0.25, compression="zlib", tile=128)
    monkeypatch.setattr(nslide, "load_model", nan_model)
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128,
                                                   precision="fp32", tile_size=64))
    assert res.done == [] and "not finite" in res.failed["s"] and "--precision fp32" in res.failed["s"]
    assert not (tmp_path / "out" / "nuclei" / "s.json").exists()


def _feature(coords: object) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coords}, "properties": {}}


def test_geojson_positions_with_altitude_are_read_as_x_y(tmp_path: Path) -> None:
    """GeoJSON allows [x, y, z] positions: every ring was reshaped to pairs, so (x, y, z, x, y, z) read as the wrong
    points (a self-intersecting mess, silently)."""
    ring = [[2, 2], [12, 2], [12, 9], [2, 9], [2, 2]]
    for name, r in (("xy", ring), ("xyz", [p + [0.0] for p in ring])):
        (tmp_path / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                              "features": [_feature([r])]}))
    a, b = (A.read_annotation(tmp_path / f"{n}.geojson", (20, 20)) for n in ("xy", "xyz"))
    assert np.array_equal(a.inst, b.inst) and (b.inst == 1).sum() == 10 * 7 and b.notes["self_intersecting"] == 0


def test_malformed_and_degenerate_polygons_are_dropped_and_reported(tmp_path: Path) -> None:
    """A ring of flat numbers, a ragged ring or text coordinates raised a bare ValueError (a traceback); degenerate
    polygons (no area, 2 points) were dropped without a word. Now each is dropped and the file's count reported."""
    from gigaslide.nuclei.data import find_pairs, load_item

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "images" / "a.png")
    good = [[[2, 2], [12, 2], [12, 9], [2, 9], [2, 2]]]
    bad = [[[1, 2, 3]], [[[1, 2], [3], [4, 5]]], [[["a", "b"], [1, 2], [3, 4]]], [[[1, 1], [5, 5], [9, 9], [1, 1]]],
           [[[1, 1], [5, 5]]]]
    (tmp_path / "annotations" / "a.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                                    "features": [_feature(c) for c in [good, *bad]]}))
    pairs, problems = find_pairs(tmp_path / "images", tmp_path / "annotations")
    item = load_item(pairs[0], 0.25, 0.25, problems=problems)
    assert int(item.inst.max()) == 1 and (item.inst == 1).sum() == 70
    assert problems == [f"{pairs[0].annotation}: 5 dropped as degenerate (under 3 points, no area or unreadable "
                        "coordinates) of 6 polygons"]

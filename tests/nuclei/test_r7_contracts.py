"""Review round 7: stage contracts (a ViT model runs at its training scale), hostile annotation files (one line, no
hang), and the Python API (the caller's random streams, str paths)."""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.nuclei.annotations import read_annotation, read_aperio_xml, read_geojson, read_label_image

from .conftest import disc_image, write_xml

TINY = dict(weights="random", epochs=1, steps_per_epoch=1, batch_size=2, crop=64, lr=1e-3, precision="fp32")


def _data(root: Path, n: int = 3, size: int = 96) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for k in range(n):
        img, _, polys = disc_image(size, 5, seed=k)
        Image.fromarray(img).save(root / "images" / f"img{k}.png")
        write_xml(root / "annotations" / f"img{k}.xml", polys)
    return root


def _cfg(root: Path, backbone: str, **extra: object):  # noqa: ANN202
    from gigaslide.nuclei.train import NucleiTrainConfig

    return NucleiTrainConfig(images=str(root / "images"), annotations=str(root / "annotations"),
                             out=str(root / "run"), backbone=backbone, **{**TINY, **extra})


# -- lens I: a ViT-backed model sees nuclei at the scale it trained on --------------------------------------------
def test_a_vit_model_is_run_on_windows_of_its_training_crop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ViT pyramid resizes each window to the ViT's input size: trained on 64 px crops, it was validated and
    evaluated on 160 px windows (a 96 px image plus margins; 512 px on slides), so the ViT saw every nucleus at 0.4x
    the size it trained on. Every window it is run on must be its training crop."""
    from gigaslide.nuclei import model as model_mod
    from gigaslide.nuclei.evaluate import evaluate
    from gigaslide.nuclei.infer import load_model, read_spec
    from gigaslide.nuclei.train import train_nuclei

    torch.set_num_threads(1)
    sizes: dict[bool, set[int]] = {True: set(), False: set()}
    forward = model_mod.ViTPyramid.forward

    def spy(self, x):  # noqa: ANN001, ANN202
        sizes[torch.is_grad_enabled()].add(int(x.shape[-1]))
        return forward(self, x)

    monkeypatch.setattr(model_mod.ViTPyramid, "forward", spy)
    root = _data(tmp_path)
    train_nuclei(_cfg(root, "test_vit"))
    evaluate(root / "run", root / "images", root / "annotations", tmp_path / "rep", subset="all", n_bootstrap=0)
    assert sizes[True] == {64}  # training crops
    assert sizes[False] == {64}, sizes  # validation and evaluation windows: the training crop, not 160 px
    assert read_spec(root / "run")[0].crop == 64  # the model records its training crop
    from gigaslide.nuclei.infer import predict_maps

    sizes[False].clear()
    m = load_model(root / "run")
    npp, _, _ = predict_maps(m, np.full((300, 200, 3), 200, np.uint8), tile=512)
    assert npp.shape == (300, 200) and sizes[False] == {64}  # a slide's 512 px window asked for: the crop is used


# -- lens M: hostile annotation files are one line, at once ---------------------------------------------------------
@pytest.mark.parametrize(("text", "says"), [
    ("[" * 100_000 + "]" * 100_000, "cannot read GeoJSON"),  # deeper than Python's stack: was a RecursionError
    ('{"type": "FeatureCollection", "features": [1, 2]}', "feature 1 is a int"),  # were AttributeErrors
    ('{"type": "FeatureCollection", "features": {"a": 1}}', "'features' is a dict"),
    ('{"type": "Feature", "geometry": "x"}', "geometry is a str"),
    ('{"type": "Feature", "properties": "x", "geometry": null}', "properties is a str"),
    ('{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": 5}}', "coordinates are a int"),
])
def test_malformed_geojson_is_one_line_naming_the_file(tmp_path: Path, text: str, says: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(GigaslideError) as e:
        read_annotation(p, (32, 32))
    assert says in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_the_class_names_of_a_data_set_skip_a_malformed_file(tmp_path: Path) -> None:
    """Training and evaluation list the classes first: a malformed file is reported when it is read, not as an
    AttributeError while listing."""
    from gigaslide.nuclei.annotations import class_names

    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": [1]}')
    (tmp_path / "b.geojson").write_text(json.dumps({"type": "Feature", "properties": {"classification": {
        "name": "Tumor"}}, "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [8, 1], [8, 8], [1, 1]]]}}))
    assert class_names([tmp_path / "a.geojson", tmp_path / "b.geojson"]) == {"Tumor": tmp_path / "b.geojson"}


def test_a_ring_of_too_many_vertices_is_refused_at_once(tmp_path: Path) -> None:
    """Rasterising costs the ring's box times its vertices: 100 000 vertices took 30 s, a million hours (50 000 here,
    to keep the file small)."""
    t = np.linspace(0, 2 * np.pi, 50_000, endpoint=False)
    r = 40 + 5 * np.sin(t * 12_500)
    ring = np.stack([50 + r * np.cos(t), 50 + r * np.sin(t)], 1)
    p = tmp_path / "huge.xml"
    write_xml(p, [ring[:20], ring])
    t0 = time.perf_counter()
    with pytest.raises(GigaslideError) as e:
        read_annotation(p, (100, 100))
    assert time.perf_counter() - t0 < 15  # parsing the XML (about 1 s); the ring itself is never rasterised
    assert "polygon 2 has 50000 vertices" in str(e.value) and str(p) in str(e.value)


def test_coordinates_like_1e308_are_dropped_without_overflow(tmp_path: Path) -> None:
    p = tmp_path / "big.geojson"
    ring = [[1e308, 1], [8, 1], [8, 8], [-1e308, 8], [1e308, 1]]
    ok = [[1, 1], [6, 1], [6, 6], [1, 6], [1, 1]]
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ok]}}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "overflow encountered in multiply" from the self-intersection test
        ann = read_annotation(p, (32, 32))
    assert ann.count == 1 and ann.notes["dropped_degenerate"] == 1 and ann.notes["clipped"] == 0


@pytest.mark.parametrize("mpp", ["-0.25", "nan", "1e999"])
def test_an_xml_resolution_that_is_not_one_is_not_used(tmp_path: Path, mpp: str) -> None:
    """MicronsPerPixel="-0.25" resampled the image to 1 x 1 px and trained on that; "nan" was a ValueError."""
    from gigaslide.nuclei.data import find_pairs, load_item

    root = _data(tmp_path, n=1)
    xml = root / "annotations" / "img0.xml"
    xml.write_text(xml.read_text().replace('MicronsPerPixel="0.25"', f'MicronsPerPixel="{mpp}"'))
    assert read_aperio_xml(str(xml), (96, 96)).mpp is None
    pair = find_pairs(root / "images", root / "annotations")[0][0]
    with pytest.raises(GigaslideError, match="image resolution unknown"):
        load_item(pair, 0.25)
    assert load_item(pair, 0.25, 0.25).image.shape == (96, 96, 3)


@pytest.mark.parametrize("value", [-0.25, float("nan"), float("inf"), 0.0])
def test_a_bad_image_mpp_option_is_one_line(tmp_path: Path, value: float) -> None:
    from gigaslide.nuclei.data import find_pairs, load_item

    root = _data(tmp_path, n=1)
    pair = find_pairs(root / "images", root / "annotations")[0][0]
    with pytest.raises(GigaslideError, match="--image-mpp .* is not a resolution"):
        load_item(pair, 0.25, value)


def test_nuclei_train_refuses_a_bad_image_mpp_before_any_work(tmp_path: Path) -> None:
    from gigaslide.nuclei.train import train_nuclei

    root = _data(tmp_path, n=2)
    with pytest.raises(GigaslideError, match="--image-mpp -0.25 is not a resolution"):
        train_nuclei(_cfg(root, "test_resnet", image_mpp=-0.25))
    assert not (root / "run").exists()


# -- lens N: the Python API -------------------------------------------------------------------------------------------
def _streams() -> tuple:
    np_state = json.dumps(np.random.get_state(legacy=False), default=str)
    return torch.get_rng_state().clone(), np_state, random.getstate()


def _same(a: tuple, b: tuple) -> bool:
    return bool(torch.equal(a[0], b[0])) and a[1] == b[1] and a[2] == b[2]


def test_training_loading_and_evaluating_leave_the_callers_random_streams_alone(tmp_path: Path) -> None:
    """train_nuclei reset torch's global stream (torch.manual_seed(seed)); load_model and evaluate drew the
    network's initial weights from it: a notebook's next torch.rand changed after each."""
    from gigaslide.nuclei.evaluate import evaluate
    from gigaslide.nuclei.infer import load_model
    from gigaslide.nuclei.train import train_nuclei

    torch.set_num_threads(1)
    root = _data(tmp_path)
    torch.manual_seed(1234)
    np.random.seed(5)
    random.seed(7)
    before = _streams()
    train_nuclei(_cfg(root, "test_resnet"))
    assert _same(before, _streams())
    load_model(str(root / "run"))
    assert _same(before, _streams())
    evaluate(str(root / "run"), str(root / "images"), str(root / "annotations"), str(tmp_path / "rep"), subset="all",
             n_bootstrap=10)
    assert _same(before, _streams())


def test_the_readers_take_str_paths(tmp_path: Path) -> None:
    """read_geojson / read_label_image are public: with a str they failed with AttributeError ('str' object has no
    attribute 'read_text' / 'suffix')."""
    ring = [[1, 1], [8, 1], [8, 8], [1, 8], [1, 1]]
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon",
                                                                                    "coordinates": [ring]}}))
    lab = np.zeros((10, 10), np.uint8)
    lab[2:5, 2:5], lab[6:9, 6:9] = 1, 2
    Image.fromarray(lab).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", lab.astype(np.int32))
    assert read_geojson(str(tmp_path / "a.geojson"), (10, 10)).count == 1
    assert read_label_image(str(tmp_path / "a.png")).count == 2
    assert read_label_image(str(tmp_path / "a.npy")).count == 2


def test_a_rerun_with_another_split_is_refused(tmp_path: Path) -> None:
    """A finished run re-run with another --split rewrote split.csv and model.json's image lists around the same
    weights: nuclei-eval then scored images the model trained on as test images."""
    from gigaslide.nuclei.train import train_nuclei

    torch.set_num_threads(1)
    root = _data(tmp_path, n=4)
    (root / "a.csv").write_text("image_id,split\nimg0,train\nimg1,train\nimg2,val\nimg3,test\n")
    (root / "b.csv").write_text("image_id,split\nimg0,test\nimg1,val\nimg2,train\nimg3,train\n")
    train_nuclei(_cfg(root, "test_resnet", split=str(root / "a.csv")))
    split, model_json = (root / "run" / "split.csv").read_text(), (root / "run" / "model" / "model.json").read_text()
    with pytest.raises(GigaslideError) as e:
        train_nuclei(_cfg(root, "test_resnet", split=str(root / "b.csv")))
    assert "b.csv differs from the run's split.csv" in str(e.value) and "img0: train -> test" in str(e.value)
    assert (root / "run" / "split.csv").read_text() == split
    assert (root / "run" / "model" / "model.json").read_text() == model_json
    assert train_nuclei(_cfg(root, "test_resnet", split=str(root / "a.csv")))["status"] == "finished"  # its own


def test_counts_and_reports_name_the_weights_and_settings_they_were_made_with(tiny_run: Path, tmp_path: Path) -> None:
    """The per-tile counts named the model's folder only, the evaluation report its folder and backbone: neither said
    which weights (a folder trained again holds others) nor the post-processing, window and precision used."""
    from gigaslide.nuclei import slide as nslide
    from gigaslide.nuclei.evaluate import evaluate
    from gigaslide.nuclei.postprocess import PostParams
    from gigaslide.provenance import read_provenance
    from gigaslide.runs import file_sha256
    from gigaslide.slides.writer import write_pyramidal_tiff

    import h5py

    torch.set_num_threads(1)
    sha = file_sha256(tiny_run / "run" / "model" / "model.safetensors")
    post = PostParams().to_dict()
    img, _, _ = disc_image(192, 20, seed=1)
    write_pyramidal_tiff(tmp_path / "s.tiff", 192, 192, lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(
        ds), int(x0):int(x0) + w * int(ds):int(ds)], mpp=0.25, compression="zlib", tile=128)
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128,
                                                   precision="fp32", tile_size=64), device="cpu")
    assert res.done == ["s"], res.failed
    with h5py.File(tmp_path / "out" / "nuclei" / "s_tiles.h5", "r") as f:
        assert f.attrs["nuclei_model_sha256"] == sha and json.loads(f.attrs["postprocess"]) == post
        assert f.attrs["window"] == 128 and f.attrs["precision"] == "fp32"
    prov = read_provenance(tmp_path / "out" / "nuclei" / "s_tiles.h5")
    assert prov.kind == "nuclei-tiles" and prov.gigaslide_version and prov.extra["nuclei_mpp"] == 0.25
    rep = evaluate(tiny_run / "run", tiny_run / "images", tiny_run / "annotations", tmp_path / "rep", subset="all",
                   n_bootstrap=0, precision="fp32")
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["model_weights_sha256"] == on_disk["provenance"]["model_weights_sha256"] == sha
    assert on_disk["postprocess"] == post and on_disk["precision"] == "fp32" and on_disk["provenance"]["mpp"] == 0.25


def test_a_label_image_whose_header_claims_another_size_is_refused_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 300-byte TIFF whose header says 60 000 x 60 000 px was decoded first (6.7 GB allocated, then compared with
    its image's size); now its header is compared first. Decoding is stubbed out so that the old code fails here
    instead of allocating."""
    import struct

    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint16))
    b = bytearray((tmp_path / "a.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "a.tif") as t:
        for tag in (256, 257):  # ImageWidth, ImageLength
            it = t.pages[0].tags[tag]
            struct.pack_into("<H" if it.dtype == 3 else "<I", b, it.valueoffset, 60000)
    (tmp_path / "a.tif").write_bytes(bytes(b))
    hdr = "{'descr': '<i4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    hdr += " " * (63 - (len(hdr) + 10) % 64) + "\n"
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + b"\0" * 64)

    def never(*a: object, **k: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(tifffile, "imread", never)
    monkeypatch.setattr(np, "load", never)
    for name, size in (("a.tif", "60000x60000"), ("a.npy", "1000000x1000000")):
        with pytest.raises(GigaslideError) as e:
            read_annotation(tmp_path / name, (8, 8))
        assert f"annotation is {size} px but its image is 8x8 px" in str(e.value), str(e.value)


def test_a_qupath_export_of_cells_in_a_region_reads_the_nuclei_only(tmp_path: Path) -> None:
    """QuPath exports the region cell detection ran in (an ``annotation``) beside the cells, whose ``geometry`` is
    the whole cell and ``nucleusGeometry`` the nucleus: the region was read as a nucleus (what the cells left of it)
    with a class of its own, and each nucleus as its cell."""
    from gigaslide.nuclei.annotations import annotation_note, class_names

    def square(x0: int, s: int) -> list:
        return [[[x0, x0], [x0 + s, x0], [x0 + s, x0 + s], [x0, x0 + s], [x0, x0]]]

    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(0, 60)},
              "properties": {"objectType": "annotation", "classification": {"name": "Region*"}}}]
    for k in range(3):
        x = 5 + 18 * k
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x, 5], [x + 14, 5], [
            x + 14, 19], [x, 19], [x, 5]]]}, "nucleusGeometry": {"type": "Polygon", "coordinates": [[[x + 4, 9], [
                x + 10, 9], [x + 10, 15], [x + 4, 15], [x + 4, 9]]]}, "properties": {
            "objectType": "cell", "classification": {"name": "Tumor"}}})
    p = tmp_path / "cells.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    ann = read_annotation(p, (64, 64))
    assert ann.count == 3 and np.bincount(ann.inst.ravel()).tolist() == [64 * 64 - 3 * 36, 36, 36, 36]
    assert ann.type_names == {1: "Tumor"} and class_names([p]) == {"Tumor": p}
    assert "1 QuPath region annotation(s) left out" in annotation_note(ann)
    for f in feats:  # nuclei drawn by hand as annotations (no detection in the file): every one is a nucleus
        f["properties"]["objectType"] = "annotation"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    assert read_annotation(p, (64, 64)).count == 4


def test_segment_slide_takes_a_str_out_folder(tiny_run: Path, tmp_path: Path) -> None:
    """segment_slide (public) joined its ``out`` with ``/``: a str failed with TypeError."""
    from gigaslide.nuclei import slide as nslide
    from gigaslide.nuclei.infer import load_model
    from gigaslide.slides.writer import write_pyramidal_tiff

    torch.set_num_threads(1)
    img, _, _ = disc_image(128, 10, seed=2)
    write_pyramidal_tiff(tmp_path / "s.tiff", 128, 128, lambda x0, y0, w, h, ds: img[int(y0):int(y0) + h * int(ds):int(
        ds), int(x0):int(x0) + w * int(ds):int(ds)], mpp=0.25, compression="zlib", tile=128)
    rec = nslide.segment_slide(str(tmp_path / "s.tiff"), str(tmp_path / "out"), load_model(tiny_run / "run"),
                               nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128,
                                                  precision="fp32", tile_size=64))
    assert rec["slide_id"] == "s" and (tmp_path / "out" / "nuclei" / "s.json").is_file()
    assert nslide.outputs(str(tmp_path / "out"), "s")["geojson"].is_file()


def test_counts_go_on_clam_feature_coordinates_and_not_on_another_scans(tiny_run: Path, tmp_path: Path) -> None:
    """OUT/features/<slide>.h5 in CLAM's layout (coords attrs patch_size / patch_level only) failed the whole run
    with a bare KeyError 'tile_size'; a feature file recording another scan (level-0 mpp 0.5 for a 0.25 µm/px slide)
    had its tiles counted on this one."""
    import h5py

    from gigaslide.nuclei import slide as nslide
    from gigaslide.slides.writer import write_pyramidal_tiff

    torch.set_num_threads(1)
    img, _, _ = disc_image(256, 20, seed=2)
    for name in ("clam", "other"):
        write_pyramidal_tiff(tmp_path / f"{name}.tiff", 256, 256, lambda x0, y0, w, h, ds: img[
            int(y0):int(y0) + h * int(ds):int(ds), int(x0):int(x0) + w * int(ds):int(ds)], mpp=0.25,
                             compression="zlib", tile=128)
        (tmp_path / "out" / "features").mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp_path / "out" / "features" / f"{name}.h5", "w") as f:
            f["features"] = np.zeros((4, 8), np.float32)
            c = f.create_dataset("coords", data=np.array([[0, 0], [128, 0], [0, 128], [128, 128]], np.int64))
            c.attrs["patch_size"], c.attrs["patch_level"] = 128, 0
            if name == "other":
                f.attrs["slide_mpp"] = 0.5
    res = nslide.segment_slides([tmp_path / "clam.tiff", tmp_path / "other.tiff"], tiny_run / "run", tmp_path / "out",
                                nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128,
                                                   precision="fp32"), device="cpu")
    assert res.done == ["clam"] and list(res.failed) == ["other"]
    assert "made from another scan of other" in res.failed["other"]
    with h5py.File(tmp_path / "out" / "nuclei" / "clam_tiles.h5", "r") as f:
        assert f["coords"][:].tolist() == [[0, 0], [128, 0], [0, 128], [128, 128]]
        assert f.attrs["tile_size_level0"] == 128.0


@pytest.mark.parametrize(("key", "value", "says"), [
    ("mpp", "abc", "mpp 'abc' is not a resolution"),  # was used as is: a ValueError in the middle of a slide
    ("mpp", -0.25, "mpp -0.25 is not a resolution"),
    ("n_types", -3, "n_types -3"),  # was a RuntimeError (negative dimension) building the network
    ("decoder_channels", [200000, 64, 32, 16], "decoder_channels [200000"),  # was 5.5 GB allocated before reading
])
def test_a_model_record_with_impossible_values_is_one_line(tiny_run: Path, tmp_path: Path, key: str, value: object,
                                                          says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from gigaslide.nuclei.infer import load_model

    d = tmp_path / "model"
    shutil.copytree(tiny_run / "run" / "model", d)
    rec = json.loads((d / "model.json").read_text())
    rec["spec"][key] = value
    (d / "model.json").write_text(json.dumps(rec))
    built = []
    from gigaslide.nuclei import model as model_mod

    init = model_mod.HoVerNet.__init__

    def spy(self, *a: object, **k: object) -> None:  # the network is never built from such a record
        built.append(1)
        if key == "decoder_channels":
            raise AssertionError("built with 200000 channels")
        init(self, *a, **k)

    monkeypatch.setattr(model_mod.HoVerNet, "__init__", spy)
    with pytest.raises(GigaslideError) as e:
        load_model(d)
    assert says in str(e.value) and "model.json" in str(e.value) and not built

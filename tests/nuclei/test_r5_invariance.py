"""Review round 5: the nuclei found do not depend on how a slide is cut into regions (beyond its seams)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from gigaslide.nuclei import infer
from gigaslide.nuclei import slide as nslide
from gigaslide.nuclei.data import hv_maps
from gigaslide.nuclei.postprocess import CONTEXT_PX, instances
from gigaslide.slides.writer import write_pyramidal_tiff


def _scene(seed: int, h: int = 200, w: int = 400, n: int = 40) -> np.ndarray:
    """Nuclei of radius 3-13 px (a few overlapping a little: touching ones) at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inst = np.zeros((h, w), np.int32)
    k = 0
    for _ in range(400):
        if k >= n:
            break
        r = int(rng.integers(3, 14))
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        if (inst[m] > 0).mean() > 0.1:
            continue
        k += 1
        inst[m & (inst == 0)] = k
    return inst


def _blurred_maps(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NP and HV maps as a model predicts them: the HV maps smoothed (blurred boundaries between touching nuclei)."""
    return (inst > 0).astype(np.float32), np.stack([ndi.gaussian_filter(m, 3.0) for m in hv_maps(inst)])


def _whole(a: np.ndarray, full: np.ndarray) -> np.ndarray:
    """``a`` (a window of ``full``) with only the instances lying wholly inside it, numbered in order."""
    ids = [k for k in np.unique(a) if k and (full == k).sum() == (a == k).sum()]
    return relabel_sequential(np.where(np.isin(a, ids), a, 0))[0]


@pytest.mark.parametrize("seed", range(10))
def test_a_crop_finds_the_nuclei_of_the_whole_image_inside_it(seed: int) -> None:
    """The HV derivatives were scaled by their range over the whole map: a steep nucleus anywhere moved every other
    nucleus' markers, so the crop of a region read with context found other nuclei than the whole image (3 of these
    10 scenes) -- on a slide, the nuclei depended on --region."""
    inst = _scene(seed)
    npp, hv = _blurred_maps(inst)
    whole = instances(npp, hv)
    crop = instances(npp[:, 100:300], hv[:, :, 100:300])
    assert 160 - 100 >= CONTEXT_PX  # the compared window lies CONTEXT_PX inside the crop
    assert np.array_equal(_whole(whole[:, 160:240], whole), _whole(crop[:, 60:140], crop))


def _encoded_slide(path: Path, inst: np.ndarray) -> None:
    """A slide whose pixels carry the maps (R: nucleus or not, G / B: the HV maps), so a "model" that decodes them
    (:func:`_decode`) predicts the same maps wherever a window is read: region borders are the only thing under test."""
    npp, hv = _blurred_maps(inst)
    img = np.stack([np.where(npp > 0, 0, 255), *(np.clip(np.round((m + 1) * 127.5), 0, 255) for m in hv)], -1)
    img = img.astype(np.uint8)
    h, w = inst.shape
    write_pyramidal_tiff(path, w, h, lambda x0, y0, tw, th, ds: img[int(y0):int(y0) + th * int(ds):int(ds),
                                                                     int(x0):int(x0) + tw * int(ds):int(ds)],
                         mpp=0.25, compression="zlib", tile=128)


def _decode(model, image: np.ndarray, **kw):  # noqa: ANN001, ANN003, ANN202
    x = image.astype(np.float32)
    return (x[..., 0] < 128).astype(np.float32), np.stack([x[..., 1], x[..., 2]]) / 127.5 - 1.0, None


def test_the_region_size_does_not_change_the_nuclei_of_a_slide(tiny_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The same slide cut into 128 px regions or read as one region: the same nuclei (outlines, centroids, areas)."""
    monkeypatch.setattr(infer, "predict_maps", _decode)
    inst = np.concatenate([_scene(s, 200, 400) for s in range(2)])  # 400 x 400
    _encoded_slide(tmp_path / "s.tiff", inst)

    def nuclei(region: int) -> list:
        out = tmp_path / f"r{region}"
        res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", out,
                                    nslide.SlideParams(region=region, margin=64, tissue_only=False, precision="fp32",
                                                      tile_size=64))
        assert res.done == ["s"], res.failed
        feats = json.loads((out / "nuclei" / "s.geojson").read_text())["features"]
        return sorted((round(f["properties"]["measurements"]["centroid_x_px"], 3),
                       round(f["properties"]["measurements"]["centroid_y_px"], 3),
                       round(f["properties"]["measurements"]["area_um2"], 4)) for f in feats)

    one = nuclei(1024)
    assert len(one) >= 60
    assert nuclei(128) == one


def test_a_result_made_before_the_local_scaling_is_segmented_again(tiny_run: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A record without the post-processing's parameters was made when the nuclei depended on --region: redone (a
    re-run skipped it, keeping those nuclei), then skipped."""
    monkeypatch.setattr(infer, "predict_maps", _decode)
    _encoded_slide(tmp_path / "s.tiff", _scene(0))
    p = nslide.SlideParams(region=128, margin=64, tissue_only=False, precision="fp32", tile_size=64)
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p).done == ["s"]
    rec_path = tmp_path / "out" / "nuclei" / "s.json"
    rec = json.loads(rec_path.read_text())
    rec["key"].pop("postprocess")  # as the version before wrote it
    rec_path.write_text(json.dumps(rec))
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p)
    assert res.done == ["s"] and not res.skipped
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", p).skipped == ["s"]


@pytest.mark.realdata
def test_monuseg_regions_find_the_whole_images_nuclei(shared_data: Path) -> None:
    """A MoNuSeg image's own nuclei as NP / HV maps (HV blurred as a model's), cut into 256 px regions read with 64 px
    of context: every region's inner nuclei are the whole image's (7 of the 16 regions differed before)."""
    from gigaslide.nuclei.data import find_pairs, load_item

    monuseg = shared_data / "nuclei" / "monuseg2018-test"
    pairs, _ = find_pairs(monuseg / "images", monuseg / "annotations")
    npp, hv = _blurred_maps(load_item(pairs[0], 0.25).inst)
    whole = instances(npp, hv)
    h, w = npp.shape
    for y0 in range(0, h, 256):
        for x0 in range(0, w, 256):
            ys, xs = max(0, y0 - 64), max(0, x0 - 64)
            crop = instances(npp[ys:y0 + 320, xs:x0 + 320], hv[:, ys:y0 + 320, xs:x0 + 320])
            assert np.array_equal(_whole(whole[y0:y0 + 256, x0:x0 + 256], whole),
                                  _whole(crop[y0 - ys:y0 - ys + 256, x0 - xs:x0 - xs + 256], crop)), (y0, x0)

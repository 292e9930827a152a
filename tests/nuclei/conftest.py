"""Synthetic nuclei images: purple discs (known instances) on pink stroma."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def disc_image(size: int = 256, n: int = 12, radius: tuple[int, int] = (6, 10), seed: int = 0,
               touching: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(RGB uint8, instance map, polygons [K,2] x,y) of non-overlapping discs (pairs touching if asked)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    inst = np.zeros((size, size), np.int32)
    polys = []
    k = 0
    for _ in range(n * 20):
        if k >= n:
            break
        r = int(rng.integers(*radius))
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        if (inst[m] > 0).any() or ((xx - cx) ** 2 + (yy - cy) ** 2 <= (r + 2) ** 2)[inst > 0].any():
            continue
        k += 1
        inst[m] = k
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        polys.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1))
    noise = rng.normal(0, 6, (size, size, 3))
    img = np.where(inst[..., None] > 0, np.array([95, 50, 140]), np.array([230, 170, 205])) + noise
    return img.clip(0, 255).astype(np.uint8), inst, polys


def write_xml(path: Path, polys: list[np.ndarray], mpp: float = 0.25) -> None:
    """Aperio / MoNuSeg XML (corner coordinates, as ImageScope: pixel centres + 0.5), one Region per nucleus."""
    regions = []
    for i, p in enumerate(polys):
        verts = "".join(f'<Vertex X="{x + 0.5:.2f}" Y="{y + 0.5:.2f}"/>' for x, y in p)
        regions.append(f'<Region Id="{i + 1}"><Vertices>{verts}</Vertices></Region>')
    path.write_text(f'<Annotations MicronsPerPixel="{mpp}"><Annotation Id="1"><Regions>{"".join(regions)}'
                    '</Regions></Annotation></Annotations>')


@pytest.fixture
def nuclei_folder(tmp_path: Path) -> Path:
    """tmp/images/img{k}.png + tmp/annotations/img{k}.xml (6 images, 2 'organs') at 0.25 µm/px."""
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    rows = ["image_id,organ"]
    for k in range(6):
        img, _, polys = disc_image(160, 10, seed=k)
        Image.fromarray(img).save(tmp_path / "images" / f"img{k}.png")
        write_xml(tmp_path / "annotations" / f"img{k}.xml", polys)
        rows.append(f"img{k},{'a' if k % 2 else 'b'}")
    (tmp_path / "organs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


TINY = dict(backbone="test_resnet", weights="random", epochs=2, steps_per_epoch=3, batch_size=2, crop=64, lr=1e-3,
            precision="fp32")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny nuclei run (test_resnet, a few steps) on 6 synthetic images."""
    root = _data_root(tmp_path_factory, "nuc")
    for k in range(6):
        img, _, polys = disc_image(96, 6, seed=k)
        Image.fromarray(img).save(root / "images" / f"img{k}.png")
        write_xml(root / "annotations" / f"img{k}.xml", polys)
    return _train_tiny(root)


def _data_root(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    return root


def _train_tiny(root: Path, **extra: object) -> Path:
    """A tiny run (:data:`TINY`) on ``root``'s images and annotations, into ``root/run``; returns ``root``."""
    import torch

    from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei

    torch.set_num_threads(1)
    train_nuclei(NucleiTrainConfig(images=str(root / "images"), annotations=str(root / "annotations"),
                                   out=str(root / "run"), **extra, **TINY))
    return root


def write_geojson(path: Path, polys: list[np.ndarray], names: list[str | None]) -> None:
    """QuPath GeoJSON (corner coordinates: pixel centres + 0.5), one classified polygon per nucleus."""
    feats = []
    for p, name in zip(polys, names):
        ring = (np.vstack([p, p[:1]]) + 0.5).tolist()
        props = {"classification": {"name": name}} if name is not None else {}
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


@pytest.fixture(scope="session")
def typed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny nuclei run on GeoJSON annotations with classes: img0 has Lymphocyte and Tumor nuclei, the
    others Tumor only (so a per-file numbering would make Tumor 2 in img0 and 1 elsewhere)."""
    root = _data_root(tmp_path_factory, "nuc_typed")
    for k in range(4):
        img, _, polys = disc_image(96, 6, seed=k)
        Image.fromarray(img).save(root / "images" / f"img{k}.png")
        names = ["Lymphocyte" if k == 0 and i % 2 else "Tumor" for i in range(len(polys))]
        write_geojson(root / "annotations" / f"img{k}.geojson", polys, names)
    (root / "split.csv").write_text("image_id,split\nimg0,train\nimg1,train\nimg2,val\nimg3,test\n")
    return _train_tiny(root, image_mpp=0.25, split=str(root / "split.csv"))

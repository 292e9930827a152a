"""A tiny encode output + MIL run on generated slides (shared by tests/viewer and tests/export)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

SIZE = (1024, 768)
N_SLIDES = 6


@dataclass
class Tiny:
    root: Path
    out: Path  # encode output
    run: Path  # train-mil run
    slides: list[Path]


def build(root: Path) -> Tiny:
    import torch

    from gigaslide.encoders import build_encoder
    from gigaslide.features.extract import encode_slides
    from gigaslide.mil.cv import run_cv
    from gigaslide.mil.train import TrainConfig
    from gigaslide.testing import make_slide
    from gigaslide.tiling import TilingParams

    torch.set_num_threads(1)
    slides = [make_slide(root / "slides" / f"s{i}.tiff", SIZE, mpp=1.0, seed=i, blobs=2) for i in range(N_SLIDES)]
    enc = build_encoder("test_resnet", "random", seed=0)
    out = root / "out"
    res = encode_slides(slides, out, enc, TilingParams(mpp=1.0, tile_size=64, min_tissue=0.25), batch_size=32,
                        workers=0, precision="fp32")
    assert not res.failed, res.failed
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(N_SLIDES)))
    run = root / "run"
    run_cv(out, labels, run, cfg=TrainConfig(model="abmil", epochs=3, patience=3, hidden=16, lr=3e-3),
           folds=2, val_fraction=0.0, n_bootstrap=0, verbose=False)
    return Tiny(root, out, run, slides)


_BUILT: list[Tiny] = []


def build_once(tmp_path_factory) -> Tiny:  # noqa: ANN001
    """One tiny project per test session, shared by tests/viewer and tests/export."""
    if not _BUILT:
        _BUILT.append(build(tmp_path_factory.mktemp("tiny")))
    return _BUILT[0]


def copy(t: Tiny, dest: Path) -> Tiny:
    """A private copy (tests that break files)."""
    shutil.copytree(t.root, dest)
    out = dest / "out"
    import json

    man = json.loads((out / "manifest.json").read_text())  # slide paths point into the copy
    for v in man["slides"].values():
        v["path"] = str(dest / "slides" / Path(v["path"]).name)
    (out / "manifest.json").write_text(json.dumps(man))
    return Tiny(dest, out, dest / "run", [dest / "slides" / p.name for p in t.slides])

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


ORIGIN, STEP = (40, 24), 100  # the fake StreamingCLAM grids: 100 level-0 px positions from (40, 24)


def grid_cell(x: float, y: float) -> tuple[int, int]:
    """(column, row) of the fake grid position containing level-0 point (x, y)."""
    return int((x - ORIGIN[0]) // STEP), int((y - ORIGIN[1]) // STEP)


def streaming_run(dest: Path, planted: dict[tuple[str, int], tuple[int, int]], held_out: dict[str, int],
                  size: tuple[int, int] = SIZE, with_probs: bool = False) -> Path:
    """A StreamingCLAM run folder as ``heatmap-streaming`` leaves it, without training: for each (slide_id, fold)
    of ``planted``, a 9 x 7 attention grid (100 px positions from (40, 24)) whose single high-attention position is
    ``planted[...]`` (column, row); ``held_out`` gives each slide's test fold (predictions.csv). ``with_probs``:
    per-position P(class 1) = column / 8 (a mean / max head)."""
    import json

    import numpy as np

    from gigaslide.evaluation.slides import write_predictions
    from gigaslide.streaming.grids import AttentionGrid, save_grid

    dest.mkdir(parents=True)
    (dest / "run.json").write_text(json.dumps({"run_kind": "streaming", "config": {"head": "clam_sb"}}))
    ids = sorted(held_out)
    write_predictions(dest / "predictions.csv", ids, [0] * len(ids), np.full((len(ids), 2), 0.5), [held_out[s] for s in ids])
    cols, rows = np.meshgrid(np.arange(9), np.arange(7))
    coords = np.stack([ORIGIN[0] + cols.ravel() * STEP, ORIGIN[1] + rows.ravel() * STEP], 1)
    rng = np.random.default_rng(0)
    for (sid, fold), (c, r) in planted.items():
        att = rng.uniform(0, 0.1, len(coords))
        att[r * 9 + c] = 5.0
        probs = np.stack([1 - cols.ravel() / 8, cols.ravel() / 8], 1) if with_probs else None
        save_grid(dest, AttentionGrid(sid, fold, coords, att, STEP, (7, 9), np.array([0.3, 0.7]), size, probs))
    return dest


def overlay_screen(c, slide: str, layer: str, query: str = ""):  # noqa: ANN001, ANN201
    """A tiny slide's whole overlay ``layer`` at level-0 resolution (top Deep Zoom level 10, 4 x 3 overlay tiles of
    256 px), RGBA, fetched through the viewer's test client ``c``."""
    import io

    import numpy as np
    from PIL import Image

    out = np.zeros((768, 1024, 4), np.uint8)
    for col in range(4):
        for row in range(3):
            r = c.get(f"/api/slides/{slide}/overlay/{layer}/10/{col}_{row}.png{query}")
            assert r.status_code == 200, r.text
            out[row * 256:(row + 1) * 256, col * 256:(col + 1) * 256] = np.asarray(Image.open(io.BytesIO(r.content)))
    return out

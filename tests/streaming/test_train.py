"""StreamingCLAM end to end on tiny synthetic slides: canvases, CLI training, resume, heatmap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gigaslide.cli.main import main
from gigaslide.streaming.data import read_canvas
from gigaslide.testing import make_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("slides")
    rows = ["slide_id,label"]
    for i in range(6):
        make_slide(d / f"s{i}.tif", (1024, 768), mpp=0.5, seed=i, blobs=1 + i % 2)
        rows.append(f"s{i},{i % 2}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


def test_canvas_is_tissue_cropped_and_padded(slides) -> None:  # noqa: ANN001
    c = read_canvas(slides / "s0.tif", mpp=2.0, image_size=4096, multiple=32)
    h, w = c.content_size
    assert c.image.dtype == np.uint8 and c.image.shape[0] == 3
    assert c.image.shape[1] % 32 == 0 and c.image.shape[2] % 32 == 0
    assert h < 768 // 4 + 8 or w < 1024 // 4 + 8  # cropped to tissue (or close to the whole slide)
    assert (c.image[:, h:, :] == 245).all()
    capped = read_canvas(slides / "s0.tif", mpp=2.0, image_size=64, multiple=32)
    assert capped.image.shape[1:] == (64, 64)


def test_cli_train_resume_and_heatmap(slides, tmp_path) -> None:  # noqa: ANN001
    args = ["train-streaming", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(tmp_path / "run"),
            "--mpp", "4.0", "--image-size", "256", "--tile-size", "512", "--encoder", "resnet18", "--folds", "2",
            "--epochs", "2", "--freeze-epochs", "1", "--accumulate", "2", "--seed", "0"]
    assert main(args) == 0
    run = tmp_path / "run"
    pred = (run / "predictions.csv").read_text().splitlines()
    assert pred[0].startswith("slide_id,label,prob_0,prob_1,fold") and len(pred) == 7
    ev = json.loads((run / "evaluation.json").read_text())
    assert 0.0 <= ev["metrics"]["auc"]["value"] <= 1.0 and ev["n_slides"] == 6
    state = json.loads((run / "fold0" / "state.json").read_text())
    assert [h["trunk_frozen"] for h in state["history"]] == [True, False]
    assert state["best_epoch"] == 1  # selection starts when the trunk unfreezes: the kept model is end-to-end trained
    assert (run / "fold0" / "best.safetensors").is_file()
    before = (run / "fold1" / "predictions.csv").stat().st_mtime_ns
    assert main(args) == 0  # finished folds are skipped on a re-run
    assert (run / "fold1" / "predictions.csv").stat().st_mtime_ns == before
    assert main([*args[:-2], "--seed", "1"]) == 2  # other settings in the same run folder: refused, nothing mixed
    png = tmp_path / "att.png"
    assert main(["heatmap-streaming", str(slides / "s1.tif"), "--run", str(run), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_cli_refuses_bad_input(slides, tmp_path, capsys) -> None:  # noqa: ANN001
    base = ["train-streaming", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(tmp_path / "r")]
    assert main(base + ["--tile-size", "256", "--encoder", "resnet18"]) == 2
    assert "minimum 480 px" in capsys.readouterr().err
    assert main(base + ["--encoder", "no_such_net"]) == 2
    assert "unknown encoder 'no_such_net'" in capsys.readouterr().err
    assert main(["heatmap-streaming", str(slides / "s1.tif"), "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2


def test_canvas_cache_is_reused_and_memory_mapped(slides, tmp_path) -> None:  # noqa: ANN001
    from gigaslide.streaming.data import cached_canvas

    a = cached_canvas(slides / "s2.tif", tmp_path / "cache", 2.0, 4096, 32)
    b = cached_canvas(slides / "s2.tif", tmp_path / "cache", 2.0, 4096, 32)
    assert isinstance(b.image, np.memmap) and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert b.origin == a.origin and b.content_size == a.content_size
    c = cached_canvas(slides / "s2.tif", tmp_path / "cache", 4.0, 4096, 32)  # other mpp: re-read, not the stale cache
    assert c.image.shape[1] < a.image.shape[1]
    xy = a.position_coords((2, 3), 32)
    assert xy.shape == (6, 2) and tuple(xy[0]) == a.origin and xy[1, 0] - xy[0, 0] == 32 * 4  # 2.0 / 0.5 level-0 px per px

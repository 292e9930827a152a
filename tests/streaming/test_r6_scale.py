"""Round 6: StreamingCLAM at cohort scale and on degenerate numbers -- descriptors per canvas, NaN losses."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from gigaslide.streaming.data import cached_canvas
from gigaslide.testing import make_slide

from .conftest import labelled_slides


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd (Linux)")
def test_cached_canvases_hold_no_file_descriptor(tmp_path) -> None:  # noqa: ANN001
    """A run keeps every slide's canvas for all its epochs; each used to hold its cache file's memory map, i.e. one
    open descriptor per slide: 'Too many open files' from ~1000 slides on under ``ulimit -n 1024``."""
    s = make_slide(tmp_path / "s.tif", (512, 384), mpp=0.5, seed=0, blobs=1)
    cache = tmp_path / "cache"
    first = cached_canvas(s, cache, 2.0, 4096, 32)  # written to the cache
    before = len(os.listdir("/proc/self/fd"))
    held = [first] + [cached_canvas(s, cache, 2.0, 4096, 32) for _ in range(40)]  # read from the cache
    assert len(os.listdir("/proc/self/fd")) - before < 5
    # the pixels are still the cache's, memory-mapped when used
    assert all(c.path == first.path for c in held) and isinstance(held[-1].image, np.memmap)
    assert held[-1].shape == first.shape and np.array_equal(np.asarray(held[-1].image), np.load(first.path))
    assert held[0].pixels().shape[1:] == first.shape


ARGS = ["--mpp", "1.0", "--image-size", "320", "--tile-size", "256", "--encoder", "test_resnet", "--weights", "random",
        "--pool-kernel", "2", "--folds", "2", "--epochs", "3", "--freeze-epochs", "1", "--accumulate", "1",
        "--precision", "fp32", "--seed", "0", "--checkpoint-blocks", "false"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):  # noqa: ANN001, ANN201
    return labelled_slides(tmp_path_factory.mktemp("slides"), 8, (256, 256), tile=128)


def _train(slides, out, *extra: str) -> int:  # noqa: ANN001
    from gigaslide.cli.main import main

    return main(["train-streaming", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(out),
                 *ARGS, *extra])


def _finite_checkpoint(out) -> dict:  # noqa: ANN001
    import torch

    from gigaslide import runs

    ck = runs.load_checkpoint(out, "fold0")
    assert ck is not None
    assert all(bool(torch.isfinite(v).all()) for v in ck["model"].values() if v.is_floating_point())
    return ck


def test_a_loss_that_becomes_nan_stops_naming_fold_epoch_and_slide(small, tmp_path, monkeypatch,
                                                                    capsys) -> None:  # noqa: ANN001
    """A NaN loss at epoch 1 (the trunk just unfrozen): one line naming fold, epoch and slide, the exit status of an
    error, no best weights from it and a checkpoint without NaN -- the run used to go on printing 'train nan' epoch
    after epoch and end in a FileNotFoundError traceback (no best checkpoint to test)."""
    from gigaslide.streaming import train

    real, calls = train.step_loss, []

    def nan_at_epoch_1(model, canvas, label, cfg, device, dtype, aug):  # noqa: ANN001, ANN202
        loss, p = real(model, canvas, label, cfg, device, dtype, aug)
        if model.training:  # fold 0 trains on 2 slides per epoch: the 3rd training step is epoch 1's first
            calls.append(canvas.slide_id)
        return (loss * float("nan") if model.training and len(calls) == 3 else loss), p

    monkeypatch.setattr(train, "step_loss", nan_at_epoch_1)
    out = tmp_path / "run"
    assert _train(small, out) != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"loss became nan at fold 0, epoch 1, slide {calls[2]}:" in lines[0] and "--lr" in lines[0], lines[0]
    assert not (out / "fold0" / "best.safetensors").exists()  # the frozen epoch 0 selects nothing; epoch 1 diverged
    assert _finite_checkpoint(out)["epoch"] == 1


def test_diverging_learning_rate_stops_without_saving_nan_weights(small, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    assert _train(small, out, "--lr", "1e30", "--trunk-lr", "1e30", "--freeze-epochs", "0") != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "training diverged" in err and "fold 0, epoch 0" in err, err
    assert not (out / "fold0" / "best.safetensors").exists() and not (out / "predictions.csv").exists()
    ck = None
    from gigaslide import runs

    if runs.read_checkpoint_record(out, "fold0") is not None:  # a checkpoint, if any, holds no NaN
        ck = _finite_checkpoint(out)
    assert ck is None or ck["epoch"] == 0


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="RLIMIT_FSIZE / SIGXFSZ (POSIX)")
def test_canvas_cache_on_a_full_disk_is_one_line_naming_the_file(tmp_path) -> None:  # noqa: ANN001
    """A write that the disk cuts short (here a file-size limit; a full disk alike): numpy's ``tofile`` reported it as
    'OSError: 36864 requested and 36736 written' (no errno: a traceback); now the write's own error, one line naming
    the cache file, and no temporary or half canvas left."""
    import subprocess
    import textwrap

    s = make_slide(tmp_path / "s.tif", (512, 384), mpp=0.5, seed=0, blobs=1)
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import resource, signal
        from gigaslide.errors import GigaslideError
        from gigaslide.streaming.data import cached_canvas
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # the canvas is 3 x 128 x 96 = 36864 bytes
        try:
            cached_canvas({str(s)!r}, {str(cache)!r}, 2.0, 4096, 32)
        except GigaslideError as e:
            print("ERR", e.one_line())
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"ERR {cache / 's.npy'}: cannot write (File too large)"), r.stdout
    assert sorted(p.name for p in cache.iterdir()) == []


def test_weights_that_become_nan_at_an_epochs_last_step_are_not_checkpointed(small, tmp_path, monkeypatch,
                                                                              capsys) -> None:  # noqa: ANN001
    """Epoch 0's losses are finite, its last optimizer step makes a weight NaN: the epoch's checkpoint (and a best
    model selected on it) used to be saved with the NaN; now the fold stops at that epoch, naming it."""
    import torch

    real, steps = torch.optim.AdamW.step, []

    def step(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real(self, *a, **k)
        steps.append(1)
        if len(steps) == 2:  # fold 0 trains on 2 slides: epoch 0's last step
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert _train(small, out, "--freeze-epochs", "0") != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fold 0, epoch 0, on the validation slides: training diverged" in err, err
    assert not (out / "fold0" / "best.safetensors").exists()
    from gigaslide import runs

    assert runs.read_checkpoint_record(out, "fold0") is None  # epoch 0's end-of-epoch checkpoint was not written


def test_nan_test_predictions_do_not_finish_a_fold(small, tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """A fold whose test predictions are NaN (fp16 overflow on a test slide): one line naming the fold and the slide,
    and the fold is not written as finished -- its NaN predictions.csv made every re-run skip the fold and fail at the
    pooled evaluation ('predictions contain NaN/inf')."""
    from gigaslide.streaming import cv

    real, bad = cv.evaluate, []

    def nan_on_test(model, canvases, labels, cfg, device, dtype):  # noqa: ANN001, ANN202
        loss, probs = real(model, canvases, labels, cfg, device, dtype)
        if len(canvases) == 4:  # fold 0's test slides (its validation split holds 2)
            probs[1] = np.nan
            bad.append(canvases[1].slide_id)
        return loss, probs

    monkeypatch.setattr(cv, "evaluate", nan_on_test)
    out = tmp_path / "run"
    assert _train(small, out, "--epochs", "2") != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"fold 0's model predicts NaN/inf on 1 test slide(s) (e.g. {bad[0]})" in err, err
    assert not (out / "fold0" / "predictions.csv").exists() and (out / "fold0" / "best.safetensors").is_file()


def test_heatmap_of_a_nan_model_is_refused_not_drawn(small, tmp_path, capsys) -> None:  # noqa: ANN001
    """A checkpoint with a NaN weight: heatmap-streaming printed 'P = [nan, nan]', exited 0 and saved the NaN grid for
    the viewer; now one line naming the checkpoint, and no grid."""
    from safetensors.torch import load_file, save_file

    from gigaslide.cli.main import main

    out = tmp_path / "run"
    assert _train(small, out, "--epochs", "1", "--freeze-epochs", "0", "--folds", "2") == 0
    ckpt = out / "fold0" / "best.safetensors"
    sd = load_file(str(ckpt))
    sd["head.classifier.bias"] = sd["head.classifier.bias"] * float("nan")
    save_file(sd, str(ckpt))
    capsys.readouterr()
    assert main(["heatmap-streaming", str(small / "s0.tif"), "--run", str(out), "--out", str(tmp_path / "h.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {ckpt}: the checkpoint holds NaN/inf weights") and "\n" not in err, err
    assert not (out / "heatmaps").exists()


def test_a_blank_slide_is_said_not_silent(tmp_path, capsys) -> None:  # noqa: ANN001
    """A slide without tissue (blank glass) is read whole -- and the run and the heatmap now say so (were silent)."""
    from gigaslide.cli.main import main

    d = tmp_path / "slides"
    rows = ["slide_id,label"]
    for i in range(4):
        make_slide(d / f"n{i}.tif", (256, 256), mpp=0.5, seed=i + 1, blobs=1 + i % 2, tile=128)  # seed 0: no tissue
        rows.append(f"n{i},{i % 2}")
    make_slide(d / "blank.tif", (256, 256), mpp=0.5, blank=True, tile=128)
    (d / "labels.csv").write_text("\n".join([*rows, "blank,0"]) + "\n")
    c = cached_canvas(d / "blank.tif", tmp_path / "cache", 1.0, 320, 32)
    assert not c.tissue and c.content_size == (256 // 2, 256 // 2)  # the whole slide
    assert not cached_canvas(d / "blank.tif", tmp_path / "cache", 1.0, 320, 32).tissue  # recorded in the cache
    assert cached_canvas(d / "n0.tif", tmp_path / "cache", 1.0, 320, 32).tissue
    out = tmp_path / "run"
    assert _train(d, out, "--epochs", "1", "--freeze-epochs", "0") == 0
    assert "no tissue found on 1 slide(s) (blank): each is read whole" in capsys.readouterr().out
    assert main(["heatmap-streaming", str(d / "blank.tif"), "--run", str(out), "--out", str(tmp_path / "h.png")]) == 0
    assert "no tissue found on the slide: it was read whole" in capsys.readouterr().out


def test_a_truncated_canvas_cache_file_is_read_again(tmp_path) -> None:  # noqa: ANN001
    """A damaged cache file (truncated: a disk fault, a half copy) was taken as the cached canvas: a ValueError
    traceback ('mmap length is greater than file size'); now the slide is read again."""
    s = make_slide(tmp_path / "s.tif", (512, 384), mpp=0.5, seed=1, blobs=1)
    cache = tmp_path / "cache"
    want = np.array(cached_canvas(s, cache, 2.0, 4096, 32).image)
    with open(cache / "s.npy", "r+b") as f:
        f.truncate(1000)
    again = cached_canvas(s, cache, 2.0, 4096, 32)
    assert np.array_equal(np.asarray(again.image), want) and again.pixels().shape == (3, *want.shape[1:])

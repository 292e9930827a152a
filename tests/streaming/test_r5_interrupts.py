"""train-streaming interrupted or refused: temporaries a kill -9 left are removed on resume, Ctrl-C / SIGTERM exit
non-zero, a refused cohort leaves no run folder (so the error's fix works on the same --out), and what --help says
about --precision auto on a CPU is what the run records."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.testing import make_slide

from .test_train import slides  # noqa: F401 - the fixture: the same six generated slides and labels.csv

# as tests/streaming/test_train.py, one epoch (the trunk trains in it): canvases of 2 tiles and of one
ARGS = ["--mpp", "1.5", "--image-size", "320", "--tile-size", "256", "--encoder", "test_resnet", "--weights", "random",
        "--pool-kernel", "2", "--folds", "2", "--epochs", "1", "--freeze-epochs", "0", "--accumulate", "1",
        "--seed", "0", "--checkpoint-blocks", "false"]


def _args(slides: Path, out: Path, *extra: str, labels: Path | None = None) -> list[str]:
    return ["train-streaming", "--slides", str(slides), "--labels", str(labels or slides / "labels.csv"), "--out",
            str(out), *ARGS, *extra]


def _one_thread(fn, *a):  # noqa: ANN001, ANN002, ANN202
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*a)
    finally:
        torch.set_num_threads(threads)


def test_a_killed_runs_temporaries_are_removed_and_an_out_named_json_finishes(slides, tmp_path,  # noqa: ANN001
                                                                               capsys) -> None:
    """kill -9 while a canvas (the cache) or a fold's best weights were written left their temporary files for ever
    (measured: `.tmp-s0.npy.*.npy` in canvases/, `.tmp-best.safetensors.*` in fold0/, still there after the resumed
    run finished; at the paper's scale a canvas is up to 12 GB). The resume removes them (the run lock is held). And
    an --out folder named '*.json' was taken for the evaluation file itself: IsADirectoryError after all the training.
    --precision auto on a CPU trains in fp32, as --help says."""
    from gigaslide import runs
    from gigaslide.cli.streaming import train_streaming

    out = tmp_path / "cohort.json"
    assert _one_thread(main, _args(slides, out, "--budget", "0.01s", "--precision", "auto")) == 0  # a first step
    left = [out / "canvases" / ".tmp-s0.npy.k9x2m4qa.npy", out / "fold0" / ".tmp-best.safetensors.q1w2e3r4.safetensors",
            out / "fold0" / ".tmp-predictions.csv.z8y7x6w5"]
    for f in left:
        f.write_bytes(b"half written")
    capsys.readouterr()
    assert _one_thread(main, _args(slides, out, "--precision", "auto")) == 0, capsys.readouterr().err
    assert not any(f.exists() for f in left) and not list(out.rglob(".tmp-*"))
    assert (out / "evaluation.json").is_file() and (out / "predictions.csv").is_file()
    rec = runs.read_run(out)
    assert rec["status"] == "finished" and rec["precision"]["resolved"] == "fp32"
    doc = " ".join(train_streaming.__doc__.split())
    assert "fp32 on a CPU" in doc  # it said 'on CPU bf16 only when it agrees with fp32': never checked in training
    # the tile size changes speed only, but not bit for bit: a resume with another one is refused, as --help now says
    assert main(_args(slides, out, "--precision", "auto", "--tile-size", "320")) == 2
    assert "tile_size: 256 -> 320" in capsys.readouterr().err and "a run resumes with its own tile size" in doc


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_in_training_stops_cleanly_with_a_non_zero_status(sig, status, slides,  # noqa: ANN001
                                                                             tmp_path, capsys, monkeypatch) -> None:
    """A Ctrl-C (or SIGTERM) during training stopped at the next optimizer step, as it should, but the command then
    exited 0 -- as if training had finished (`train-streaming ... && heatmap-streaming ...` went on); a Ctrl-C while
    the canvases were read exited 130. Both now exit non-zero; the checkpoint of the stop is saved."""
    import gigaslide.streaming.train as T
    from gigaslide import runs

    real, sent = T.step_loss, []

    def signalled(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if not sent:  # the signal arrives during the first training step
            sent.append(signal.raise_signal(sig))
        return real(*a, **k)

    monkeypatch.setattr(T, "step_loss", signalled)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _one_thread(main, _args(slides, out, "--precision", "fp32"))
    assert e.value.code == status
    rec = runs.read_run(out)
    assert rec["status"] == "stopped" and rec["stop_reason"] == ("interrupt" if sig == signal.SIGINT else "signal")
    assert (runs.load_checkpoint(out, "fold0")["epoch"], runs.load_checkpoint(out, "fold0")["pos"]) == (0, 1)
    assert "stopped (" in capsys.readouterr().out


def test_a_refused_cohort_leaves_no_run_folder_and_the_fix_runs_there(slides, tmp_path, capsys) -> None:  # noqa: ANN001
    """A slide without a resolution, or a class of one slide, was refused only after the run folder was made (and
    every canvas read): its run.json pinned the options and inputs, so following the error's own fix on the same
    --out (--slide-mpp mpp.csv; more slides of the class) was refused as 'run folder holds another run'."""
    d = tmp_path / "slides"
    shutil.copytree(slides, d)
    make_slide(d / "s5.tif", (1024, 768), mpp=None, seed=5, blobs=2)  # s5's pixels, no mpp in the file
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\ns5,0.5\n")
    out = tmp_path / "run"
    assert main(_args(d, out)) == 2
    err = capsys.readouterr().err
    assert "s5.tif" in err and "no resolution" in err and "--slide-mpp" in err and err.count("\n") == 1
    assert not out.exists()
    assert _one_thread(main, _args(d, out, "--slide-mpp", str(tmp_path / "mpp.csv"), "--budget", "0.01s")) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert json.loads((out / "canvases" / "s5.json").read_text())["slide_mpp"] == 0.5
    one = tmp_path / "one.csv"  # class 1 has one slide: no two folds
    one.write_text("slide_id,label\ns0,0\ns1,1\ns2,0\ns4,0\n")
    capsys.readouterr()
    assert main(_args(slides, tmp_path / "run1", labels=one)) == 2
    err = capsys.readouterr().err
    assert "class 1 has only 1" in err and err.count("\n") == 1 and not (tmp_path / "run1").exists()


def test_a_heatmap_grid_removes_the_temporary_a_killed_heatmap_left(tmp_path) -> None:  # noqa: ANN001
    """heatmap-streaming writes its grid into the run folder without the run lock; a kill during the write left
    `heatmaps/fold0/.tmp-<slide>.npz.*` behind, also after the heatmap was made again."""
    from gigaslide.streaming.grids import AttentionGrid, grid_path, load_grid, save_grid

    g = AttentionGrid("001", 0, np.array([[0, 0], [64, 0]]), np.array([0.25, 0.75]), 64.0, (1, 2), np.array([0.4, 0.6]),
                      (128, 64))
    stale = grid_path(tmp_path, "001", 0).parent / ".tmp-001.npz.k9x2m4qa.npz"
    other = grid_path(tmp_path, "002", 0).parent / ".tmp-002.npz.k9x2m4qa.npz"  # another slide's: maybe being written
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    other.write_bytes(b"half")
    save_grid(tmp_path, g)
    assert not stale.exists() and other.exists()
    got = load_grid(tmp_path, "001", 0)
    assert got.slide_id == "001" and got.attention.tolist() == [0.25, 0.75]


def test_a_canvas_is_read_again_for_another_scan_of_the_same_size_under_the_same_name(tmp_path: Path) -> None:
    """The canvas cache knew a replaced slide by its dimensions only: another scan of the same size put in place under
    the same name gave back the old slide's canvas (measured: cached == old canvas, != a fresh read). It records the
    file's identity now (size, hash of sampled blocks); a cache written before is reused while the slide file has not
    changed since it was written."""
    from gigaslide.streaming.data import cached_canvas, read_canvas

    s, cache = tmp_path / "s.tif", tmp_path / "cache"
    make_slide(s, (1024, 768), mpp=0.5, seed=1, blobs=1)
    first = np.array(cached_canvas(s, cache, 2.0, 4096, 32).image)  # (a cached canvas maps its file when used)
    make_slide(s, (1024, 768), mpp=0.5, seed=7, blobs=2)  # another scan: same name, same dimensions and mpp
    new = cached_canvas(s, cache, 2.0, 4096, 32)
    want = read_canvas(s, 2.0, 4096, 32)
    assert new.origin == want.origin and np.array_equal(np.asarray(new.image), want.image)
    assert not (new.image.shape == first.shape and np.array_equal(np.asarray(new.image), first))
    again = cached_canvas(s, cache, 2.0, 4096, 32)
    assert again.path == new.path and np.array_equal(np.asarray(again.image), want.image)
    meta = cache / "s.json"  # an older cache, without the key, written after the slide: reused, not read again
    m = json.loads(meta.read_text())
    del m["slide_identity"]
    meta.write_text(json.dumps(m))
    np.save(cache / "s.npy", np.zeros_like(want.image))  # marks the cached pixels: a re-read would restore them
    assert not np.asarray(cached_canvas(s, cache, 2.0, 4096, 32).image).any()

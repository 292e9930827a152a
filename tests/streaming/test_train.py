"""StreamingCLAM end to end on tiny synthetic slides: canvases, CLI training on the run layer, resume
(budget stop and kill -9, bit-exact), refusals, pooled heatmap coordinates."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.streaming.data import cached_canvas, read_canvas, tissue_box
from gigaslide.testing import make_slide

from .conftest import labelled_slides

# test_resnet (tiny timm ResNet, stride 32), pool kernel 2: the two-blob slides' canvases (256 x 320 px) stream
# over 2 tiles of 256 px; the one-blob slides give canvases smaller than one tile (a single dense pass)
ARGS = ["--mpp", "1.5", "--image-size", "320", "--tile-size", "256", "--encoder", "test_resnet", "--weights", "random",
        "--pool-kernel", "2", "--folds", "2", "--epochs", "2", "--freeze-epochs", "1", "--accumulate", "1",
        "--precision", "fp32", "--seed", "0", "--checkpoint-blocks", "false"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):  # noqa: ANN001, ANN201
    return labelled_slides(tmp_path_factory.mktemp("slides"), 6)


def _args(slides: Path, out: Path, *extra: str) -> list[str]:
    return ["train-streaming", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(out), *ARGS, *extra]


@pytest.fixture(scope="module")
def ref_run(slides, tmp_path_factory):  # noqa: ANN001, ANN201
    """One uninterrupted run (1 torch thread, like the subprocess runs it is compared with)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(slides, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_results(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    for k in (0, 1):
        x, y = load_file(str(a / f"fold{k}" / "best.safetensors")), load_file(str(b / f"fold{k}" / "best.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_canvas_is_tissue_cropped_and_padded(slides) -> None:  # noqa: ANN001
    from gigaslide.slides import open_slide

    with open_slide(slides / "s1.tif") as s:
        x0, y0, x1, y1 = tissue_box(s)
    assert (x1 - x0) * (y1 - y0) < 0.5 * 1024 * 768  # one blob: the box is well inside the slide
    c = read_canvas(slides / "s1.tif", mpp=2.0, image_size=4096, multiple=32)
    assert c.content_size == (round((y1 - y0) / 4), round((x1 - x0) / 4)) and c.origin == (x0, y0)
    h, w = c.content_size
    assert c.image.dtype == np.uint8 and c.image.shape == (3, -(-h // 32) * 32, -(-w // 32) * 32)
    assert (c.image[:, h:, :] == 245).all() and (c.image[:, :, w:] == 245).all()
    assert not (c.image[:, :h, :w] == 245).all()
    capped = read_canvas(slides / "s0.tif", mpp=2.0, image_size=64, multiple=32)
    assert capped.image.shape[1:] == (64, 64)


def test_cli_trains_pools_folds_and_refuses_another_pool_kernel(slides, ref_run, tmp_path, capsys) -> None:  # noqa: ANN001
    from sklearn.metrics import roc_auc_score

    from gigaslide import runs

    with open(ref_run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in rows) == [f"s{i}" for i in range(6)] and {r["fold"] for r in rows} == {"0", "1"}
    # a slide smaller than one tile (s1: one blob) is run as a single dense pass and predicted like the others
    assert max(read_canvas(slides / "s1.tif", 1.5, 320, 32).shape) < 256 < max(read_canvas(slides / "s0.tif", 1.5, 320, 32).shape)
    ev = json.loads((ref_run / "evaluation.json").read_text())
    auc = roc_auc_score([int(r["label"]) for r in rows], [float(r["prob_1"]) for r in rows])
    assert ev["metrics"]["auc"]["value"] == pytest.approx(auc, abs=1e-6) and ev["class_counts"] == [3, 3]
    rec = runs.read_run(ref_run)
    assert rec["status"] == "finished" and rec["identity"]["pool_kernel"] == 2 and "device" not in rec["identity"]
    assert rec["precision"] == {"requested": "fp32", "resolved": "fp32"} and rec["provenance"]["pool_kernel"] == 2
    ck = runs.load_checkpoint(ref_run, "fold0")
    assert [h["trunk_frozen"] for h in ck["history"]] == [True, False]
    assert ck["selection"]["best_epoch"] == 1  # selection starts when the trunk unfreezes
    before = (ref_run / "fold1" / "predictions.csv").stat().st_mtime_ns
    assert main(_args(slides, ref_run, "--device", "cpu")) == 0  # memory/device-only change: resumes (folds skipped)
    assert (ref_run / "fold1" / "predictions.csv").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main(_args(slides, ref_run, "--pool-kernel", "4", "--tile-size", "320")) == 2
    err = capsys.readouterr().err
    assert "another run (pool_kernel: 2 -> 4" in err and err.count("\n") == 1


def test_budget_stop_then_resume_is_bit_exact(slides, ref_run, tmp_path, capsys) -> None:  # noqa: ANN001
    from gigaslide import runs

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(slides, out, "--budget", "0.01s")) == 0  # stops at the first optimizer step
        rec = runs.read_run(out)
        assert rec["status"] == "stopped" and rec["stop_reason"] == "budget"
        ck = runs.load_checkpoint(out, "fold0")
        assert (ck["epoch"], ck["pos"]) == (0, 1)  # mid-epoch: the next slide of the permutation
        capsys.readouterr()
        assert main(_args(slides, out)) == 0
    finally:
        torch.set_num_threads(threads)
    _same_results(out, ref_run)
    # 3 training slides per fold, none left for validation: the epoch lines printed the training loss as 'val'
    log = capsys.readouterr().out
    assert "0 val" in log and "(no val slides: selected on it)" in log
    assert not re.search(r"train [\d.]+ val [\d.]+", log)


KILLABLE = textwrap.dedent('''
    import sys, time, torch
    torch.set_num_threads(1)
    import gigaslide.streaming.train as T
    slow = float(sys.argv[1])
    if slow:
        step = T.step_loss
        def slow_step(*a, **k):
            time.sleep(slow)
            return step(*a, **k)
        T.step_loss = slow_step
    from gigaslide.cli.main import main
    sys.exit(main(sys.argv[2:]))
''')


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact(slides, ref_run, tmp_path) -> None:  # noqa: ANN001
    script = tmp_path / "train.py"
    script.write_text(KILLABLE)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    p = subprocess.Popen([sys.executable, str(script), "0.25", *_args(slides, out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec = out / "checkpoint" / "fold0.json"
    deadline = time.time() + 900  # generous: a loaded machine is slow to start the subprocess
    while time.time() < deadline and p.poll() is None:
        if rec.is_file() and json.loads(rec.read_text())["payload"]["epoch"] >= 1:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert json.loads(rec.read_text())["payload"]["epoch"] >= 1 and not (out / "predictions.csv").exists()
    r = subprocess.run([sys.executable, str(script), "0", *_args(slides, out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch" in r.stdout
    _same_results(out, ref_run)


def test_heatmap_maps_pooled_positions_to_level0(slides, ref_run, tmp_path) -> None:  # noqa: ANN001
    from gigaslide.streaming.heatmap import streaming_heatmap

    res = streaming_heatmap(slides / "s1.tif", ref_run, tmp_path / "att.png", device="cpu")
    c = read_canvas(slides / "s1.tif", 1.5, 320, 32)
    step = 32 * 2 * 1.5 / 0.5  # stride x pool kernel canvas px, at 3 level-0 px per canvas px
    assert res["box_level0_px"] == step
    xy = np.asarray(res["coords"])
    h, w = c.content_size
    assert len(xy) == -(-h // 64) * -(-w // 64)  # positions over padding only are not drawn
    assert tuple(xy[0]) == c.origin and xy[1, 0] - xy[0, 0] == step and xy[-1, 1] - xy[0, 1] == step * (-(-h // 64) - 1)
    assert (tmp_path / "att.png").stat().st_size > 1000
    # the grid the viewer shows: saved in the run folder, the same positions and attention
    from gigaslide.streaming.grids import grid_folds, load_grid

    assert res["grid"] == str(ref_run / "heatmaps" / "fold0" / "s1.npz") and grid_folds(ref_run, "s1") == [0]
    g = load_grid(ref_run, "s1", 0)
    np.testing.assert_array_equal(g.coords, xy)
    assert g.box_level0_px == step and g.slide_size == (1024, 768) and len(g.attention) == len(xy)
    assert g.probs.tolist() == pytest.approx(res["probs"]) and g.instance_probs is None  # clam_sb: attention only



def test_heatmap_of_a_slide_without_mpp_takes_slide_mpp(slides, ref_run, tmp_path, capsys) -> None:  # noqa: ANN001
    """The error for a slide without a resolution says --slide-mpp: heatmap-streaming takes it (it had no such
    option), and the grid is the one of the same pixels with the resolution in their metadata."""
    from gigaslide.streaming.grids import load_grid

    bare = make_slide(tmp_path / "s1.tif", (1024, 768), mpp=None, seed=1, blobs=2)  # s1's pixels, no mpp
    cmd = ["heatmap-streaming", str(bare), "--run", str(ref_run), "--out", str(tmp_path / "a.png"), "--device", "cpu"]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "no resolution" in err and "--slide-mpp" in err and err.count("\n") == 1
    with_mpp = ["heatmap-streaming", str(slides / "s1.tif"), "--run", str(ref_run), "--out", str(tmp_path / "b.png"),
                "--device", "cpu"]
    assert main(with_mpp) == 0
    want = load_grid(ref_run, "s1", 0)
    assert main(cmd + ["--slide-mpp", "0.5"]) == 0
    got = load_grid(ref_run, "s1", 0)
    np.testing.assert_array_equal(got.coords, want.coords)
    c = read_canvas(slides / "s1.tif", 1.5, 320, 32)
    assert tuple(got.coords[0]) == c.origin and got.box_level0_px == 32 * 2 * 1.5 / 0.5
    capsys.readouterr()
    assert main(cmd + ["--slide-mpp", "0.5", "--fold", "7"]) == 2  # a fold the run does not have: which ones it has
    err = capsys.readouterr().err
    assert "no trained fold 7 (trained folds: 0, 1)" in err and "--fold 0" in err


def test_cli_refuses_bad_input(slides, tmp_path, capsys) -> None:  # noqa: ANN001
    base = ["train-streaming", "--slides", str(slides), "--labels", str(slides / "labels.csv"), "--out", str(tmp_path / "r")]
    assert main(base + ["--tile-size", "256", "--encoder", "resnet18", "--weights", "random"]) == 2
    assert "minimum 704 px" in capsys.readouterr().err and not (tmp_path / "r").exists()  # pool kernel 8 by default
    assert main(base + ["--encoder", "no_such_net", "--weights", "random"]) == 2
    assert "unknown encoder 'no_such_net'" in capsys.readouterr().err
    assert main(base + ["--pool-kernel", "0", "--weights", "random"]) == 2
    assert "pool kernel 0" in capsys.readouterr().err
    os.environ.setdefault("GIGASLIDE_WEIGHTS", str(tmp_path / "no_cache"))
    assert main(base + ["--encoder", "resnet34"]) == 2  # default weights: from the local cache only, never downloaded
    assert "not in the local cache" in capsys.readouterr().err
    assert main(["heatmap-streaming", str(slides / "s1.tif"), "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    capsys.readouterr()
    # patience 0 stopped before the first epoch: a FileNotFoundError traceback for the best model it never saved
    assert main(_args(slides, tmp_path / "p0", "--patience", "0")) == 2
    err = capsys.readouterr().err
    assert "--patience 0 must be >= 1" in err and err.count("\n") == 1 and not (tmp_path / "p0").exists()



def test_two_files_of_one_labelled_slide_id_are_refused(slides, tmp_path, capsys) -> None:  # noqa: ANN001
    """s0.tif and s0.tiff in --slides: which one was trained on depended on the listing order (silently the last)."""
    import shutil

    d = tmp_path / "slides"
    shutil.copytree(slides, d)
    shutil.copy(slides / "s1.tif", d / "s0.tiff")
    out = tmp_path / "run"
    assert main(["train-streaming", "--slides", str(d), "--labels", str(d / "labels.csv"), "--out", str(out),
                 *ARGS]) == 2
    err = capsys.readouterr().err
    assert "labelled slide id 's0'" in err and "s0.tiff" in err and err.replace("s0.tiff", "").count("s0.tif") == 1
    assert err.count("\n") == 1 and not out.exists()  # both files named



def test_slide_mpp_csv_gives_a_resolution_to_the_slides_it_lists(slides, ref_run, tmp_path) -> None:  # noqa: ANN001
    """One slide without a resolution in a cohort: `--slide-mpp mpp.csv` (what the missing-mpp error suggests; a number
    overrides every slide's metadata) was refused. The run equals the one on slides that all carry it."""
    import shutil

    d = tmp_path / "slides"
    shutil.copytree(slides, d)
    make_slide(d / "s5.tif", (1024, 768), mpp=None, seed=5, blobs=2)  # s5's pixels, no mpp in the file
    (tmp_path / "mpp.csv").write_text("slide_id,mpp\ns5,0.5\n")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train-streaming", "--slides", str(d), "--labels", str(d / "labels.csv"), "--out", str(out), *ARGS,
                     "--slide-mpp", str(tmp_path / "mpp.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    _same_results(out, ref_run)
    assert json.loads((out / "canvases" / "s5.json").read_text())["slide_mpp"] == 0.5

def test_a_cohort_with_patients_bootstraps_patients(slides, tmp_path) -> None:  # noqa: ANN001
    """labels.csv names patients: the pooled predictions carry them and the CIs resample patients (each with all its
    slides), as train-mil's do; StreamingCLAM wrote slides only, so its CIs took one patient's slides as independent."""
    import shutil

    d = tmp_path / "slides"
    shutil.copytree(slides, d)
    pats = {"s0": "p0", "s2": "p0", "s1": "p1", "s3": "p1", "s4": "p2", "s5": "p3"}
    (d / "labels.csv").write_text("slide_id,patient_id,label\n" + "".join(f"s{i},{pats[f's{i}']},{i % 2}\n"
                                                                         for i in range(6)))
    out = tmp_path / "run"
    assert main(["train-streaming", "--slides", str(d), "--labels", str(d / "labels.csv"), "--out", str(out), *ARGS,
                 "--epochs", "1"]) == 0
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["slide_id"]: r["patient_id"] for r in rows} == pats
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["resampled"] == "patients" and ev["n_patients"] == 4


def test_a_cohort_with_class_names_names_them_in_its_predictions(slides, tmp_path) -> None:  # noqa: ANN001
    """labels.csv with class names (normal / tumor): the fold and pooled predictions, the run record and the evaluation
    name the classes, as train-mil's do; StreamingCLAM wrote the integers alone."""
    import shutil

    d = tmp_path / "slides"
    shutil.copytree(slides, d)
    names = ("normal", "tumor")
    (d / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{names[i % 2]}\n" for i in range(6)))
    out = tmp_path / "run"
    assert main(["train-streaming", "--slides", str(d), "--labels", str(d / "labels.csv"), "--out", str(out), *ARGS,
                 "--epochs", "1"]) == 0
    for f in (out / "predictions.csv", out / "fold0" / "predictions.csv"):
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(r["class_name"] == names[int(r["label"])] for r in rows)
        assert {r["slide_id"]: r["class_name"] for r in rows} == {f"s{i}": names[i % 2] for i in range(6)
                                                                  if f"s{i}" in {r["slide_id"] for r in rows}}
    assert json.loads((out / "run.json").read_text())["class_names"] == list(names)
    assert json.loads((out / "evaluation.json").read_text())["class_names"] == list(names)


def test_canvas_cache_is_reused_and_memory_mapped(slides, tmp_path) -> None:  # noqa: ANN001
    a = cached_canvas(slides / "s2.tif", tmp_path / "cache", 2.0, 4096, 32)
    b = cached_canvas(slides / "s2.tif", tmp_path / "cache", 2.0, 4096, 32)
    assert isinstance(b.image, np.memmap) and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert b.origin == a.origin and b.content_size == a.content_size
    assert torch.equal(b.pixels(), torch.from_numpy(np.array(a.image)))
    a_shape = a.shape  # (a cached canvas maps its file when used: c's re-read replaces it)
    c = cached_canvas(slides / "s2.tif", tmp_path / "cache", 4.0, 4096, 32)  # other mpp: re-read, not the stale cache
    assert c.image.shape[1] < a_shape[0]
    xy = a.position_coords((2, 3), 32)
    assert xy.shape == (6, 2) and tuple(xy[0]) == a.origin and xy[1, 0] - xy[0, 0] == 32 * 4  # 2.0 / 0.5 level-0 px per px


HELD_ONCE = textwrap.dedent('''
    import sys, numpy as np, torch
    from torch import nn
    torch.set_num_threads(1)
    from gigaslide.encoders import ENCODERS
    from gigaslide.streaming import StreamingCNN
    from gigaslide.streaming.data import Augment, Canvas
    from gigaslide.streaming.head import StreamingMIL
    from gigaslide.streaming.train import TrainConfig, step_loss
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    trunk = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 16, 8, stride=8), nn.ReLU()).eval()
    model = StreamingMIL(StreamingCNN(trunk, 256, pool_kernel=2, trim_memory=True), "abmil", 2).train()
    model.spec = ENCODERS.get("resnet18")
    cfg = TrainConfig(precision="fp32")
    def canvas(side, path):
        np.save(path, np.random.default_rng(0).integers(0, 256, (3, side, side), dtype=np.uint8))
        return Canvas("x", np.load(path, mmap_mode="r"), (0, 0), 1.0, 0.5, (side, side), path)
    aug = Augment(flip=True, rot90=1, gain=(1.02, 0.98, 1.0))
    step_loss(model, canvas(1024, sys.argv[1] + "/warm.npy"), 1, cfg, torch.device("cpu"), None, aug)[0].backward()
    big = canvas(4096, sys.argv[1] + "/big.npy")
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    loss, _ = step_loss(model, big, 1, cfg, torch.device("cpu"), None, aug)
    loss.backward()
    print((status("VmHWM:") - base) / (3 * 4096 * 4096))
''')


def test_a_training_step_holds_the_canvas_once(tmp_path) -> None:
    """Peak RSS of one augmented training step (flip + rot90) above the warm process, in units of the canvas's
    bytes: ~1 (read once, crops augmented one by one) -- a memory-mapped read plus a whole-image flip/rotate
    would be ~3."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("Linux /proc only")
    script = tmp_path / "held.py"
    script.write_text(HELD_ONCE)
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ratio = float(r.stdout.strip().splitlines()[-1])
    assert 0.9 <= ratio <= 1.2, ratio


def _record_background(monkeypatch, module, name: str) -> list[str]:  # noqa: ANN001
    """``module.name`` wrapped to record the ``background`` of each call (the list returned)."""
    seen: list[str] = []
    real = getattr(module, name)

    def keeping(*a, background="auto", **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(background)
        return real(*a, background=background, **kw)

    monkeypatch.setattr(module, name, keeping)
    return seen


def test_a_forced_background_reaches_the_canvases_and_the_run(slides, tmp_path, capsys,  # noqa: ANN001
                                                              monkeypatch) -> None:
    """train-streaming had no ``--background``: a mis-detected slide could not be forced. Forced, it reaches every
    canvas (tissue detection and fill), the canvas cache and the run record it, and the run folder is not resumed
    with another ``--background``."""
    import gigaslide.streaming.cv as cv

    seen = _record_background(monkeypatch, cv, "cached_canvas")
    out = tmp_path / "run"
    assert main(_args(slides, out, "--background", "dark", "--budget", "0.01s")) == 0  # stops at the first step
    assert seen == ["dark"] * 6
    for i in range(6):
        m = json.loads((out / "canvases" / f"s{i}.json").read_text())
        assert m["background"] == m["edge_fill"] == m["background_option"] == "dark"
    img = np.load(out / "canvases" / "s1.npy")  # the canvas read on the dark background (tissue box, fill)
    assert np.array_equal(img, read_canvas(slides / "s1.tif", 1.5, 320, 32, background="dark").image)
    assert not np.array_equal(img, read_canvas(slides / "s1.tif", 1.5, 320, 32).image)
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["background"] == rec["identity"]["background"] == "dark"
    capsys.readouterr()
    assert main(_args(slides, out, "--budget", "0.01s")) == 2  # auto now: another run
    err = capsys.readouterr().err
    assert "run folder holds another run (background: 'dark'" in err and err.count("\n") == 1


def test_heatmap_reads_the_canvas_on_the_forced_or_the_runs_background(slides, ref_run, tmp_path,  # noqa: ANN001
                                                                        monkeypatch) -> None:
    import gigaslide.streaming.heatmap as hm

    seen = _record_background(monkeypatch, hm, "read_canvas")
    cmd = ["heatmap-streaming", str(slides / "s1.tif"), "--run", str(ref_run), "--out", str(tmp_path / "a.png"),
           "--device", "cpu"]
    assert main(cmd) == 0 and main(cmd + ["--background", "dark"]) == 0
    assert seen == ["auto", "dark"]  # default: the run's (made at auto)


@pytest.mark.parametrize("command", ["train-streaming", "heatmap-streaming"])
def test_an_unknown_background_is_one_line_before_any_work(command, slides, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "r"
    args = (_args(slides, out) if command == "train-streaming"
            else ["heatmap-streaming", str(slides / "s1.tif"), "--run", str(tmp_path / "nope"), "--out", str(out)])
    assert main([*args, "--background", "grey"]) == 2
    err = capsys.readouterr().err
    assert "--background 'grey' is not one of auto, bright, dark" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_multi_class_streaming_heatmap_is_titled_with_the_predicted_class(slides, ref_run, tmp_path,  # noqa: ANN001
                                                                            monkeypatch) -> None:
    """Three classes: the title named the last class ('P(class 2) = ...') over the attention branch of the predicted
    class (CLAM-MB); it names the predicted class, as the MIL heatmap does."""
    import gigaslide.mil.heatmap as mh
    import gigaslide.streaming.heatmap as sh

    real = sh.load_run_model

    def three_classes(*a, **k):  # noqa: ANN002, ANN003, ANN202
        model, cfg, _ = real(*a, **k)
        fwd = model.forward

        def forward(*x, **kw):  # noqa: ANN002, ANN003, ANN202
            out = fwd(*x, **kw)
            out["logits"] = torch.tensor([0.0, 2.0, 1.0])
            return out

        model.forward = forward
        return model, cfg, 3

    titles = []
    monkeypatch.setattr(sh, "load_run_model", three_classes)
    monkeypatch.setattr(mh, "draw_heatmap", lambda *a, **k: titles.append(k["title"]))
    monkeypatch.setattr(sh, "save_grid", lambda *a, **k: tmp_path / "g.npz")
    res = sh.streaming_heatmap(slides / "s1.tif", ref_run, tmp_path / "att.png", device="cpu")
    p = torch.softmax(torch.tensor([0.0, 2.0, 1.0]), 0)
    assert res["probs"] == pytest.approx(p.tolist())
    assert titles[0].endswith(f"StreamingCLAM  predicted class 1 (P = {float(p[1]):.3f})"), titles[0]

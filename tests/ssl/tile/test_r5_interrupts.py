"""`gigaslide pretrain` interrupted, and unusual --data folders (review round 5): Ctrl-C / SIGTERM exit non-zero,
temporaries a kill -9 left in RUN/encoder and RUN/checkpoint are removed on resume, an unreadable first image is
skipped like any other, and slides in symlinked sub-folders are found."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs
from gigaslide.cli.main import main
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.testing import make_tile_folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tile_folder(tmp_path_factory.mktemp("tiles") / "t", size=40, flat=12)


def _args(data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--method", "simclr", "--backbone", "test_resnet",
            "--tile-size", "32", "--batch-size", "4", "--method-args", '{"hidden_dim": 32, "out_dim": 16}',
            "--steps", str(steps), "--data-kind", "tiles", "--precision", "fp32", "--workers", "0",
            "--monitor-every", "0"]


def _cfg(data: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), method="simclr", backbone="test_resnet", tile_size=32, batch_size=4,
                method_args={"hidden_dim": 32, "out_dim": 16}, steps=3, data_kind="tiles", monitor_every=0,
                precision="fp32", workers=0)
    return PretrainConfig(**{**base, **kw})


@pytest.mark.parametrize(("sig", "status", "reason"), [(signal.SIGINT, 130, "interrupt"),
                                                        (signal.SIGTERM, 143, "signal")])
def test_ctrl_c_or_sigterm_stops_cleanly_with_a_non_zero_status(tiles, tmp_path, monkeypatch, capsys, sig, status,
                                                                 reason):
    """A Ctrl-C (or a batch system's SIGTERM) stopped training after the step, saved the checkpoint and encoder, and
    then exited 0, as if the run had finished: `pretrain ... && embed-tiles ...` went on with a half-trained
    encoder. It now exits 130 / 143 with one line saying how to resume; the re-run finishes with status 0."""
    from gigaslide.ssl.tile import methods

    orig = methods.SimCLR.after_step
    calls = []

    def signalled(self, progress):  # noqa: ANN001, ANN202
        orig(self, progress)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)

    monkeypatch.setattr(methods.SimCLR, "after_step", signalled)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(_args(tiles, out))
    assert e.value.code == status
    err = capsys.readouterr().err
    assert f"stopped at step 2 of 4 by {reason}" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err
    assert runs.read_run(out)["status"] == "stopped" and runs.load_checkpoint(out)["step"] == 2
    assert (out / "encoder" / "weights.safetensors").is_file()
    monkeypatch.setattr(methods.SimCLR, "after_step", orig)
    assert main(_args(tiles, out)) == 0
    assert runs.read_run(out)["status"] == "finished" and runs.load_checkpoint(out)["step"] == 4


def test_temporaries_of_a_killed_export_or_checkpoint_are_removed_on_resume(tiles, tmp_path):
    """kill -9 while RUN/encoder was written left `encoder/.tmp-weights.safetensors.*` and safetensors' own
    `.tmpXXXXXX` (as large as the weights; in checkpoint/ with the optimiser state) for good: measured after a
    resumed run had finished. The resume (run lock held) removes them; other files stay."""
    out = tmp_path / "run"
    pretrain(_cfg(tiles, out, stop_after_steps=1))
    left = [out / "encoder" / ".tmp-weights.safetensors.4paom9nv.safetensors", out / "encoder" / ".tmp94cQsE",
            out / "encoder" / ".tmp-encoder.json.a1b2c3d4", out / "checkpoint" / ".tmpZx81Qa"]
    for f in left:
        f.write_bytes(b"half written")
    keep = out / "encoder" / ".tmp_notes_of_the_user.txt"  # not a name the writers use
    keep.write_text("mine")
    s = pretrain(_cfg(tiles, out))
    assert s["steps"] == 3 and s["stopped_by"] == "steps"
    assert [f for f in left if f.exists()] == [] and keep.is_file()
    assert sorted(f.name for f in (out / "encoder").iterdir()) == [keep.name, "encoder.json", "weights.safetensors"]


def test_an_unreadable_first_image_is_skipped_like_any_other(tiles, tmp_path):
    """Unreadable images are skipped (logged) -- except the first in sorted order, which was read at start-up
    'to fail fast' and ended the run with its error. Now it is skipped too: training runs, and the same as on the
    folder without it (an index of a broken file reads the next readable one)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiles, data)
    (data / "a_broken.png").write_bytes(b"not a png" * 10)  # sorts first
    s = pretrain(_cfg(data, tmp_path / "run", steps=2))
    assert s["steps"] == 2 and s["stopped_by"] == "steps"
    from gigaslide.ssl.tile.data import ImageFolderSource
    from gigaslide.tiling.folders import read_image

    src = ImageFolderSource(data, 32)
    assert src.files[0].name == "a_broken.png" and 0 in src._bad
    assert (src.load(0, torch.Generator()) == read_image(data / "t000.png")).all()


def test_a_folder_of_only_unreadable_images_is_one_line_naming_a_file(tmp_path):
    from gigaslide.errors import GigaslideError
    from gigaslide.ssl.tile.data import ImageFolderSource

    for i in range(3):
        (tmp_path / f"b{i}.png").write_bytes(b"nope")
    with pytest.raises(GigaslideError, match=r"too many unreadable images in a row \(the first: b0\.png: cannot read"):
        ImageFolderSource(tmp_path, 32)


def test_slides_in_symlinked_sub_folders_are_slides(synthetic_slide, tmp_path):
    """A --data folder whose sub-folders are links (a cohort linked in from other storage) was searched with
    rglob, which skips linked folders: no slide found, so the folder was read as *tiles* -- each whole slide one
    image, resampled to --tile-size (with two slides or more, training ran on those, silently)."""
    from gigaslide.ssl.tile.data import SlideSource, build_source

    (tmp_path / "real").mkdir()
    os.symlink(synthetic_slide.parent, tmp_path / "real" / "cohort")
    src = build_source(tmp_path / "real", [2.0], 32)
    assert isinstance(src, SlideSource) and [Path(p).name for p in src.paths] == [synthetic_slide.name]
    assert json.dumps(src.describe())  # a slide source's description, not an image folder's


def test_a_kill_during_the_export_resumes_to_the_same_weights(tiles, tmp_path):
    """Resume right after the final checkpoint (the moment a kill during the export leaves): the re-run saves and
    exports the same weights as the uninterrupted run."""
    full = tmp_path / "full"
    pretrain(_cfg(tiles, full))
    part = tmp_path / "part"
    pretrain(_cfg(tiles, part))
    (part / "encoder" / "weights.safetensors").unlink()  # as if killed during the export
    (part / "encoder" / "encoder.json").unlink()
    s = pretrain(_cfg(tiles, part))
    assert s["steps"] == 3
    a, b = (load_file(str(run / "encoder" / "weights.safetensors")) for run in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- evaluate finetune
FT = dict(epochs=2, batch_size=8, lr=1e-3, head_lr=1e-2, workers=0, n_bootstrap=20, patience=3, precision="fp32")


@pytest.fixture(scope="module")
def ft_folders(tmp_path_factory):  # noqa: ANN201
    d = tmp_path_factory.mktemp("ft")
    return make_tile_folder(d / "train", 8, seed=0), make_tile_folder(d / "test", 4, seed=1)


def test_a_second_finetune_on_the_same_out_is_refused_while_one_runs(ft_folders, tmp_path):
    """Two `evaluate finetune` on one --out both trained and wrote one fraction's checkpoint: measured, 12 saves
    of two 6-epoch runs ended at checkpoint number 9 (three tensor files written under one name by both, each
    pruning the other's), so a kill then could resume one run's epoch counter with the other's weights. The
    second is now refused in one line naming the holder; once the folder is free it runs."""
    from gigaslide.errors import GigaslideError
    from gigaslide.locks import ItemLock
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train, test = ft_folders
    out = tmp_path / "ft"
    out.mkdir()
    held = ItemLock(out, ".finetune")
    assert held.acquire()  # a live process (this one) holds the folder
    with pytest.raises(GigaslideError, match=rf"in use by pid {os.getpid()} .*another fine-tune run"):
        finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=FinetuneConfig(**FT))
    assert not (out / "fraction_100pct").exists()
    held.release()
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=FinetuneConfig(**FT))
    assert rep["protocols"]["finetune_100%"]["n_labels"] == 16
    assert not (out / ".finetune.lock").exists()  # released


def test_a_killed_finetunes_temporaries_are_removed_on_resume(ft_folders, tmp_path):
    """A kill while best.safetensors, the checkpoint or the fine-tuned encoder was written left the temporary
    files for good (nothing cleaned the fraction folder). The re-run removes them, and ends as a run never killed."""
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train, test = ft_folders
    ref = finetune_tiles(train, test, "test_resnet", tmp_path / "ref", weights="random", cfg=FinetuneConfig(**FT))
    out = tmp_path / "ft"
    finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=FinetuneConfig(**{**FT, "epochs": 1}))
    d = out / "fraction_100pct"
    left = [d / ".tmp-best.safetensors.ab12cd34.safetensors", d / ".tmpQw12Er", d / "checkpoint" / ".tmpAs34Df",
            d / "encoder" / ".tmp-weights.safetensors.zz99yy88.safetensors"]
    for f in left:
        f.write_bytes(b"half written")
    rep = finetune_tiles(train, test, "test_resnet", out, weights="random", cfg=FinetuneConfig(**FT))
    assert [f for f in left if f.exists()] == []
    assert np.array_equal(rep["test_probs"]["finetune_100%"], ref["test_probs"]["finetune_100%"])

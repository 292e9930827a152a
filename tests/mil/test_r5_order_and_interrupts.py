"""Review round 5: train-mil must not depend on labels.csv's row order, and a resumed or refused run must not leave
or delete temporaries it does not own."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.cv import run_cv
from gigaslide.mil.train import TrainConfig

torch.set_num_threads(1)

FAST = dict(epochs=3, lr=3e-3, hidden=8, patience=3)


def _make(tmp_path, n=12, d=6):
    r = np.random.default_rng(0)
    feats = tmp_path / "feats"
    rows = []
    for i in range(n):
        y = i % 2
        x = r.normal(size=(int(r.integers(4, 9)), d)).astype(np.float32)
        x[:2, :2] += 1.5 * y
        store.save(feats / f"s{i}.h5", x, r.integers(0, 900, (len(x), 2)),
                   attrs={"encoder": "toy", "slide_id": f"s{i}"})
        rows.append(f"s{i},p{i // 2},{y}")
    return feats, rows


def _labels(path, rows):
    path.write_text("slide_id,patient_id,label\n" + "\n".join(rows) + "\n")
    return path


def test_labels_row_order_does_not_change_the_predictions(tmp_path):
    """The same labels.csv with its rows in another order: byte-identical predictions (the training order of the
    bags followed the rows: every probability differed in its 3rd digit)."""
    feats, rows = _make(tmp_path)
    a, b = _labels(tmp_path / "a.csv", rows), _labels(tmp_path / "b.csv", rows[::-1])
    for name, lab in (("ra", a), ("rb", b)):
        run_cv(feats, lab, tmp_path / name, cfg=TrainConfig(model="abmil", **FAST), folds=2, n_bootstrap=20,
               verbose=False)
    assert (tmp_path / "ra" / "predictions.csv").read_bytes() == (tmp_path / "rb" / "predictions.csv").read_bytes()
    ea, eb = (json.loads((tmp_path / n / "evaluation.json").read_text())["metrics"] for n in ("ra", "rb"))
    assert ea == eb


def test_a_run_recorded_before_slides_were_sorted_is_not_resumed_with_other_training(tmp_path):
    """A run of a labels.csv not in id order that an earlier version started (trained in row order) is refused, not
    finished in another order; a run of a labels.csv in id order (the same training either way) keeps resuming."""
    feats, rows = _make(tmp_path)
    lab = _labels(tmp_path / "rev.csv", rows[::-1])
    out, cfg = tmp_path / "run", TrainConfig(model="mean", **FAST)
    run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
    rec = json.loads((out / "run.json").read_text())
    assert rec["identity"].pop("slide_order") == "ids"
    (out / "run.json").write_text(json.dumps(rec))  # as the earlier version recorded it
    with pytest.raises(GigaslideError, match=r"another run \(slide_order: None -> 'ids'\)"):
        run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
    srt = _labels(tmp_path / "in_order.csv", rows)  # s0, s1, ..., s10, s11: in id order (s2 before s10)
    out2 = tmp_path / "run2"
    run_cv(feats, srt, out2, cfg=cfg, folds=2, n_bootstrap=0, verbose=False)
    assert "slide_order" not in json.loads((out2 / "run.json").read_text())["identity"]


def test_a_refused_second_run_leaves_the_live_runs_temporaries(tmp_path):
    """A second train-mil on a run folder another process holds is refused -- without first deleting that process's
    in-flight temporary files (its atomic write then failed: the live run stopped with an error)."""
    feats, rows = _make(tmp_path)
    lab = _labels(tmp_path / "labels.csv", rows)
    out = tmp_path / "run"
    out.mkdir()
    live_tmp = out / ".tmp-run.json.abc123"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid holder')\n"
         f"open({str(live_tmp)!r}, 'w').write('being written')\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GigaslideError, match="in use by pid holder"):
            run_cv(feats, lab, out, cfg=TrainConfig(model="mean", **FAST), folds=2, n_bootstrap=0, verbose=False)
        assert live_tmp.read_text() == "being written"
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_folds_temporaries_are_removed_when_the_run_resumes(tmp_path):
    """kill -9 while a fold writes leaves ``foldK/.tmp-*``; the resumed run removes them (they stayed for good) and
    gives the uninterrupted run's predictions."""
    feats, rows = _make(tmp_path)
    lab = _labels(tmp_path / "labels.csv", rows)
    out, cfg = tmp_path / "run", TrainConfig(model="abmil", **FAST)
    run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=20, verbose=False)
    want = (out / "predictions.csv").read_bytes()
    # as a kill while fold1 wrote its files leaves it: temporaries, no predictions, not recorded as done
    (out / "fold1" / ".tmp-config.json.k1ll3d").write_text("{")
    (out / "fold1" / ".tmp-predictions.csv.k1ll3d.csv").write_text("slide_id")
    (out / "fold1" / "predictions.csv").unlink()
    (out / "predictions.csv").unlink()
    rec = json.loads((out / "run.json").read_text())
    rec["folds_done"] = ["fold0"]
    (out / "run.json").write_text(json.dumps(rec))
    run_cv(feats, lab, out, cfg=cfg, folds=2, n_bootstrap=20, verbose=False)
    assert sorted(p.name for p in out.rglob(".tmp-*")) == []
    assert (out / "predictions.csv").read_bytes() == want


def test_a_mosaic_killed_while_writing_its_labels_leaves_no_temporaries_after_the_rerun(tmp_path):
    """kill -9 while ``mosaic`` writes labels.csv / mosaic.json (its last files) left ``.tmp-*`` in OUT for good."""
    from PIL import Image

    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic

    tiles = tmp_path / "tiles"
    for cls, col in {"0": (230, 120, 180), "1": (90, 40, 140)}.items():
        (tiles / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((16, 16, 3), col, np.uint8)).save(tiles / cls / f"t{i}.png")
    out, cfg = tmp_path / "mosaic", MosaicConfig(slides=4, grid=6)
    build_mosaic(tiles, out, cfg, verbose=False)
    want = (out / "labels.csv").read_bytes()
    (out / ".tmp-labels.csv.k1ll3d").write_text("slide_id")
    (out / ".tmp-mosaic.json.k1ll3d").write_text("{")
    build_mosaic(tiles, out, cfg, verbose=False)
    assert sorted(p.name for p in out.rglob(".tmp-*")) == []
    assert (out / "labels.csv").read_bytes() == want

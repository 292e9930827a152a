"""Training on the run layer: export, identity, bit-exact resume after kill -9, evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.nuclei.data import load_item
from gigaslide.nuclei.evaluate import evaluate
from gigaslide.nuclei.infer import load_model
from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei

from .conftest import TINY


def test_run_folder_export_and_identity(tiny_run: Path) -> None:
    run = tiny_run / "run"
    rec = runs.read_run(run)
    assert rec["status"] == "finished" and rec["run_kind"] == "nuclei"
    assert {"input:images", "input:annotations"} <= set(rec["identity"])
    split = (run / "split.csv").read_text().splitlines()
    assert split[0] == "image_id,organ,split" and len(split) == 7
    assert sum(",test" in s for s in split) == 2 and sum(",val" in s for s in split) == 1
    spec = json.loads((run / "model" / "model.json").read_text())
    assert spec["provenance"]["kind"] == "nuclei-model" and spec["provenance"]["mpp"] == 0.25
    assert spec["provenance"]["encoder"] == "test_resnet" and len(spec["provenance"]["weights_sha256"]) == 64
    # the exported model is the best epoch's
    best = runs.load_checkpoint(run, "best")
    model = load_model(run)
    sd = runs.module_state(model)
    assert all(torch.equal(sd[k], best["model"][k]) for k in best["model"])
    cfg = NucleiTrainConfig(images=str(tiny_run / "images"), annotations=str(tiny_run / "annotations"),
                            out=str(run), **{**TINY, "lr": 5e-4})
    with pytest.raises(GigaslideError, match=r"another run \(lr: 0.001 -> 0.0005\)"):
        train_nuclei(cfg)


def test_model_of_another_backbone_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_run / "run" / "model", d)
    rec = json.loads((d / "model.json").read_text())
    rec["spec"]["backbone"] = {**rec["spec"]["backbone"], "name": "test_vit", "arch": "test_vit", "family": "vit",
                               "timm_kwargs": {"img_size": 64}}
    (d / "model.json").write_text(json.dumps(rec))
    with pytest.raises(GigaslideError, match="model.safetensors: checkpoint does not fit this model") as e:
        load_model(d)
    assert "\n" not in str(e.value) and "test_vit" in str(e.value)


def test_evaluation_uses_only_the_test_images(tiny_run: Path, tmp_path: Path) -> None:
    r = evaluate(tiny_run / "run", tiny_run / "images", tiny_run / "annotations", tmp_path / "rep", n_bootstrap=50)
    split = dict(line.split(",")[::2] for line in (tiny_run / "run" / "split.csv").read_text().splitlines()[1:])
    assert sorted(r["images"]) == sorted(i for i, s in split.items() if s == "test") and r["subset"] == "test"
    pq = r["metrics"]["image_mean"]["pq"]
    per = [row["pq"] for row in r["per_image"]]
    assert pq["value"] == pytest.approx(sum(per) / len(per), abs=1e-5)
    assert (tmp_path / "rep" / "report.md").read_text().count("|") > 20
    r_all = evaluate(tiny_run / "run", tiny_run / "images", tiny_run / "annotations", tmp_path / "rep2",
                     subset="all", n_bootstrap=0)
    assert len(r_all["images"]) == 6


def test_classes_are_one_type_across_files_and_the_model_keeps_their_names(typed_run: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Training targets, the exported model and evaluation all use one sorted name -> type map: Tumor is 2 in img0
    (Lymphocyte + Tumor) and in the Tumor-only files; evaluation reads new files with the model's map."""
    from gigaslide.nuclei import evaluate as ev
    from gigaslide.nuclei.train import _load_items

    from .conftest import disc_image, write_geojson

    cfg = NucleiTrainConfig(images=str(typed_run / "images"), annotations=str(typed_run / "annotations"),
                            out=str(tmp_path / "x"), image_mpp=0.25, split=str(typed_run / "split.csv"), **TINY)
    items, _, _, _, codes = _load_items(cfg)
    assert codes == {"Lymphocyte": 1, "Tumor": 2}
    by_id = {it.id: it for part in items.values() for it in part}
    assert sorted(set(by_id["img0"].types.values())) == [1, 2]
    assert set(by_id["img1"].types.values()) == set(by_id["img2"].types.values()) == {2}
    spec = json.loads((typed_run / "run" / "model" / "model.json").read_text())["spec"]
    assert spec["n_types"] == 2 and spec["type_names"] == {"1": "Lymphocyte", "2": "Tumor"}
    # a new file set holding Tumor only: its ground truth is read as the model's type 2, not renumbered to 1
    from PIL import Image

    (tmp_path / "im").mkdir()
    (tmp_path / "an").mkdir()
    img, _, polys = disc_image(96, 6, seed=9)
    Image.fromarray(img).save(tmp_path / "im" / "new.png")
    write_geojson(tmp_path / "an" / "new.geojson", polys, ["Tumor"] * len(polys))
    seen = []

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(load_item(*a, **k))
        return seen[-1]

    monkeypatch.setattr(ev, "load_item", spy)
    evaluate(typed_run / "run", tmp_path / "im", tmp_path / "an", tmp_path / "rep", image_mpp=0.25, n_bootstrap=0)
    assert [set(it.types.values()) for it in seen] == [{2}]
    # a class the model was not trained on is refused up front, naming the file and the class
    write_geojson(tmp_path / "an" / "new.geojson", polys, ["Stroma"] + ["Tumor"] * (len(polys) - 1))
    with pytest.raises(GigaslideError, match=r"new.geojson: unknown nucleus class 'Stroma' \(known classes: "
                                             r"Lymphocyte, Tumor\)"):
        evaluate(typed_run / "run", tmp_path / "im", tmp_path / "an", tmp_path / "rep2", image_mpp=0.25)


def test_model_saved_without_type_names_still_loads(tiny_run: Path, tmp_path: Path) -> None:
    """Models exported before class names were stored have no ``type_names`` in model.json: they load unchanged."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_run / "run" / "model", d)
    rec = json.loads((d / "model.json").read_text())
    del rec["spec"]["type_names"]
    (d / "model.json").write_text(json.dumps(rec))
    model = load_model(d)
    assert model.spec.type_names == {} and model.spec.n_types == 0


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei
img, ann, out = sys.argv[1:4]
train_nuclei(NucleiTrainConfig(images=img, annotations=ann, out=out, backbone="test_resnet", weights="random",
             epochs=4, steps_per_epoch=3, batch_size=2, crop=64, lr=1e-3, precision="fp32"))
"""


def _train(tiny_run: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_run / "images"), str(tiny_run / "annotations"),
                             str(out)], env={**os.environ, "PYTHONHASHSEED": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact(tiny_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    killed = _train(tiny_run, tmp_path / "killed")
    rec = tmp_path / "killed" / "checkpoint" / "last.json"
    deadline = time.time() + 600  # generous: a loaded machine starts the child slowly
    while time.time() < deadline and killed.poll() is None:
        if rec.is_file() and json.loads(rec.read_text())["payload"]["epoch"] >= 1:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    torch.set_num_threads(1)  # the reference, uninterrupted, in this process
    train_nuclei(NucleiTrainConfig(images=str(tiny_run / "images"), annotations=str(tiny_run / "annotations"),
                                   out=str(tmp_path / "ref"), **{**TINY, "epochs": 4}))
    at_kill = json.loads(rec.read_text())["payload"]["epoch"]
    assert 1 <= at_kill < 4 and not (tmp_path / "killed" / "model").exists()
    again = _train(tiny_run, tmp_path / "killed")
    assert again.wait(180) == 0, again.stderr.read().decode()[-2000:]
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(runs.read_run(tmp_path / "killed")["invocations"]) == 2


def test_exporting_the_same_model_again_gives_the_same_weights_hash(tiny_run: Path, tmp_path: Path) -> None:
    """The model's weights_sha256 (provenance) must not change when the same weights are exported again (safetensors
    wrote several metadata keys in hash-map order, so the file's bytes differed from save to save)."""
    from types import SimpleNamespace

    from gigaslide.nuclei.train import export_model

    model = load_model(tiny_run / "run")
    run = SimpleNamespace(dir=tmp_path, record={"seed": 0})
    hashes = set()
    for _ in range(6):
        d = export_model(run, model, model.spec, {})
        hashes.add(json.loads((d / "model.json").read_text())["provenance"]["weights_sha256"])
    assert len(hashes) == 1


def test_a_resumed_run_keeps_the_training_images_recorded_in_its_split(nuclei_folder: Path, tmp_path: Path) -> None:
    """The --fraction subset a run started with (split.csv: train / unused) is the one it resumes with, even where
    subset_fraction would now draw others (e.g. a run started before its draw changed)."""
    from gigaslide.nuclei.data import read_split
    from gigaslide.nuclei.train import NucleiTrainConfig, _load_items

    cfg = NucleiTrainConfig(images=str(nuclei_folder / "images"), annotations=str(nuclei_folder / "annotations"),
                            out=str(tmp_path / "run"), fraction=0.5, **TINY)
    _, split, organs, _, _ = _load_items(cfg)
    train = sorted(k for k, v in split.items() if v == "train")
    unused = sorted(k for k, v in split.items() if v == "unused")
    assert train and unused
    # the run's record says the other images of the training part were the ones used
    (tmp_path / "run").mkdir()
    rec = {k: ("unused" if v == "train" else "train" if v == "unused" else v) for k, v in split.items()}
    (tmp_path / "run" / "split.csv").write_text(
        "image_id,organ,split\n" + "".join(f"{k},{organs.get(k, '')},{v}\n" for k, v in sorted(rec.items())))
    items, split2, _, _, _ = _load_items(cfg)
    assert sorted(i.id for i in items["train"]) == unused
    assert split2 == read_split(tmp_path / "run" / "split.csv")


def test_fp16_training_scales_the_loss_and_checkpoints_the_scaler(tiny_run: Path, tmp_path: Path) -> None:
    """fp16 autocast (auto on GPUs without native bf16) trains with a loss scaler -- small gradients would flush to
    zero -- whose state the checkpoint keeps for a bit-exact resume."""
    cfg = NucleiTrainConfig(images=str(tiny_run / "images"), annotations=str(tiny_run / "annotations"),
                            out=str(tmp_path / "run"), **{**TINY, "precision": "fp16", "epochs": 1})
    train_nuclei(cfg)
    ck = runs.load_checkpoint(tmp_path / "run")
    assert {"scale", "growth_factor"} <= set(ck["scaler"])  # a scaler that is off keeps no state


def test_a_budget_spent_between_epochs_exports_the_epochs_done(nuclei_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget ran out after an epoch (in its validation), before the next epoch's first step: the run stopped
    with no model, and every re-run (its budget already spent) stopped again at once. The epochs done are the run:
    its best epoch is exported, and a re-run finds it finished."""
    from gigaslide import runs as runs_module
    from gigaslide.nuclei import train as ntrain

    class SpentAfterOneEpoch(runs_module.Stopper):
        calls = 0

        def reason(self) -> str | None:  # the 3 steps of epoch 1 and the check after it run; then the budget is spent
            type(self).calls += 1
            return "budget" if type(self).calls > TINY["steps_per_epoch"] + 1 else None

    monkeypatch.setattr(ntrain.runs, "Stopper", SpentAfterOneEpoch)
    cfg = NucleiTrainConfig(images=str(nuclei_folder / "images"), annotations=str(nuclei_folder / "annotations"),
                            out=str(tmp_path / "run"), **{**TINY, "epochs": None}, budget_s=60.0)
    s = train_nuclei(cfg)
    assert s["status"] == "finished" and s["epochs"] == 1 and s["best_epoch"] == 0, s
    assert (tmp_path / "run" / "model").is_dir() and load_model(tmp_path / "run" / "model") is not None
    again = train_nuclei(cfg)
    assert again["status"] == "finished" and again["epochs"] == 1

"""Tile-SSL training on the run layer: export + provenance, loss decreases, bit-exact resume (in process and
after kill -9), budget plan, clean stop, identity (data / mpp / init) refused, damaged checkpoint, engines."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs
from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.provenance import read_provenance
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.testing import make_tile_folder

SMALL = {
    "simclr": {"hidden_dim": 32, "out_dim": 16},
    "mocov2": {"hidden_dim": 32, "out_dim": 16, "queue": 16},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 1},
    "swav": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8, "freeze_prototypes_steps": 1},
}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """16 small H&E-like tiles of two textures (flat folder), so the contrastive task has something to learn."""
    return make_tile_folder(tmp_path_factory.mktemp("tiles") / "t", size=40, flat=16)


def _cfg(tiles: Path, out: Path, method: str = "simclr", **kw) -> PretrainConfig:
    base = dict(data=str(tiles), out=str(out), method=method, backbone="test_resnet", tile_size=32, batch_size=4,
                n_local=2, method_args=SMALL[method], steps=4, log_every=1, data_kind="tiles", monitor_size=8,
                precision="fp32")
    base.update(kw)
    return PretrainConfig(**base)


def _export(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "weights.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_exports_a_registry_encoder_with_provenance(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=3, precision="auto", export_bn_tiles=16))
    assert s["steps"] == 3 and s["stopped_by"] == "steps" and np.isfinite(s["final_loss"])
    enc = build_encoder(str(tmp_path / "run" / "encoder"))
    assert enc.spec.input_size == 32 and enc.spec.name == "test_resnet_simclr"  # embeds at the native tile size
    assert s["crop_size"] == 24  # ... after training on 2/3-size crops (the CNN default)
    assert enc.spec.mean == (0.485, 0.456, 0.406)  # the normalisation training used
    ck = runs.load_checkpoint(tmp_path / "run")
    trunk = {k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    exported = dict(enc.trunk.state_dict())
    stats = {k for k in exported if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert stats and all(torch.equal(trunk[k], v) for k, v in exported.items() if k not in stats)  # trained weights
    # with export_bn_tiles: BatchNorm statistics re-measured on the native-size tiles the export embeds (training saw 24 px crops)
    assert not all(torch.equal(trunk[k], exported[k]) for k in stats)
    assert enc(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)).shape == (2, enc.embed_dim)
    prov = read_provenance(tmp_path / "run" / "encoder")
    assert prov.seed == 0 and prov.get("steps") == 3 and prov.run == str((tmp_path / "run").resolve())
    assert prov.tile_size == 32 and prov.get("gigaslide") and prov.get("bn_recalibrated_on_tiles") == 16
    assert prov.mpp is None and enc.spec.native_mpp is None  # a tile folder without --mpp: its µm/px is unknown
    rec = runs.read_run(tmp_path / "run")
    assert rec["run_kind"] == "tile_ssl" and rec["status"] == "finished" and rec["summary"]["images"] == 12
    assert rec["identity"]["lr"] == 1e-3 and rec["identity"]["mpp"] == [0.5] and "input:data" in rec["identity"]
    assert rec["precision"]["requested"] == "auto"  # what auto resolves to: the next test


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bf16_on_cpu_only_for_a_method_measured_in_it(tiles, tmp_path, monkeypatch, native):
    from gigaslide import devices
    from gigaslide.ssl.tile.methods import SSL_METHODS

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert SSL_METHODS.get("simclr").cpu_bf16_basis and SSL_METHODS.get("swav").cpu_bf16_basis is None
    pretrain(_cfg(tiles, tmp_path / "simclr", steps=1, precision="auto"))
    pretrain(_cfg(tiles, tmp_path / "swav", "swav", steps=1, precision="auto"))
    got = runs.read_run(tmp_path / "simclr")["precision"]
    if native:
        assert got["resolved"] == "bf16" and "tile_precision" in got["basis"]
    else:  # emulated bf16 would be slower than fp32
        assert got == {"requested": "auto", "resolved": "fp32", "basis": devices.NO_NATIVE_BF16}
    assert runs.read_run(tmp_path / "swav")["precision"]["resolved"] == "fp32"


def test_default_export_keeps_the_trained_batchnorm_statistics(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    ck = runs.load_checkpoint(tmp_path / "run")
    trunk = {k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    exported = dict(build_encoder(str(tmp_path / "run" / "encoder")).trunk.state_dict())
    assert any(k.endswith("running_mean") for k in exported)
    assert all(torch.equal(trunk[k], v) for k, v in exported.items())
    assert read_provenance(tmp_path / "run" / "encoder").get("bn_recalibrated_on_tiles") is None


def test_calling_a_finished_run_again_keeps_its_training_rates(tiles, tmp_path):
    first = pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    again = pretrain(_cfg(tiles, tmp_path / "run", steps=2))  # nothing left to train
    assert first["images_per_s"] and again["images_per_s"] == first["images_per_s"]
    assert again["steps"] == 2 and runs.read_run(tmp_path / "run")["summary"]["images_per_s"] == first["images_per_s"]


def test_loss_decreases_and_the_monitor_is_logged(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=20, batch_size=8, lr=3e-3, warmup_frac=0.0, monitor_every=10))
    rec = runs.read_run(tmp_path / "run")
    losses = [h["loss"] for h in rec["history"]]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    assert s["first_loss"] == losses[0]
    assert [m["step"] for m in rec["monitor"]] == [0, 10, 20]
    assert all(1.0 <= m["rankme"] <= 8 and 0 <= m["view_top1"] <= 1 for m in rec["monitor"])
    assert rec["monitor"][0] != rec["monitor"][-1]  # measured on the changing encoder


@pytest.mark.parametrize(("method", "precision"), [("mocov2", "fp32"), ("dino", "fp32"), ("simclr", "bf16"),
                                                 ("mocov2", "bf16"), ("dino", "bf16")])
def test_interrupted_run_resumes_bit_exactly(tiles, tmp_path, method, precision):
    """Also in bf16 autocast (what `--precision auto` trains simclr and mocov2 in on CPU; dino under `--precision
    bf16`). DINO's 16-px local crops reach the tiny ResNet's last stage as 1x1 maps: unguarded, its bf16 weight
    gradients there were garbage that changed from run to run (gigaslide.devices.guard_bf16_convs)."""
    full = pretrain(_cfg(tiles, tmp_path / "full", method, precision=precision))
    part = pretrain(_cfg(tiles, tmp_path / "part", method, stop_after_steps=2, precision=precision))
    assert part["steps"] == 2 and part["stopped_by"] == "stop_after_steps"
    assert not _same(_export(tmp_path / "full"), _export(tmp_path / "part"))  # the comparison below can fail
    resumed = pretrain(_cfg(tiles, tmp_path / "part", method, precision=precision))
    assert resumed["steps"] == full["steps"] == 4
    assert _same(_export(tmp_path / "full"), _export(tmp_path / "part")), "resumed weights differ"
    a, b = runs.load_checkpoint(tmp_path / "full")["model"], runs.load_checkpoint(tmp_path / "part")["model"]
    assert _same(a, b)  # heads, EMA teacher / momentum encoder and buffers too
    if method == "mocov2":  # the negatives queue is checkpointed
        assert any(k.startswith(runs.BUFFER_PREFIX) and "bank" in k for k in a)


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
cfg = PretrainConfig(data=sys.argv[1], out=sys.argv[2], method="mocov2", backbone="test_resnet", tile_size=32,
                     batch_size=4, method_args={"hidden_dim": 32, "out_dim": 16, "queue": 16}, steps=int(sys.argv[3]),
                     data_kind="tiles", monitor_every=0, checkpoint_every_s=0.0, workers=int(sys.argv[4]), precision="fp32")
pretrain(cfg)
"""


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_exact(tiles, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, steps: int, workers: int = 0) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(tiles), str(out), str(steps), str(workers)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ref = tmp_path / "ref"
    assert run(ref, 12).wait(180) == 0
    killed = tmp_path / "killed"
    p = run(killed, 12, workers=1)
    rec = killed / "checkpoint" / "last.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # a few steps checkpointed, then kill -9
        if rec.is_file() and json.loads(rec.read_text())["payload"]["step"] >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    at_kill = json.loads(rec.read_text())["payload"]["step"]
    assert 3 <= at_kill < 12, at_kill
    assert run(killed, 12).wait(180) == 0
    assert _same(_export(ref), _export(killed))
    assert len(runs.read_run(killed)["invocations"]) == 2


def test_budget_plans_the_schedule_and_stops_cleanly(tiles, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gigaslide"):
        s = pretrain(_cfg(tiles, tmp_path / "run", steps=None, budget_s=3.0, monitor_every=0))
    plans = [r.getMessage() for r in caplog.records if "steps for the budget" in r.msg]  # formats at the first step too
    assert plans and "start-up included" in plans[0] and any("s/step measured" in m for m in plans[1:]), plans
    assert s["stopped_by"] == "budget" and s["steps"] >= 6 and s["elapsed_s"] >= 3.0
    # the schedule spans the steps the measured step time allows: planned is within a factor 2 of those done
    assert s["steps"] / 2 <= s["planned_steps"] <= 2 * s["steps"], s
    assert build_encoder(str(tmp_path / "run" / "encoder")).embed_dim > 0
    again = pretrain(_cfg(tiles, tmp_path / "run", steps=None, budget_s=3.0, monitor_every=0))
    assert again["steps"] == s["steps"] and again["stopped_by"] == "budget"  # an exhausted budget does no more steps


@pytest.mark.parametrize("steps", [None, 10**7])
def test_a_resumed_budget_run_continues_the_checkpoints_step_plan(tiles, tmp_path, steps):
    from gigaslide.ssl.tile.session import open_session

    cfg = _cfg(tiles, tmp_path / "run", steps=steps, budget_s=600.0, monitor_every=0, stop_after_steps=3)
    first = pretrain(cfg)
    assert first["steps"] == 3 and 3 < first["planned_steps"] < 10**7
    s = open_session(cfg)
    # the plan the run was following (not --steps, nor a fresh 600-step guess), and the first resumed step, slowed by
    # start-up, does not re-plan it
    assert s.plan.planned == first["planned_steps"]
    s.plan.observe(1, 30.0, 4, first["elapsed_s"] + 30.0)
    assert s.plan.planned == first["planned_steps"]


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tiles, tmp_path, monkeypatch):
    from gigaslide.ssl.tile import methods

    calls = {"n": 0}
    orig = methods.SimCLR.after_step

    def interrupt(self, progress):  # noqa: ANN001
        orig(self, progress)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(methods.SimCLR, "after_step", interrupt)
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=5))
    assert s["stopped_by"] == "interrupt" and s["steps"] == 2
    assert runs.read_run(tmp_path / "run")["status"] == "stopped"
    assert runs.load_checkpoint(tmp_path / "run")["step"] == 2
    monkeypatch.setattr(methods.SimCLR, "after_step", orig)
    assert pretrain(_cfg(tiles, tmp_path / "run", steps=5))["steps"] == 5


def test_changed_data_mpp_options_or_init_weights_are_refused(tiles, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiles, data)
    pretrain(_cfg(data, tmp_path / "run", steps=2))
    with pytest.raises(GigaslideError, match=r"another run \(mpp: \[0.5\] -> \[1.0\]\)"):
        pretrain(_cfg(data, tmp_path / "run", steps=3, mpp=[1.0]))
    with pytest.raises(GigaslideError, match=r"another run \(tile_size"):
        pretrain(_cfg(data, tmp_path / "run", steps=3, tile_size=40))
    shutil.copy(data / "t000.png", data / "extra.png")  # --data changed between invocations
    with pytest.raises(GigaslideError, match=r"another run \(input:data"):
        pretrain(_cfg(data, tmp_path / "run", steps=3))
    (data / "extra.png").unlink()
    assert pretrain(_cfg(data, tmp_path / "run", steps=3))["steps"] == 3  # same content again: resumes
    # --init weights file rewritten under the same path
    pretrain(_cfg(tiles, tmp_path / "a", steps=1))
    pretrain(_cfg(tiles, tmp_path / "b", steps=1, seed=1))
    init = tmp_path / "init"
    shutil.copytree(tmp_path / "a" / "encoder", init)
    pretrain(_cfg(tiles, tmp_path / "c", steps=1, init=str(init)))
    shutil.copy(tmp_path / "b" / "encoder" / "weights.safetensors", init / "weights.safetensors")
    with pytest.raises(GigaslideError, match=r"another run \(input:init"):
        pretrain(_cfg(tiles, tmp_path / "c", steps=2, init=str(init)))


def test_a_run_made_under_other_method_defaults_is_not_resumed_under_the_new_ones(tiles, tmp_path, monkeypatch):
    """A method's class defaults (e.g. MoCo v2's temperature) are part of the run's identity and record, so a
    code change to them cannot silently mix two settings in one run."""
    from gigaslide.ssl.tile import methods

    pretrain(_cfg(tiles, tmp_path / "run", "mocov2", steps=2))
    rec = runs.read_run(tmp_path / "run")
    assert rec["resolved"]["method_hparams"] == {**methods.MoCoV2.hparams, **SMALL["mocov2"]}
    monkeypatch.setattr(methods.MoCoV2, "hparams", {**methods.MoCoV2.hparams, "temperature": 0.5})
    with pytest.raises(GigaslideError, match=r"another run \(method_hparams"):
        pretrain(_cfg(tiles, tmp_path / "run", "mocov2", steps=3))
    # the same setting given explicitly is the same run
    tau = rec["resolved"]["method_hparams"]["temperature"]
    again = pretrain(_cfg(tiles, tmp_path / "run", "mocov2", steps=3,
                          method_args={**SMALL["mocov2"], "temperature": tau}))
    assert again["steps"] == 3
    # a folder from before runs recorded method settings: refused with the reason, not as "options changed"
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    del rec["identity"]["method_hparams"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(rec))
    with pytest.raises(GigaslideError, match="made before runs recorded their method settings") as e:
        pretrain(_cfg(tiles, tmp_path / "run", "mocov2", steps=4))
    assert "new --out" in str(e.value)


def test_damaged_checkpoint_is_a_clear_error(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    rec = runs.read_checkpoint_record(tmp_path / "run")
    (tmp_path / "run" / "checkpoint" / rec["tensors"]).write_bytes(b"truncated")
    with pytest.raises(GigaslideError, match="damaged"):
        pretrain(_cfg(tiles, tmp_path / "run", steps=3))


def test_bad_options(tiles, tmp_path):
    with pytest.raises(GigaslideError, match="--steps N or --budget"):
        pretrain(_cfg(tiles, tmp_path / "a", steps=None))
    with pytest.raises(GigaslideError, match="unknown ssl_method"):
        pretrain(dataclasses.replace(_cfg(tiles, tmp_path / "b"), method="byol", method_args={}))
    with pytest.raises(GigaslideError, match="preset"):
        pretrain(dataclasses.replace(_cfg(tiles, tmp_path / "c"), augment="cifar"))
    with pytest.raises(GigaslideError, match="--crop-size 48"):
        pretrain(_cfg(tiles, tmp_path / "d", crop_size=48))
    assert not (tmp_path / "d").exists()  # refused before the run folder is made


def test_a_folder_of_one_tile_is_refused_and_fewer_than_a_batch_warned(tmp_path, caplog):
    one = make_tile_folder(tmp_path / "one", size=40, flat=1)
    with pytest.raises(GigaslideError, match="holds 1 tile: self-supervised pre-training learns from many"):
        pretrain(_cfg(one, tmp_path / "r1"))
    assert not (tmp_path / "r1").exists()  # refused before the run folder is made
    three = make_tile_folder(tmp_path / "three", size=40, flat=3)
    with caplog.at_level("WARNING", logger="gigaslide.ssl.tile"):
        s = pretrain(_cfg(three, tmp_path / "r3", steps=1))  # batch 4 > 3 tiles: runs, and says why it is poor
    assert s["steps"] == 1
    assert any("fewer than one batch (4)" in r.getMessage() for r in caplog.records)


# Lightning's own pytree deprecation, not ours
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_lightning_engine_runs_and_the_native_engine_resumes_it(tiles, tmp_path):
    pytest.importorskip("pytorch_lightning")
    s = pretrain(_cfg(tiles, tmp_path / "run", "dino", steps=2, engine="lightning", workers=0))
    assert s["engine"] == "pytorch-lightning" and s["steps"] == 2
    assert runs.read_run(tmp_path / "run")["summary"]["engine"] == "pytorch-lightning"
    s2 = pretrain(_cfg(tiles, tmp_path / "run", "dino", steps=3, engine="native"))  # same run folder and checkpoint
    assert s2["steps"] == 3 and s2["engine"] == "native"
    # the same step function: 3 Lightning-then-native steps equal 3 native steps
    pretrain(_cfg(tiles, tmp_path / "native", "dino", steps=2, engine="native"))
    pretrain(_cfg(tiles, tmp_path / "native", "dino", steps=3, engine="native"))
    assert _same(_export(tmp_path / "run"), _export(tmp_path / "native"))


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")  # Lightning's
@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_budgets_step_time_includes_waiting_for_the_batch(tiles, tmp_path, monkeypatch, engine):
    # data-bound runs (CPU augmentations) are common: a step time without the batch wait makes the budget plan more
    # steps than fit, so the lr / EMA / temperature schedules never reach their end. The Lightning engine timed only
    # the optimisation step
    if engine == "lightning":
        pytest.importorskip("pytorch_lightning")
    from gigaslide.ssl.tile.data import ViewDataset

    load = ViewDataset.__getitem__

    def slow(self, key):  # noqa: ANN001, ANN202
        time.sleep(0.1)
        return load(self, key)

    monkeypatch.setattr(ViewDataset, "__getitem__", slow)
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=None, budget_s=2.5, monitor_every=0, workers=0, engine=engine))
    assert s["steps"] >= 3 and s["seconds_per_step"] >= 4 * 0.1, s  # a batch of 4 tiles waits 0.4 s for its views


def test_pretrain_samples_tiles_straight_from_slides(synthetic_slide, tmp_path):
    s = pretrain(PretrainConfig(data=str(synthetic_slide.parent), out=str(tmp_path / "run"), method="simclr",
                                backbone="test_resnet", mpp=[0.5, 1.0], tile_size=32, batch_size=4, steps=1,
                                method_args=SMALL["simclr"], precision="bf16", monitor_size=8))
    assert s["data"]["kind"] == "slides" and s["data"]["mpps"] == [0.5, 1.0] and s["data"]["n_tiles"] > 100
    assert np.isfinite(s["final_loss"]) and s["precision"]["resolved"] == "bf16"  # bf16 autocast on CPU
    assert build_encoder(str(tmp_path / "run" / "encoder")).spec.native_mpp == 0.5


def test_swav_with_a_queue_resumes_bit_exactly(tiles, tmp_path):
    """The queue (batch 4, length 4) is full from step 1, so the steps after the resume use the checkpointed one."""
    args = {**SMALL["swav"], "queue_length": 4}
    full = pretrain(_cfg(tiles, tmp_path / "full", "swav", method_args=args))
    pretrain(_cfg(tiles, tmp_path / "part", "swav", method_args=args, stop_after_steps=2))
    resumed = pretrain(_cfg(tiles, tmp_path / "part", "swav", method_args=args))
    assert resumed["steps"] == full["steps"] == 4
    assert _same(_export(tmp_path / "full"), _export(tmp_path / "part")), "resumed weights differ"
    a, b = runs.load_checkpoint(tmp_path / "full")["model"], runs.load_checkpoint(tmp_path / "part")["model"]
    assert _same(a, b) and int(a["queue_seen"]) == 16
    assert any(k.startswith("buffer::queues.") for k in a)


def test_monitor_lines_name_the_step_their_loss_was_logged_at(tiles, tmp_path, caplog):
    # with log_every=2, step 3's monitor point has no loss of its own: it must not pass step 2's loss off as step 3's
    with caplog.at_level("INFO", logger="gigaslide"):
        pretrain(_cfg(tiles, tmp_path / "run", steps=3, log_every=2, monitor_every=1))
    lines = {int(r.getMessage().split()[2].split("/")[0]): r.getMessage() for r in caplog.records
             if r.getMessage().startswith("monitor step")}
    assert "none logged yet" in lines[0], lines[0]
    assert "(logged at step 2)" in lines[3], lines[3]


def test_a_checkpoint_whose_optimiser_groups_differ_is_a_one_line_error(tiles, tmp_path, monkeypatch):
    """A run made by a gigaslide with another parameter grouping (e.g. before DINOv2's layer-decay fix): resuming it
    was torch's ValueError traceback from the optimiser; now a one-line error naming the run and the fix."""
    from gigaslide.ssl.tile import session

    pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    monkeypatch.setattr(session, "param_groups", lambda model, *a, **k: [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}])
    with pytest.raises(GigaslideError, match="optimiser state does not fit") as e:
        pretrain(_cfg(tiles, tmp_path / "run", steps=4))
    assert "use a new --out" in e.value.one_line()


def test_a_tile_folders_mpp_is_recorded_only_when_given_and_old_runs_resume(tiles, tmp_path):
    """A tile folder's µm/px was recorded as the --mpp default 0.5 (`encode --encoder RUN/encoder` then tiled slides
    at 0.5 as the encoder's own): now only a given --mpp is recorded, and a run made under the old default resumes."""
    pretrain(_cfg(tiles, tmp_path / "given", steps=1, mpp=[1.0]))
    assert build_encoder(str(tmp_path / "given" / "encoder")).spec.native_mpp == 1.0
    assert read_provenance(tmp_path / "given" / "encoder").mpp == 1.0
    pretrain(_cfg(tiles, tmp_path / "old", steps=1, mpp=[0.5]))  # as every tile-folder run was made before
    s = pretrain(_cfg(tiles, tmp_path / "old", steps=2))  # the same command without --mpp resumes it
    assert s["steps"] == 2

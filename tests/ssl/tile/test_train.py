"""Training loop: finite/decreasing loss, exact resume, budget stop, atomic checkpoints, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile import checkpoint as ckpt
from gigaslide.ssl.tile.train import PretrainConfig, pretrain

SMALL = {
    "simclr": {"hidden_dim": 32, "out_dim": 16},
    "mocov2": {"hidden_dim": 32, "out_dim": 16, "queue": 16},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "freeze_last_layer_steps": 1},
    "swav": {"hidden_dim": 32, "out_dim": 16, "n_prototypes": 8, "freeze_prototypes_steps": 1},
}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """16 small H&E-like tiles: two textures, so the contrastive task has something to learn."""
    d = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(16):
        base = np.array([230, 150, 200] if i % 2 else [120, 70, 160], np.float32)
        img = base + rng.normal(0, 25, (40, 40, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"t{i:02d}.png")
    return d


def _cfg(tiles: Path, out: Path, method: str = "simclr", **kw) -> PretrainConfig:
    base = dict(data=str(tiles), out=str(out), method=method, backbone="test_resnet", tile_size=32, batch_size=4,
                n_local=2, method_args=SMALL[method], steps=4, log_every=1, data_kind="tiles")
    base.update(kw)
    return PretrainConfig(**base)


def _model_file(run: Path) -> dict[str, torch.Tensor]:
    state = ckpt.read_state(run)
    return load_file(str(run / "checkpoint" / state["model_file"]))


def test_run_exports_a_registry_encoder(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=3))
    assert s["steps"] == 3 and s["stopped_by"] == "steps" and np.isfinite(s["final_loss"])
    enc = build_encoder(str(tmp_path / "run" / "encoder"))
    assert enc.spec.input_size == 32 and enc.spec.name == "test_resnet_simclr"
    assert enc.spec.mean == (0.485, 0.456, 0.406)  # the normalisation training used
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    sd = _model_file(tmp_path / "run")
    trunk_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    assert all(torch.equal(trunk_sd[k], v) for k, v in enc.trunk.state_dict().items())
    assert enc(x).shape == (2, enc.embed_dim)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["images"] == 12 and run["format_version"] >= 1


def test_loss_decreases(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=20, batch_size=8, lr=3e-3, warmup_frac=0.0, log_every=1))
    hist = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["history"]
    losses = [h["loss"] for h in hist if h.get("loss") is not None]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    assert s["first_loss"] == losses[0]


@pytest.mark.parametrize("method", ["mocov2", "dino"])
def test_interrupted_run_resumes_exactly(tiles, tmp_path, method):
    full = pretrain(_cfg(tiles, tmp_path / "full", method))
    part = pretrain(_cfg(tiles, tmp_path / "part", method, stop_after_steps=2))
    assert part["steps"] == 2 and part["stopped_by"] == "stop_after_steps"
    resumed = pretrain(_cfg(tiles, tmp_path / "part", method))
    assert resumed["steps"] == full["steps"] == 4
    a, b = _model_file(tmp_path / "full"), _model_file(tmp_path / "part")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    if method == "mocov2":  # the negatives queue is checkpointed too
        assert any(k.startswith(ckpt.BUFFER_PREFIX) and "bank" in k for k in a)


def test_budget_stops_cleanly_with_usable_checkpoint(tiles, tmp_path):
    s = pretrain(_cfg(tiles, tmp_path / "run", steps=None, budget_s=0.5))
    assert s["stopped_by"] == "budget" and s["steps"] >= 1 and s["elapsed_s"] >= 0.5
    assert build_encoder(str(tmp_path / "run" / "encoder")).embed_dim > 0
    # re-running an exhausted budget does no more steps but keeps everything valid
    again = pretrain(_cfg(tiles, tmp_path / "run", steps=None, budget_s=0.5))
    assert again["steps"] == s["steps"]


def test_keyboard_interrupt_leaves_a_checkpoint(tiles, tmp_path, monkeypatch):
    from gigaslide.ssl.tile import methods

    calls = {"n": 0}
    orig = methods.SimCLR.after_step

    def boom(self, progress):  # noqa: ANN001
        calls["n"] += 1
        orig(self, progress)
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(methods.SimCLR, "after_step", boom)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tiles, tmp_path / "run", steps=5))
    state = ckpt.read_state(tmp_path / "run")
    assert state["reason"] == "interrupted" and state["step"] == 1
    monkeypatch.setattr(methods.SimCLR, "after_step", orig)
    assert pretrain(_cfg(tiles, tmp_path / "run", steps=5))["steps"] == 5


def test_stale_temp_files_and_old_steps_are_cleaned(tiles, tmp_path):
    run = tmp_path / "run"
    pretrain(_cfg(tiles, run, steps=2))
    (run / "checkpoint" / ".tmp-model-00000009.safetensors.abc").write_bytes(b"half")
    pretrain(_cfg(tiles, run, steps=3))
    names = sorted(p.name for p in (run / "checkpoint").iterdir())
    assert names == ["model-00000003.safetensors", "optimizer-00000003.pt", "state.json"]


def test_resume_with_other_options_is_refused(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    with pytest.raises(GigaslideError, match="another run"):
        pretrain(dataclasses.replace(_cfg(tiles, tmp_path / "run", steps=2), tile_size=40))


def test_damaged_checkpoint_is_a_clear_error(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "run", steps=2))
    state = ckpt.read_state(tmp_path / "run")
    (tmp_path / "run" / "checkpoint" / state["model_file"]).write_bytes(b"truncated")
    with pytest.raises(GigaslideError, match="damaged"):
        pretrain(_cfg(tiles, tmp_path / "run", steps=3))


def test_bad_options(tiles, tmp_path):
    with pytest.raises(GigaslideError, match="--steps N or --budget"):
        pretrain(_cfg(tiles, tmp_path / "a", steps=None))
    with pytest.raises(GigaslideError, match="unknown ssl_method"):
        pretrain(_cfg(tiles, tmp_path / "b", method="simclr") if False else
                 dataclasses.replace(_cfg(tiles, tmp_path / "b"), method="byol", method_args={}))
    with pytest.raises(GigaslideError, match="preset"):
        pretrain(dataclasses.replace(_cfg(tiles, tmp_path / "c"), augment="cifar"))


def test_lightning_engine_runs_and_resumes(tiles, tmp_path):
    pytest.importorskip("pytorch_lightning")
    s = pretrain(_cfg(tiles, tmp_path / "run", "dino", steps=2, engine="lightning", workers=0))
    assert s["engine"] == "pytorch-lightning" and s["steps"] == 2
    s2 = pretrain(_cfg(tiles, tmp_path / "run", "dino", steps=3, engine="native"))  # same checkpoint format
    assert s2["steps"] == 3
    assert build_encoder(str(tmp_path / "run" / "encoder")).spec.name == "test_resnet_dino"


def test_pretrain_samples_tiles_straight_from_slides(synthetic_slide, tmp_path):
    s = pretrain(PretrainConfig(data=str(synthetic_slide.parent), out=str(tmp_path / "run"), method="simclr",
                                backbone="test_resnet", mpp=[0.5, 1.0], tile_size=32, batch_size=4, steps=1,
                                method_args=SMALL["simclr"], precision="bf16"))
    assert s["data"]["kind"] == "slides" and s["data"]["mpps"] == [0.5, 1.0] and s["data"]["n_tiles"] > 100
    assert np.isfinite(s["final_loss"])  # bf16 autocast on CPU
    assert build_encoder(str(tmp_path / "run" / "encoder")).spec.native_mpp == 0.5

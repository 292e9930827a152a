"""Round 6, degenerate numbers in tile SSL: a NaN gradient under a finite loss, NaN weights, blank tiles.

The loss guard (``check_finite_loss``) sees a diverged run only once the loss itself is NaN: a NaN *gradient* under
a finite loss (an overflow in backward) made every weight NaN through clipping and the optimiser step, and the
checkpoint written after that step -- or the final checkpoint and export, when it was the last step -- held NaN
weights while the loss guard's message promised that "the last good checkpoint is kept".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.ssl.tile.methods import SSL_METHODS
from gigaslide.testing import make_tile_folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tile_folder(tmp_path_factory.mktemp("tiles") / "t", size=32, flat=16)


def _cfg(tiles: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(tiles), out=str(out), method="simclr", backbone="test_resnet", tile_size=32, batch_size=4,
                method_args={"hidden_dim": 32, "out_dim": 16}, steps=4, log_every=1, data_kind="tiles",
                monitor_size=8, precision="fp32", checkpoint_every_s=0.0)
    base.update(kw)
    return PretrainConfig(**base)


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


@pytest.fixture
def nan_gradient_at(monkeypatch):
    """Make the SimCLR loss of step ``k`` finite in value but NaN in its gradient (0 * d sqrt(x)/dx at 0)."""
    cls = SSL_METHODS.get("simclr")
    orig = cls.loss

    def arm(k: int) -> None:
        def loss(self, views, step, progress):  # noqa: ANN001, ANN202
            out = orig(self, views, step, progress)
            if step == k:
                p = next(self.parameters())
                out = out + 0.0 * torch.sqrt((p - p).sum())
            return out

        monkeypatch.setattr(cls, "loss", loss)

    return arm


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_a_nan_gradient_under_a_finite_loss_stops_before_the_weights_change(tiles, tmp_path, nan_gradient_at, engine):
    nan_gradient_at(1)  # the second step; a checkpoint follows every step (checkpoint_every_s=0)
    with pytest.raises(GigaslideError, match=r"gradients became nan at step 1 .*last good checkpoint is kept"):
        pretrain(_cfg(tiles, tmp_path / "run", engine=engine))
    ck = runs.load_checkpoint(tmp_path / "run")
    assert ck["step"] == 1 and _all_finite(ck["model"])  # the step before: finite (was: NaN weights, saved at step 2)
    assert not (tmp_path / "run" / "encoder").exists()
    # the re-run resumes from that good checkpoint and finishes once the cause is gone
    nan_gradient_at(-1)
    s = pretrain(_cfg(tiles, tmp_path / "run", engine=engine))
    assert s["stopped_by"] == "steps" and s["steps"] == 4
    assert _all_finite(load_file(str(tmp_path / "run" / "encoder" / "weights.safetensors")))


def test_a_nan_gradient_at_the_last_step_exports_no_nan_encoder(tiles, tmp_path, nan_gradient_at):
    nan_gradient_at(3)  # was: the run "finished" with a finite final loss and exported NaN weights
    with pytest.raises(GigaslideError, match="gradients became nan at step 3"):
        pretrain(_cfg(tiles, tmp_path / "run"))
    assert not (tmp_path / "run" / "encoder").exists()
    assert runs.read_run(tmp_path / "run")["status"] != "finished"
    assert _all_finite(runs.load_checkpoint(tmp_path / "run")["model"])


def test_weights_that_became_nan_otherwise_are_neither_checkpointed_nor_exported(tiles, tmp_path, monkeypatch):
    cls = SSL_METHODS.get("simclr")
    orig = cls.after_step

    def after_step(self, progress):  # noqa: ANN001, ANN202  (e.g. a momentum update gone wrong)
        orig(self, progress)
        if progress >= 0.75:
            with torch.no_grad():
                next(self.parameters()).fill_(float("inf"))

    monkeypatch.setattr(cls, "after_step", after_step)
    with pytest.raises(GigaslideError, match=r"weight tensor\(s\) became NaN/inf by step 4 .*no checkpoint or encoder"):
        pretrain(_cfg(tiles, tmp_path / "run"))
    assert runs.load_checkpoint(tmp_path / "run")["step"] == 3  # the checkpoint before: its weights are finite
    assert not (tmp_path / "run" / "encoder").exists()


# ------------------------------------------------------------------ fine-tune evaluation (ssl/tile/finetune.py)
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("labelled")
    return make_tile_folder(root / "train", 8, size=32, seed=0), make_tile_folder(root / "test", 6, size=32, seed=1)


def _finetune(labelled, out: Path):  # noqa: ANN001, ANN202
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    cfg = FinetuneConfig(epochs=1, batch_size=4, workers=0, n_bootstrap=20, precision="fp32")
    return finetune_tiles(*labelled, "test_resnet", out, weights="random", cfg=cfg)


def test_finetune_stops_on_a_nan_gradient_instead_of_reporting_a_nan_auc(labelled, tmp_path, monkeypatch):
    """12 training tiles, batch 4: a NaN gradient in the last step of the only epoch used to give a NaN model that was
    kept as the best one (validation loss NaN, the first epoch), exported, and scored: AUC NaN in report.json."""
    from gigaslide.ssl.tile import finetune as ft

    orig, calls = ft.Classifier.forward, []

    def forward(self, x):  # noqa: ANN001, ANN202
        out = orig(self, x)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                p = self.head.weight
                out = out + 0.0 * torch.sqrt((p - p).sum())
        return out

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    with pytest.raises(GigaslideError, match=r"gradients became nan at epoch 0 step 2 .*weights were not updated"):
        _finetune(labelled, tmp_path / "out")
    frac = tmp_path / "out" / "fraction_100pct"
    assert not (frac / "encoder").exists() and not (frac / "result.json").exists()
    assert not (tmp_path / "out" / "report.json").exists()


def test_finetune_stops_on_a_nan_validation_loss(labelled, tmp_path, monkeypatch):
    from gigaslide.ssl.tile import finetune as ft

    orig = ft.Classifier.forward

    def forward(self, x):  # noqa: ANN001, ANN202  (finite in training, NaN in evaluation: e.g. broken BN statistics)
        out = orig(self, x)
        return out if self.training else out * float("nan")

    monkeypatch.setattr(ft.Classifier, "forward", forward)
    with pytest.raises(GigaslideError, match="validation loss became nan after epoch 0"):
        _finetune(labelled, tmp_path / "out")
    frac = tmp_path / "out" / "fraction_100pct"
    assert not (frac / "best.safetensors").exists() and not (frac / "encoder").exists()
    assert not (tmp_path / "out" / "report.json").exists()


# ------------------------------------------------------------------ blank tiles
def _blank(d: Path, n: int = 8, value: int = 255) -> Path:
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(d / f"t{i}.png")
    return d


@pytest.mark.parametrize("value", [255, 0])
def test_a_folder_of_blank_tiles_trains_but_says_so(tmp_path, caplog, value):
    """White glass or black padding only: every method trained without a word (finite losses, RankMe 1.0)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="gigaslide.ssl.tile"):
        s = pretrain(_cfg(_blank(tmp_path / "blank", value=value), tmp_path / "run", steps=1))
    assert s["steps"] == 1
    assert "all 8 tiles sampled from" in caplog.text and "are blank (one flat colour each)" in caplog.text


def test_textured_tiles_are_not_called_blank(tiles, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="gigaslide.ssl.tile"):
        pretrain(_cfg(tiles, tmp_path / "run", steps=1))
    assert "blank" not in caplog.text

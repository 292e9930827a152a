"""``pretrain(cfg)``: one entry point, two engines over the same run layer and step function.

``engine="auto"`` runs the native loop (:mod:`.train`) on one device and PyTorch Lightning DDP
(:mod:`.lightning`) for ``devices > 1``; both stand on :mod:`.session` and :func:`.step.train_step`,
so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from gigaslide.ssl.tile.config import PretrainConfig, check_config
from gigaslide.ssl.tile.lightning import pretrain_lightning
from gigaslide.ssl.tile.train import pretrain_native


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume) the run ``cfg.out``; returns the run summary (also in ``run.json``)."""
    check_config(cfg)
    if cfg.engine == "lightning" or (cfg.engine == "auto" and cfg.devices > 1):
        return pretrain_lightning(cfg)
    return pretrain_native(cfg)


__all__ = ["PretrainConfig", "pretrain"]

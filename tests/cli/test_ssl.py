"""The tile-SSL commands' help (gigaslide.cli.ssl) states the defaults the methods run with."""

from __future__ import annotations

import inspect
import re


def _param_doc(func: object, name: str) -> str:
    """``name``'s help text in ``func``'s docstring, continuation lines included."""
    m = re.search(rf"^ {{4}}{name}: (.*?)(?=^ {{4}}\w+: |\Z)", inspect.getdoc(func) or "", re.S | re.M)
    assert m, name
    return " ".join(m.group(1).split())


def test_pretrain_help_states_each_methods_momentum_and_local_crops() -> None:
    from gigaslide.cli.ssl import pretrain
    from gigaslide.ssl.tile.config import DEFAULTS
    from gigaslide.ssl.tile.dinov2 import DINOv2
    from gigaslide.ssl.tile.methods import SSL_METHODS

    momentum = _param_doc(pretrain, "momentum")
    for label, name in (("MoCo v2", "mocov2"), ("DINO", "dino"), ("DINOv2", "dinov2")):
        assert f"{label} {SSL_METHODS.get(name).hparams['momentum']}" in momentum, momentum
    n_local = _param_doc(pretrain, "n_local")
    assert f"DINOv2 {DINOv2.recipe['n_local']}, else {DEFAULTS['n_local']}" in n_local, n_local
    assert f"DINO {SSL_METHODS.get('dino').hparams['teacher_temp']}" in _param_doc(pretrain, "teacher_temp")

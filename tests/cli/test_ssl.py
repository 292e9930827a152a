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


def test_pretrain_passes_a_forced_background_and_refuses_an_unknown_one(tmp_path, monkeypatch, capsys) -> None:
    """pretrain had no ``--background`` for --data slides: a mis-detected slide could not be forced."""
    import gigaslide.ssl.tile.engine as engine
    from gigaslide.cli.main import main

    got = []
    summary = {"method": "dino", "backbone": "resnet18", "steps": 1, "elapsed_s": 0.0}
    monkeypatch.setattr(engine, "pretrain", lambda cfg: got.append(cfg.background) or summary)
    for extra, want in (([], "auto"), (["--background", "dark"], "dark")):
        assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1", *extra]) == 0
        assert got[-1] == want
    capsys.readouterr()
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--background", "grey"]) == 2
    err = capsys.readouterr().err
    assert "--background 'grey' is not one of auto, bright, dark" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()

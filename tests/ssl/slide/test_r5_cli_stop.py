"""pretrain-slides stopped by Ctrl-C / SIGTERM exits non-zero (a --budget stop is a success); the re-run resumes."""

from __future__ import annotations

import os
import signal

import pytest

from gigaslide.cli.main import main

ARGS = ["--epochs", "6", "--out-dim", "8", "--width", "8", "--blocks", "1", "--tiles-per-step", "4", "--device", "cpu"]


@pytest.mark.parametrize("sig, code, reason", [(signal.SIGINT, 130, "interrupt"), (signal.SIGTERM, 143, "signal")])
def test_interrupted_pretraining_exits_non_zero(sig, code, reason, tmp_path, make_fake_cache, monkeypatch, capsys):
    """A Ctrl-C'd run exited 0 like a finished one: `pretrain-slides && embed-slides` went on to a run with no model."""
    import gigaslide.ssl.slide.gigassl as g

    cache = make_fake_cache(tmp_path / "cache", n_slides=4, n_tiles=16)
    seen, monitor = [], g.view_retrieval

    def signalled(*a, **k):  # noqa: ANN002, ANN003, ANN202 - the signal arrives during the second epoch's end
        seen.append(1)
        if len(seen) == 3:  # the untrained encoder's monitor, epoch 1's, epoch 2's
            os.kill(os.getpid(), sig)
        return monitor(*a, **k)

    monkeypatch.setattr(g, "view_retrieval", signalled)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(["pretrain-slides", "--method", "gigassl", "--cache", str(cache), "--out", out, *ARGS])
    assert e.value.code == code
    assert f"gigassl: stopped ({reason}; re-run the same command to resume)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(g, "view_retrieval", monitor)
    assert main(["pretrain-slides", "--method", "gigassl", "--cache", str(cache), "--out", out, *ARGS]) == 0
    assert "gigassl: finished; 6 epochs" in capsys.readouterr().out


def test_budget_stop_is_a_success(tmp_path, make_fake_cache, capsys):
    cache = make_fake_cache(tmp_path / "cache", n_slides=4, n_tiles=16)
    out = str(tmp_path / "run")
    assert main(["pretrain-slides", "--method", "gigassl", "--cache", str(cache), "--out", out, "--budget", "0.000001",
                 *ARGS]) == 0
    assert "gigassl: stopped (budget; re-run the same command to resume)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["gigassl", "slpd"])
def test_bad_budget_is_refused_before_a_run_folder_is_made(method, tmp_path, make_fake_cache, capsys):
    """--budget 0s was read only once training began: a run folder (run.json, status running) was left behind."""
    cache = make_fake_cache(tmp_path / "cache", n_slides=4, n_tiles=16)
    data = ["--cache", str(cache)] if method == "gigassl" else ["--features", str(cache), "--region-size", "256"]
    assert main(["pretrain-slides", "--method", method, *data, "--out", str(tmp_path / "run"), "--budget", "0s"]) == 2
    assert "duration '0s' must be a positive time" in capsys.readouterr().err
    assert not (tmp_path / "run" / "run.json").exists()

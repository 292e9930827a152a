"""The user's environment (review round 6, lens E): no home folder (HOME unset, a uid without a passwd entry)."""

from __future__ import annotations

import pwd

import pytest

from gigaslide.cli.spine import encoders
from gigaslide.encoders.weights import cache_dirs, resolve_hub_weights
from gigaslide.errors import GigaslideError


@pytest.fixture
def no_home(monkeypatch):
    """A container's arbitrary uid with HOME unset: Path.home() raises RuntimeError."""
    for var in ("HOME", "GIGASLIDE_WEIGHTS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def unknown(uid):  # noqa: ANN001, ANN202
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)


def test_no_home_lists_encoders_and_names_the_missing_cache(no_home, tmp_path, monkeypatch, capsys):
    assert cache_dirs() == []  # was RuntimeError("Could not determine home directory.") -- a traceback
    encoders()  # `gigaslide encoders` lists the registry (cached: no)
    assert "resnet18" in capsys.readouterr().out
    with pytest.raises(GigaslideError, match="no local cache to look in .*HOME is unset"):
        resolve_hub_weights("hf-hub:timm/resnet18.a1_in1k")
    monkeypatch.setenv("GIGASLIDE_WEIGHTS", str(tmp_path))  # a cache named explicitly still works
    assert cache_dirs() == [tmp_path]

"""Weights files read by `encode --weights`, `embed-tiles --weights` and build_encoder: a safetensors header
claiming more tensor bytes than memory is refused from the header, before anything is loaded (a sparse file
claiming a [10^5, 10^5] tensor aborted the process with std::bad_alloc and no message)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gigaslide.encoders import read_state_dict
from gigaslide.encoders import weights as W
from gigaslide.errors import GigaslideError


def test_a_header_claiming_more_than_the_memory_available_is_refused_unread(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    save_file({"small": torch.zeros(3), "big": torch.zeros(512, 512)}, str(f))  # 1 MiB of tensors
    monkeypatch.setattr(W, "available_memory", lambda: 1 << 19)  # 512 KiB free

    def never(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("loaded")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    with pytest.raises(GigaslideError, match=r"w.safetensors: weights file claims 0.0 GiB of tensors \(the largest, "
                                             r"big: \[512, 512\]\), more than the 0.0 GiB"):
        read_state_dict(f)


def test_a_file_that_fits_is_read_as_before(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0).view(2, 3)}, str(f))
    monkeypatch.setattr(W, "available_memory", lambda: 1 << 30)
    assert torch.equal(read_state_dict(f)["a"], torch.arange(6.0).view(2, 3))
    assert W.safetensors_shapes(f) == {"a": ([2, 3], 4)}
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    assert W.safetensors_shapes(tmp_path / "bad.safetensors") is None  # the loader names a damaged file


def test_a_torch_file_claiming_more_than_the_memory_available_is_refused_from_its_mapping(tmp_path, monkeypatch):
    f = tmp_path / "w.pt"
    torch.save({"state_dict": {"big": torch.zeros(512, 512), "b": torch.ones(3)}}, f)  # 1 MiB of tensors
    monkeypatch.setattr(W, "available_memory", lambda: 1 << 19)
    with pytest.raises(GigaslideError, match=r"w.pt: weights file claims 0.0 GiB of tensors \(the largest: "
                                             r"\[512, 512\]\), more than the 0.0 GiB"):
        read_state_dict(f)
    monkeypatch.setattr(W, "available_memory", lambda: 1 << 30)
    sd = read_state_dict(f)  # fits: read as before, the "state_dict" wrapper unwrapped
    assert sorted(sd) == ["b", "big"] and torch.equal(sd["b"], torch.ones(3))
    legacy = tmp_path / "legacy.pt"  # pre-zip format: no mapping, loaded as before
    torch.save({"a": torch.arange(4.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(legacy)["a"], torch.arange(4.0))

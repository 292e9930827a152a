"""Atomic, pickle-free training checkpoints: ``RUN_DIR/checkpoint/``.

* ``model-<step>.safetensors``: every tensor of the method (trunk, heads, EMA teacher, and the
  non-persistent buffers lightly keeps, e.g. MoCo's queue, stored under ``buffer::<name>``);
* ``optimizer-<step>.pt``: the optimiser (and AMP scaler) state, a plain dict of tensors and
  numbers, loaded with ``torch.load(weights_only=True)``;
* ``state.json``: step, elapsed seconds, config, history, and the names of the two files above.

``state.json`` is written last (atomically), so a crash at any point leaves the previous
consistent checkpoint; files of older steps are removed only after the new state is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigaslide import atomic
from gigaslide.errors import GigaslideError

STATE = "state.json"
BUFFER_PREFIX = "buffer::"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoint"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, b in model.named_buffers():
        if name not in sd and b is not None:
            sd[BUFFER_PREFIX + name] = b.detach().cpu().contiguous().clone()
    return sd


def load_model_tensors(model: nn.Module, sd: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    buffers = {k[len(BUFFER_PREFIX):]: v for k, v in sd.items() if k.startswith(BUFFER_PREFIX)}
    params = {k: v for k, v in sd.items() if not k.startswith(BUFFER_PREFIX)}
    try:
        model.load_state_dict(params, strict=True)
    except RuntimeError as e:
        raise GigaslideError(f"checkpoint does not fit this model ({str(e).splitlines()[0][:160]})", path=source,
                             fix="resume with the same --method, --backbone and --method-args, or use a new --out") from None
    named = dict(model.named_buffers())
    for name, v in buffers.items():
        if name in named:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if named[name].shape == v.shape:
                named[name].copy_(v)
            else:
                setattr(mod, attr, v.to(named[name].device))


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer_state: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``state['step']`` atomically; returns the checkpoint folder."""
    from safetensors.torch import save_file

    d = atomic.ensure_writable_dir(checkpoint_dir(run_dir))
    step = int(state["step"])
    model_name, opt_name = f"model-{step:08d}.safetensors", f"optimizer-{step:08d}.pt"
    with atomic.atomic_path(d / model_name, suffix=".safetensors") as tmp:
        save_file(model_tensors(model), str(tmp), metadata={"format": "pt", "step": str(step)})
    with atomic.atomic_path(d / opt_name, suffix=".pt") as tmp:
        torch.save(optimizer_state, tmp)
    atomic.write_json(d / STATE, {**state, "model_file": model_name, "optimizer_file": opt_name})
    for f in d.iterdir():  # older steps, now superseded
        if f.name not in (model_name, opt_name, STATE) and f.name.startswith(("model-", "optimizer-")):
            with contextlib.suppress(OSError):
                f.unlink()
    return d


def read_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last checkpoint's ``state.json`` or None when there is none."""
    f = checkpoint_dir(run_dir) / STATE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GigaslideError(f"checkpoint state is unreadable ({e})", path=f,
                             fix="delete RUN_DIR/checkpoint to start over, or use a new --out") from None


def load_checkpoint(run_dir: str | os.PathLike, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; returns (state, optimizer_state)."""
    from safetensors.torch import load_file

    state = read_state(run_dir)
    if state is None:
        raise GigaslideError("no checkpoint here", path=checkpoint_dir(run_dir), fix="start a run with this --out first")
    d = checkpoint_dir(run_dir)
    mf, of = d / state["model_file"], d / state["optimizer_file"]
    try:
        sd = load_file(str(mf), device="cpu")
        opt = torch.load(of, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any damage: name the file
        raise GigaslideError(f"checkpoint files are damaged ({str(e).splitlines()[0][:160]})", path=d,
                             fix="delete RUN_DIR/checkpoint to start over (the exported encoder, if any, stays usable)") from None
    load_model_tensors(model, sd, mf)
    return state, opt


def backbone_state(run_dir: str | os.PathLike, prefer: str = "backbone.") -> dict[str, torch.Tensor]:
    """The trunk's weights from a run's checkpoint (the exported trunk: teacher for DINO)."""
    from safetensors.torch import load_file

    state = read_state(run_dir)
    if state is None:
        raise GigaslideError("no checkpoint here", path=checkpoint_dir(run_dir), fix="pass a run folder written by `gigaslide pretrain`")
    sd = load_file(str(checkpoint_dir(run_dir) / state["model_file"]), device="cpu")
    pre = state.get("export_prefix", prefer)
    return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}

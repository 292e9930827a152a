"""A slide-SSL run folder: ``config.json`` (method, model, data provenance), ``checkpoint.pt``
(resume state, written atomically after every epoch, read with ``weights_only=True``),
``model.safetensors`` (the exported encoder used by ``embed-slides``) and ``history.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gigaslide import atomic
from gigaslide.artifacts import provenance
from gigaslide.errors import GigaslideError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
HISTORY = "history.json"


def prepare(out: str | os.PathLike, config: dict[str, Any], keys: tuple[str, ...]) -> tuple[Path, dict | None]:
    """Create the run folder, refuse to resume a run made with other ``keys``; returns (folder, checkpoint or None)."""
    run = atomic.ensure_writable_dir(out)
    atomic.clean_stale_tmp(run)
    ck = None
    if (run / CONFIG).is_file():
        old = read_config(run)
        diff = [k for k in keys if k in old and json.dumps(old[k], sort_keys=True) != json.dumps(config.get(k), sort_keys=True)]
        if diff:
            raise GigaslideError(f"run folder holds a run with other settings ({', '.join(diff)})", path=run,
                                 fix="use a new --out, or repeat the original options to resume")
        if (run / CHECKPOINT).is_file():
            try:
                ck = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise GigaslideError(f"checkpoint cannot be read ({type(e).__name__})", path=run / CHECKPOINT,
                                     fix="delete checkpoint.pt to restart from scratch") from None
    atomic.write_json(run / CONFIG, {**provenance(kind="slide_ssl_run"), **config})
    return run, ck


def save_checkpoint(run: Path, state: dict[str, Any]) -> None:
    with atomic.atomic_path(run / CHECKPOINT, suffix=".pt") as tmp:
        torch.save(state, tmp)


def export(run: Path, model: torch.nn.Module, history: list[dict]) -> Path:
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(run / MODEL, suffix=".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic.write_json(run / HISTORY, history)
    return run / MODEL


def read_config(run: str | os.PathLike) -> dict[str, Any]:
    p = Path(run) / CONFIG
    if not p.is_file():
        raise GigaslideError("not a slide-SSL run folder (no config.json)", path=run,
                             fix="pass the --out folder of `gigaslide pretrain-slides`")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise GigaslideError("config.json is not valid JSON", path=p, fix="re-run pretrain-slides into a new --out") from None


def load_weights(run: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load_file

    p = Path(run) / MODEL
    if not p.is_file():
        raise GigaslideError("run has no exported model (model.safetensors): pre-training did not finish", path=run,
                             fix="re-run the same `gigaslide pretrain-slides` command: it resumes and exports")
    model.load_state_dict(load_file(str(p)), strict=True)
    return model.eval()


def device_of(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

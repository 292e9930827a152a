"""What a slide-SSL run leaves for later stages, on top of :mod:`gigaslide.runs`.

A run folder (``gigaslide pretrain-slides --out RUN``) is a :func:`gigaslide.runs.open_run` folder:
``run.json`` (config, identity, input fingerprints, provenance, history, collapse verdict),
``checkpoint/`` (pickle-free resume state) and, once training finished, ``model.safetensors`` (the
exported encoder ``embed-slides`` loads) and ``history.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gigaslide import atomic, runs
from gigaslide.errors import GigaslideError
from gigaslide.provenance import COMPAT_KEYS, Provenance, check_same


MODEL = "model.safetensors"
HISTORY = "history.json"
KINDS = ("gigassl", "slpd")


def export_model(run_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], history: list[dict]) -> Path:
    """Write the encoder's ``state`` as ``RUN/model.safetensors`` (fp32) and ``RUN/history.json``."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    sd = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
          for k, v in state.items()}
    with atomic.atomic_path(run_dir / MODEL, suffix=".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic.write_json(run_dir / HISTORY, history)
    return run_dir / MODEL


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config of a slide-SSL run (``method`` = the run kind), or a one-line error."""
    rec = runs.read_run(run_dir)
    if rec is None or rec.get("run_kind") not in KINDS:
        raise GigaslideError("not a slide-SSL run folder (no run.json of a gigassl / slpd run)", path=run_dir,
                             fix="pass the --out folder of `gigaslide pretrain-slides`")
    return {**rec.get("config", {}), "method": rec["run_kind"], "collapse": rec.get("collapse")}


def load_weights(run_dir: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    from safetensors.torch import load_file

    p = Path(run_dir) / MODEL
    if not p.is_file():
        raise GigaslideError("run has no exported model (model.safetensors): pre-training did not finish", path=run_dir,
                             fix="re-run the same `gigaslide pretrain-slides` command: it resumes and exports")
    runs.load_module_state(model, load_file(str(p)), p, fix="the run folder and its config disagree; re-run pretrain-slides")
    return model.eval()


def data_record(prov: Provenance) -> dict[str, Any]:
    """The tile-feature facts a run was trained on (checked again when embedding)."""
    return {"tile_encoder": prov.encoder, "encoder_weights_sha256": prov.encoder_weights_sha256, "mpp": prov.mpp,
            "tile_size": prov.tile_size}


def check_features(run_dir: str | os.PathLike, data: Mapping[str, Any], feature_prov: Provenance,
                   feature_path: str | os.PathLike, dim: int) -> None:
    """Refuse tile features made by another encoder / weights / mpp / tile size than the run's."""
    if int(data.get("dim", dim)) != dim:
        raise GigaslideError(f"features are {dim}-d, the run was trained on {data.get('dim')}-d tile features",
                             path=feature_path, fix="embed features made with the tile encoder the run was trained on")
    run_prov = Provenance("slide_ssl_run", encoder=data.get("tile_encoder"),
                          encoder_weights_sha256=data.get("encoder_weights_sha256"), mpp=data.get("mpp"),
                          tile_size=data.get("tile_size"))
    keys = [k for k in COMPAT_KEYS if run_prov.get(k) is not None and feature_prov.get(k) is not None]
    try:
        check_same([(Path(run_dir) / "run.json", run_prov), (feature_path, feature_prov)], keys, where=feature_path)
    except GigaslideError as e:  # its fix ("one encoder per folder") was about a folder; here the run is the other side
        sha = str(run_prov.encoder_weights_sha256 or "?")[:12]
        raise GigaslideError(f"{e.what} (the slide-SSL run {run_dir} was trained on other tile features)",
                             path=feature_path,
                             fix=f"embed features made as the run's were (tile encoder {run_prov.encoder}, weights "
                                 f"sha256 {sha}..., {run_prov.mpp} µm/px, {run_prov.tile_size} px tiles), or "
                                 "pre-train a run on these features") from None

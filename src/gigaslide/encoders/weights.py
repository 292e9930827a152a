"""Loading encoder weights safely: safetensors, ``.pt``/``.bin`` with ``weights_only=True``,
gigaslide checkpoints, and hub ids resolved from a local cache (never downloaded at run time)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gigaslide.errors import GigaslideError

#: Prefixes stripped from checkpoint keys (DDP, ``torch.compile``, SSL wrappers, timm/lightly backbones).
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "trunk.", "teacher.backbone.",
                  "student.backbone.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors or torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("weights file not found", path=p, fix="check the --weights path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            sd = obj
            for key in ("state_dict", "model", "teacher", "student"):
                if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                    sd = sd[key]
                    break
    except GigaslideError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling/format error is a bad file for the user
        raise GigaslideError(f"cannot load weights ({str(e).splitlines()[0][:200]})", path=p,
                             fix="give a .safetensors file or a plain state_dict saved with torch.save (no pickled objects)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GigaslideError("file does not hold a state_dict of tensors", path=p, fix="save model.state_dict() instead")
    return dict(sd)


def strip_prefixes(sd: dict[str, torch.Tensor], own_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.`` ...) key by key, stopping at a key the model has. A
    training checkpoint holding a teacher and a student (DINO, DINOv2) gives the teacher's weights, the model
    those methods evaluate and release."""
    out = {}
    teacher = any(k.startswith(("teacher.", "module.teacher.")) for k in sd)
    for k, v in sd.items():
        if teacher and k.startswith(("student.", "module.student.")):
            continue
        key = k
        while own_keys is None or key not in own_keys:
            pre = next((p for p in STRIP_PREFIXES if key.startswith(p)), None)
            if pre is None:
                break
            key = key[len(pre):]
        out.setdefault(key, v)
    return out


def cache_dirs() -> list[Path]:
    """Where hub weights are looked for, in order."""
    dirs = []
    if os.environ.get("GIGASLIDE_WEIGHTS"):
        dirs.append(Path(os.environ["GIGASLIDE_WEIGHTS"]))
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def resolve_hub_weights(hub: str) -> Path:
    """Find a hub model's weights file in a local cache (Hugging Face layout or a flat folder)."""
    repo = hub.removeprefix("hf-hub:").removeprefix("hf_hub:")
    repo_id = repo.split("@")[0]
    folder = "models--" + repo_id.replace("/", "--")
    names = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    looked = []
    for d in cache_dirs():
        candidates = [d / repo_id, d / repo_id.replace("/", "--")]
        snaps = d / folder / "snapshots"
        if snaps.is_dir():
            candidates += sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for c in candidates:
            for n in names:
                if (c / n).is_file():
                    return c / n
        looked.append(str(d))
    raise GigaslideError(
        f"weights for {hub} are not in the local cache (looked in {', '.join(looked)})",
        fix=f"on a machine with internet run `huggingface-cli download {repo_id}` and copy the cache here "
            "(or set GIGASLIDE_WEIGHTS to a folder holding <org>/<name>/model.safetensors), or pass --weights PATH",
    )

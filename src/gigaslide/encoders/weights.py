"""Loading encoder weights safely: safetensors, ``.pt``/``.bin`` with ``weights_only=True``,
gigaslide checkpoints, and hub ids resolved from a local cache (never downloaded at run time)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from gigaslide.errors import GigaslideError
from gigaslide.memory import available_memory

#: Prefixes stripped from checkpoint keys (DDP, ``torch.compile``, SSL wrappers, timm/lightly backbones, the query
#: encoder of the official MoCo v2 / v3 checkpoints).
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "trunk.", "teacher.backbone.",
                  "student.backbone.", "encoder_q.", "base_encoder.")
#: Training checkpoints holding two copies of the network: (the one evaluated and released, the other).
TWIN_NETWORKS = (("teacher.", "student."), ("encoder_q.", "encoder_k."), ("base_encoder.", "momentum_encoder."))


#: Weight file names of a hub model's folder, in the order they are taken.
HUB_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin",
                    "open_clip_pytorch_model.bin")


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a folder (``huggingface-cli download REPO --local-dir DIR``, as UNI's and Virchow's model
    cards do it, or a cache snapshot; an encoder export) the weights file in it: the first of :data:`HUB_WEIGHT_NAMES`,
    then an export's ``weights.safetensors``."""
    p = Path(path)
    if not p.is_dir():
        return p
    names = (*HUB_WEIGHT_NAMES, "weights.safetensors")
    found = next((p / n for n in names if (p / n).is_file()), None)
    if found is None:
        raise GigaslideError(f"folder holds no weights file ({', '.join(names)})", path=p,
                             fix="pass the weights file itself with --weights (.safetensors / .pt / .pth / .bin)")
    return found


#: Largest safetensors header read (the JSON before the tensors; real ones are kilobytes).
MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[list[int], int]] | None:
    """``{name: (shape, bytes per element)}`` from a safetensors file's header alone (its 8-byte length and JSON:
    not ``safe_open``, which maps the whole file), or None for a header that cannot be read (the loader names it)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n <= MAX_HEADER_BYTES else None
        return {k: ([int(d) for d in v["shape"]], _DTYPE_BYTES.get(str(v.get("dtype")), 4))
                for k, v in header.items() if k != "__metadata__"}
    except Exception:  # noqa: BLE001 - a damaged file: read_state_dict names it
        return None


def check_fits_in_memory(path: Path) -> None:
    """Refuse, from its header, a safetensors file whose tensors would not fit in the memory available now (a header
    claiming a [10^5, 10^5] tensor over a sparse file aborted the process with ``std::bad_alloc``, no message)."""
    shapes = safetensors_shapes(path)
    avail = available_memory()
    if not shapes or avail is None:
        return
    nbytes = sum(math.prod(shape) * size for shape, size in shapes.values())
    if nbytes > avail:
        big = max(shapes, key=lambda k: math.prod(shapes[k][0]))
        raise _too_large(path, nbytes, f"the largest, {big}: {shapes[big][0]}", avail, "header")


def _too_large(path: Path, nbytes: int, largest: str, avail: int, what: str) -> GigaslideError:
    """The one-line refusal of a weights file claiming more tensor bytes than the memory available."""
    return GigaslideError(f"weights file claims {nbytes / 2**30:,.1f} GiB of tensors ({largest}), "
                          f"more than the {avail / 2**30:,.1f} GiB of memory available", path=path,
                          fix=f"check the file: no encoder's weights are that large (a damaged or hostile {what}?)")


def _load_torch_file(p: Path) -> object:
    """``torch.load(weights_only=True)`` that first maps a zip-format file (``mmap=True``: no tensor is read) and
    refuses tensors larger than the memory available (a pickle claiming [10^5, 10^5] over a sparse file was read
    whole); then the tensors are copied into memory as before (a mapping would tie the model to the file's bytes).
    Legacy (pre-zip) files are loaded as before."""
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(p), map_location="cpu", weights_only=True)
    tensors = _tensors_in(obj)
    avail = available_memory()
    nbytes = sum(t.untyped_storage().nbytes() for t in {id(t.untyped_storage()): t for t in tensors}.values())
    if avail is not None and nbytes > avail:
        big = max(tensors, key=lambda t: t.numel())
        raise _too_large(p, nbytes, f"the largest: {list(big.shape)}", avail, "file")
    return _copied(obj)


def _tensors_in(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v)]
    return []


def _copied(obj: object) -> object:
    """``obj`` with every tensor copied out of the file's mapping (a view: only its own elements)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors or torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("weights file not found", path=p, fix="check the --weights path")
    if p.stat().st_size == 0:  # torch.load's error on it has no text: the message was an IndexError traceback
        raise GigaslideError("weights file is empty (an interrupted download or copy?)", path=p,
                             fix="download or copy the weights again")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            check_fits_in_memory(p)

            sd = load_file(str(p), device="cpu")
        else:
            obj = _load_torch_file(p)
            sd = obj
            for key in ("state_dict", "model", "teacher", "student"):
                if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                    sd = sd[key]
                    break
    except GigaslideError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling/format error is a bad file for the user
        # torch's message: its first line, without the ANSI bold it sets some words in
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise GigaslideError(f"cannot load weights ({first[:200]})", path=p,
                             fix="give a .safetensors file or a plain state_dict saved with torch.save (no pickled objects)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GigaslideError("file does not hold a state_dict of tensors", path=p, fix="save model.state_dict() instead")
    return dict(sd)


def strip_prefixes(sd: dict[str, torch.Tensor], own_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.`` ...) key by key, stopping at a key the model has. A
    training checkpoint holding a teacher and a student (DINO, DINOv2) gives the teacher's weights, the model
    those methods evaluate and release; one of MoCo v2 / v3 (``encoder_q`` / ``encoder_k``, ``base_encoder`` /
    ``momentum_encoder``) its query / base encoder (the momentum copy was loaded over it, key by key)."""
    out = {}
    # DINO's teacher; MoCo's query (v2: encoder_q) or base (v3) encoder, the one its linear evaluation uses
    others = tuple(p for keep, other in TWIN_NETWORKS if any(k.removeprefix("module.").startswith(keep) for k in sd)
                   for p in (other, "module." + other))
    for k, v in sd.items():
        if others and k.startswith(others):
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
    """Where hub weights are looked for, in order: GIGASLIDE_WEIGHTS, then the cache huggingface_hub itself uses
    (HF_HUB_CACHE, its older name HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, HF_HOME defaulting to
    $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface)."""
    dirs = []
    if os.environ.get("GIGASLIDE_WEIGHTS"):
        dirs.append(Path(os.environ["GIGASLIDE_WEIGHTS"]).expanduser())
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    hf_home = os.environ.get("HF_HOME") or (os.environ.get("XDG_CACHE_HOME") or "~/.cache") + "/huggingface"
    try:
        dirs.append(Path(hf_home).expanduser() / "hub")
    except RuntimeError:  # "~" with HOME unset and a user without a passwd entry (a container's arbitrary uid)
        pass
    return list(dict.fromkeys(dirs))


def _ref(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def resolve_hub_weights(hub: str) -> Path:
    """Find a hub model's weights file in a local cache (Hugging Face layout or a flat folder)."""
    repo = hub.removeprefix("hf-hub:").removeprefix("hf_hub:")
    repo_id = repo.split("@")[0]
    folder = "models--" + repo_id.replace("/", "--")
    looked = []
    for d in cache_dirs():
        candidates = [d / repo_id, d / repo_id.replace("/", "--")]
        snaps = d / folder / "snapshots"
        if snaps.is_dir():
            # the revision refs/main names first, as huggingface_hub resolves it offline (the newest folder may be an
            # older revision fetched later, e.g. for a paper's results), then the others, newest first
            main = _ref(d / folder / "refs" / "main")
            candidates += sorted(snaps.iterdir(), key=lambda p: (p.name == main, p.stat().st_mtime), reverse=True)
        for c in candidates:
            for n in HUB_WEIGHT_NAMES:
                if (c / n).is_file():
                    return c / n
        looked.append(str(d))
    raise GigaslideError(
        f"weights for {hub} are not in the local cache (looked in {', '.join(looked)})" if looked else
        f"weights for {hub}: no local cache to look in (HOME is unset and this user has no home folder)",
        fix=f"on a machine with internet run `huggingface-cli download {repo_id}` and copy the cache here "
            "(or set GIGASLIDE_WEIGHTS to a folder holding <org>/<name>/model.safetensors), or pass --weights PATH",
    )

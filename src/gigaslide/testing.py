"""Helpers for tests and benchmarks: synthetic pyramidal slides and tiny encoders.

Everything here is generated on the fly; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gigaslide.slides.writer import write_pyramidal_tiff

H_AND_E = np.array([[200, 120, 170], [120, 60, 150], [235, 170, 200]], np.float32)  # eosin, hematoxylin, light


def _hash_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic per-pixel noise in [0, 1) from integer coordinates (no state, any tile order)."""
    h = (x.astype(np.uint64) * np.uint64(73856093)) ^ (y.astype(np.uint64) * np.uint64(19349663)) ^ np.uint64(seed * 83492791 + 1)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995)
    h = h ^ (h >> np.uint64(15))
    return (h & np.uint64(0xFFFF)).astype(np.float32) / 65536.0


def tissue_fn(width: int, height: int, seed: int = 0, blobs: int = 3):  # noqa: ANN201
    """A tile callback drawing ``blobs`` elliptical H&E-like tissue pieces on white glass."""
    rng = np.random.default_rng(seed)
    cx = rng.uniform(0.2, 0.8, blobs) * width
    cy = rng.uniform(0.2, 0.8, blobs) * height
    rx = rng.uniform(0.12, 0.25, blobs) * width
    ry = rng.uniform(0.12, 0.25, blobs) * height

    def fn(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * ds
        ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * ds
        X, Y = np.meshgrid(xs, ys)
        inside = np.zeros((h, w), bool)
        for i in range(blobs):
            inside |= ((X - cx[i]) / rx[i]) ** 2 + ((Y - cy[i]) / ry[i]) ** 2 <= 1.0
        out = np.full((h, w, 3), 245, np.float32)
        if inside.any():
            cell = 24.0  # level-0 px per "nucleus" cell
            n = _hash_noise((X // cell).astype(np.int64), (Y // cell).astype(np.int64), seed)
            nucleus = n < 0.25
            base = np.where(nucleus[..., None], H_AND_E[1], H_AND_E[0])
            jitter = (_hash_noise(X.astype(np.int64), Y.astype(np.int64), seed + 1)[..., None] - 0.5) * 30
            out = np.where(inside[..., None], base + jitter, out)
        return out.clip(0, 255).astype(np.uint8)

    return fn


def make_slide(path: str | os.PathLike, size: tuple[int, int] = (2048, 1536), *, mpp: float | None = 0.5, seed: int = 0,
               blobs: int = 3, blank: bool = False, tile: int = 256, compression: str = "jpeg") -> Path:
    """Write a synthetic pyramidal TIFF slide with tissue-like blobs (or blank glass)."""
    w, h = size
    fn = (lambda x0, y0, tw, th, ds: np.full((th, tw, 3), 245, np.uint8)) if blank else tissue_fn(w, h, seed, blobs)
    return write_pyramidal_tiff(path, w, h, fn, mpp=mpp, tile=tile, compression=compression)


def shared_data_dir() -> Path | None:
    """``../shared/data`` relative to the repository (or $GIGASLIDE_SHARED_DATA), if present."""
    env = os.environ.get("GIGASLIDE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if (c / "MANIFEST.md").is_file():
            return c
    return None


#: Colours of the two classes of :func:`make_tile_folder`: pale pink (normal) and dark purple (tumour).
TILE_CLASS_COLOURS = ((235, 190, 215), (120, 60, 150))


def make_tile_folder(root: str | os.PathLike, n_per_class: int | None = 6, *, size: int = 32, seed: int = 0,
                     classes: tuple[str, ...] = ("normal", "tumor"), noise: float = 25.0, flat: int | None = None,
                     ext: str = "png") -> Path:
    """A folder of small H&E-like tiles, separable by colour and texture.

    With ``classes`` (default) one sub-folder per class holds ``n_per_class`` tiles, class ``k`` drawn around
    :data:`TILE_CLASS_COLOURS` ``[k % 2]`` with Gaussian noise; with ``flat=N`` the N tiles lie directly in
    ``root`` (alternating colours, unlabelled), as a tile-SSL source.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)

    def tile(k: int) -> Image.Image:
        img = np.asarray(TILE_CLASS_COLOURS[k % 2], np.float32) + rng.normal(0, noise, (size, size, 3))
        return Image.fromarray(img.clip(0, 255).astype(np.uint8))

    if flat is not None:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(flat):
            tile(i).save(root / f"t{i:03d}.{ext}")
        return root
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class or 0):
            tile(k).save(root / name / f"{i:03d}.{ext}")
    return root


def output_arrays(out: str | os.PathLike, keep=None) -> dict[str, bytes]:  # noqa: ANN001
    """Bytes of every array a command wrote under ``out`` (HDF5 datasets, safetensors tensors, ``.npy``, prediction
    CSVs), keyed by relative path (and dataset / tensor name); ``keep(rel_path)`` filters files. Timestamps and other
    metadata are left out, so two runs of a deterministic command compare equal (tests, reliability benchmark)."""
    import h5py
    from safetensors.numpy import load_file

    out = Path(out)
    got: dict[str, bytes] = {}
    for f in sorted(out.rglob("*")):
        rel = str(f.relative_to(out))
        if not f.is_file() or f.name.startswith(".") or (keep is not None and not keep(rel)):
            continue
        if f.suffix == ".h5":
            with h5py.File(f, "r") as h:
                h.visititems(lambda k, v: got.__setitem__(f"{rel}:{k}", np.asarray(v[()]).tobytes())
                             if isinstance(v, h5py.Dataset) else None)
        elif f.suffix == ".safetensors":
            for k, v in sorted(load_file(str(f)).items()):
                got[f"{rel}:{k}"] = v.tobytes()
        elif f.suffix == ".npy":
            got[rel] = np.load(f).tobytes()
        elif f.suffix == ".csv" and "pred" in f.name:
            got[rel] = f.read_bytes()
    return got


#: ``vit_checkpoint`` layouts: timm's own, facebookresearch/dinov2's release (``-chunked``: blocks grouped as in its
#: training checkpoints), and transformers' Dinov2Model / ViTModel.
VIT_LAYOUTS = ("timm", "dinov2", "dinov2-chunked", "hf-dinov2", "hf-vit")


def vit_checkpoint(model, layout: str) -> dict:  # noqa: ANN001 - a timm VisionTransformer
    """A timm ViT's weights the way another tool saves them, for tests of the loaders (``VIT_LAYOUTS``).

    ``dinov2``: ``mask_token``, ``register_tokens`` and a position embedding that includes the class token (a zero
    row is added for a registers model, whose timm embedding has none). ``hf-dinov2``: that layout with transformers'
    names (q/k/v split, ``layer_scale1.lambda1`` ..., a task model's ``dinov2.`` prefix). ``hf-vit``: ViTModel names
    (``layernorm_before``, ``intermediate.dense``, ``output.dense`` ..., ``vit.`` prefix, a pooler)."""
    import re

    import torch

    if layout not in VIT_LAYOUTS:
        raise ValueError(f"layout must be one of {VIT_LAYOUTS}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "timm":
        return sd
    if layout.startswith("dinov2") or layout == "hf-dinov2":
        sd["mask_token"] = torch.zeros(1, model.embed_dim)
        if "reg_token" in sd:
            sd["register_tokens"] = sd.pop("reg_token")
            sd["pos_embed"] = torch.cat([torch.zeros(1, 1, model.embed_dim), sd["pos_embed"]], dim=1)
        if layout == "dinov2-chunked":
            sd = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", k): v for k, v in sd.items()}
        if layout.startswith("dinov2"):
            return sd
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token", "register_tokens":
           "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings", "norm.weight": "layernorm.weight",
           "norm.bias": "layernorm.bias", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"}
    block = {"attn.proj.": "attention.output.dense.", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1"}
    if layout == "hf-vit":
        block.update({"norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "mlp.fc1.": "intermediate.dense.",
                      "mlp.fc2.": "output.dense."})
    out = {}
    for k, v in sd.items():
        g = re.match(r"blocks\.(\d+)\.(.*)", k)
        if g is None:
            out[top[k]] = v
        elif g.group(2).startswith("attn.qkv."):
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                out[f"encoder.layer.{g.group(1)}.attention.attention.{name}.{g.group(2).rsplit('.', 1)[1]}"] = part
        else:
            rest = next((g.group(2).replace(a, b, 1) for a, b in block.items() if g.group(2).startswith(a)), g.group(2))
            out[f"encoder.layer.{g.group(1)}.{rest}"] = v
    if layout == "hf-vit":
        out["pooler.dense.weight"] = torch.zeros(model.embed_dim, model.embed_dim)
        out["pooler.dense.bias"] = torch.zeros(model.embed_dim)
        return {"vit." + k: v for k, v in out.items()}
    return {"dinov2." + k: v for k, v in out.items()}


def pid_alive(pid: int) -> bool:
    """Process ``pid`` runs (Linux ``/proc``; a zombie or a dead process does not): for tests of worker processes."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False

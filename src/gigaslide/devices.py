"""Where models run: one device choice and one autocast policy for every stage.

Precision names used by every command: ``auto`` (bf16 autocast on CUDA, or fp16 where the GPU has
no bf16; plain fp32 on CPU), ``fp32``, ``bf16`` (autocast; on CPU ~1.3-2x faster here) and ``fp16``.
"""

from __future__ import annotations

import contextlib

import torch

from gigaslide.errors import GigaslideError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The concrete precision (``fp32``/``bf16``/``fp16``) that ``precision`` means on ``device``."""
    if precision not in PRECISIONS:
        raise GigaslideError(f"unknown precision '{precision}'", fix=f"use one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None for plain fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(device, precision)]


def autocast_ctx(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast_ctx", "autocast_dtype", "pick_device", "resolve_precision"]

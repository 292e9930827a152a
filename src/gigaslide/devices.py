"""Where models run: one device choice and one precision policy for every stage.

Precision names used by every command: ``auto``, ``fp32``, ``bf16`` (autocast) and ``fp16``.

``auto`` has one meaning everywhere: **the fastest autocast that stays accurate**. On CUDA that is
bf16 (fp16 where the GPU has no bf16). On CPU it is bf16 only where the CPU computes bf16 natively
(AVX512-BF16 or AMX: :func:`cpu_has_native_bf16`; elsewhere autocast emulates bf16, several times slower
than fp32: ``benchmarks/bench_encode.py`` measures both on the machine it runs on) and a *check* passes: the caller's
``probe`` (a forward pass on its first real batch) gives outputs whose min cosine similarity to the
fp32 outputs is >= :data:`BF16_MIN_COSINE`; without a probe, or when the check fails, CPU runs fp32.
Inference stages (encode, embedding, whole-slide nuclei inference) pass a probe. Training loops do not: a
forward-pass check says nothing about bf16 gradients (DINO with bf16 autocast diverged on CPU here while its
forward passes agreed: wrong weight gradients of a convolution strided past its input, see
:func:`guard_bf16_convs`, which every CNN training loop applies), so on CPU ``auto`` trains in fp32 unless the
caller names a measurement that showed this training loop as good in bf16 per step (``bf16_measured``, e.g.
the tile-SSL methods measured by ``benchmarks/bench_tile_precision.py``) and the CPU computes bf16 natively
(AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32).
:func:`choose_precision` returns a :class:`PrecisionChoice` that every stage records in its
provenance (``precision`` requested, ``resolved``, and the measured ``bf16_cosine``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gigaslide.errors import GigaslideError
from gigaslide.precisions import PRECISIONS

#: bf16 is used on CPU under ``auto`` only when it agrees with fp32 at least this well (min cosine).
BF16_MIN_COSINE = 0.999
#: the ``basis`` of an ``auto`` that stayed fp32 on CPU although bf16 was a candidate
NO_NATIVE_BF16 = "this CPU has no native bf16 (AVX512-BF16 / AMX): emulated bf16 is slower than fp32"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GigaslideError(f"unknown device '{device}'", fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():  # else a torch traceback at the first tensor
        raise GigaslideError(f"device '{device}' asked for, but this machine has no CUDA device",
                             fix="use --device auto or cpu (or run where a GPU is)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GigaslideError(f"device '{device}' asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)", fix="use cuda:0 .. cuda:N-1, or --device auto")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise GigaslideError(f"device '{device}' asked for, but MPS is not available here",
                             fix="use --device auto or cpu")
    return dev


@dataclass(frozen=True)
class PrecisionChoice:
    """What a stage asked for, what it runs, and the evidence (recorded in provenance)."""

    requested: str
    resolved: str  # fp32 | bf16 | fp16
    bf16_cosine: float | None = None
    basis: str | None = None  # for bf16 on CPU without a probe: the measurement it stands on

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise GigaslideError(f"unknown precision '{precision}'", fix=f"use one of: {', '.join(PRECISIONS)}")


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(device: torch.device, *, cores: int | None = None, torch_threads: int | None = None,
                   cpu_most: int = 4, cuda_most: int = 8) -> int:
    """Worker processes that feed a model (data loaders, slide readers): on CUDA the cores but one (at most
    ``cuda_most``); on CPU only the cores the torch threads leave free (at most ``cpu_most``), so 0 -- the
    main process -- when the model uses every core: a worker sharing the model's cores preempts one of its
    OpenMP threads and every parallel region waits for it (measured here, see
    :func:`gigaslide.features.parallel.auto_workers`)."""
    cores = cpu_cores() if cores is None else cores
    if device.type == "cuda":
        return max(1, min(cuda_most, cores - 1))
    threads = torch.get_num_threads() if torch_threads is None else torch_threads
    return max(0, min(cpu_most, cores - threads))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(cpu, name)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes bf16 in hardware (compute capability 8.0 or later, or ROCm).

    Not ``torch.cuda.is_bf16_supported()``: by default it also says True where bf16 is only emulated (V100, T4 ...),
    several times slower than fp16 there, and it asks about the current device rather than ``device``."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(device: torch.device, precision: str = "auto",
                     probe: Callable[[], torch.Tensor] | None = None, *,
                     bf16_measured: str | None = None) -> PrecisionChoice:
    """Resolve ``precision`` on ``device``; on CPU ``auto`` runs ``probe`` in fp32 and bf16 and compares them.

    ``bf16_measured``: for a training loop (no probe), where a measurement showed it as good in bf16 per
    step; on a CPU with native bf16, ``auto`` then resolves to bf16 and records that basis."""
    _check_name(precision)
    if precision != "auto":
        return PrecisionChoice(precision, precision)
    if device.type == "cuda":
        return PrecisionChoice("auto", "bf16" if cuda_has_native_bf16(device) else "fp16")
    if not cpu_has_native_bf16():  # emulated bf16 is slower than fp32: nothing to gain
        return PrecisionChoice("auto", "fp32", basis=NO_NATIVE_BF16 if (probe is not None or bf16_measured) else None)
    if probe is None and bf16_measured:
        return PrecisionChoice("auto", "bf16", basis=bf16_measured)
    if probe is None:
        return PrecisionChoice("auto", "fp32")
    with torch.no_grad():
        a = probe().double().flatten(1)  # float64: a cosine over many values in float32 can exceed 1
        with autocast_ctx(device, "bf16"):
            b = probe().double().flatten(1)
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())
    return PrecisionChoice("auto", "bf16" if cos >= BF16_MIN_COSINE else "fp32", round(cos, 6))


class GuardedConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` that leaves CPU bf16 autocast for the one geometry where PyTorch's CPU kernel computes
    wrong weight gradients: a stride larger than the input's height or width (see :func:`guard_bf16_convs`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_conv_hazard(x, self.stride):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def bf16_conv_hazard(x: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether a convolution of ``x`` with ``stride`` would run in CPU bf16 autocast with a stride larger than
    the input's height or width (wrong weight gradients there, see :func:`guard_bf16_convs`)."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and any(s > n for s, n in zip(stride, x.shape[-2:])))


def guard_bf16_convs(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` of ``model`` a :class:`GuardedConv2d` (same parameters and state-dict
    keys); returns how many. Call it on a model that trains on CPU.

    In bf16 autocast on CPU (torch 2.14.1, oneDNN), a convolution whose stride exceeds its input's height or
    width -- e.g. a ResNet's first stride-2 3x3 convolution of its last stage on a 1x1 map, which a 16-px crop
    gives ResNet-18 -- returns weight gradients with garbage (up to 1e38, or NaN) in the taps that see only
    padding, differently from call to call; the forward pass and the input gradient are right, so a forward
    check cannot see it. A training run then diverges at a random step (``tests/test_devices.py`` shows it on
    the bare kernel). Those convolutions (tiny maps: little compute) run in fp32 instead; every other one
    keeps bf16.
    """
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Conv2d:
            m.__class__ = GuardedConv2d
            n += 1
    return n


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The concrete precision (``fp32``/``bf16``/``fp16``) of ``precision`` on ``device`` without a probe."""
    return choose_precision(device, precision).resolved


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (a name or a resolved choice) on ``device``; None for plain fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(device, precision)]


def grad_scaler(device: torch.device, precision: str = "auto") -> torch.amp.GradScaler:
    """The loss scaler a training loop under ``precision`` needs: on for fp16 autocast (gradients below fp16's
    smallest value, ~6e-8, would flush to zero: ``auto`` is fp16 on GPUs without native bf16), a pass-through
    otherwise (``scale`` returns the loss, ``step`` steps the optimizer). Use ``scaler.scale(loss).backward()``,
    ``scaler.step(opt)``, ``scaler.update()``, and keep ``scaler.state_dict()`` in the checkpoint."""
    fp16 = resolve_precision(device, precision) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=fp16 and device.type in ("cuda", "cpu"))


def autocast_ctx(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = autocast_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    """A human-readable description of ``device`` for run records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


__all__ = ["BF16_MIN_COSINE", "PRECISIONS", "GuardedConv2d", "PrecisionChoice", "autocast_ctx", "autocast_dtype",
           "bf16_conv_hazard", "choose_precision", "cuda_has_native_bf16", "device_name", "grad_scaler",
           "guard_bf16_convs",
           "pick_device", "resolve_precision"]

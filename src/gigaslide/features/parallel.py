"""Slide-parallel encoding: which rank this process is, which device and how many readers it gets, and
in which order it takes slides.

Ranks come from ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or from SLURM
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``); without either the process is rank 0 of
1. No process group is needed: ranks coordinate through per-slide lock files in the output folder
(:mod:`gigaslide.locks`), so a rank that dies only loses its current slide, which the others (or a
re-run) take over. Each rank first takes its own share of a longest-first (LPT) split of the slides
by tile count, then any slide no rank has taken yet, longest first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gigaslide.devices import cpu_cores, loader_workers, pick_device
from gigaslide.errors import GigaslideError

#: Most reader processes per rank on CUDA (beyond this the decoder is rarely the limit).
MAX_GPU_READERS = 16


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    source: str = "single"  # single | torchrun | slurm
    job: str | None = None  # the launcher's id of this job (torchrun's run id, SLURM's job/step/restart), or None


def _job_id(e: Mapping[str, str], source: str) -> str | None:
    """The id every rank of one launch shares and no other launch does: torchrun's ``TORCHELASTIC_RUN_ID`` (not its
    default ``none``), SLURM's job id, step and restart count; None where the launcher gives none."""
    if source == "torchrun":
        run = e.get("TORCHELASTIC_RUN_ID", "").strip()
        return f"torchrun-{run}" if run and run != "none" else None
    if source == "slurm" and e.get("SLURM_JOB_ID", "").strip():
        return "slurm-{}.{}.{}".format(e["SLURM_JOB_ID"].strip(), e.get("SLURM_STEP_ID", e.get("SLURM_STEPID", "")),
                                       e.get("SLURM_RESTART_COUNT", "0"))
    return None


def _env_int(e: Mapping[str, str], name: str, default: int | None = None, *, launcher: str) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty), or a one-line error naming it."""
    raw = str(e.get(name, "")).strip()
    if not raw and default is not None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise GigaslideError(f"environment variable {name}={e.get(name)!r} is not a whole number ({launcher} sets it)",
                             fix=f"unset it to run as one process, or launch with {launcher}") from None


def _checked(info: RankInfo, names: str, launcher: str) -> RankInfo:
    """``info`` when its rank lies in its world (and the local ones too), else a one-line error naming ``names``."""
    if info.world < 1 or not 0 <= info.rank < info.world or info.local_world < 1 \
            or not 0 <= info.local_rank < max(info.local_world, info.world):
        raise GigaslideError(f"environment variables {names} give rank {info.rank} of {info.world} (local rank "
                             f"{info.local_rank} of {info.local_world}): a rank must lie in 0 .. world - 1",
                             fix=f"unset them to run as one process, or launch with {launcher} (which sets them)")
    return info


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank: from torchrun (``RANK`` and ``WORLD_SIZE`` both set), else from SLURM (``SLURM_PROCID``
    set and ``SLURM_NTASKS`` > 1: an interactive ``srun`` shell of one task is one process), else rank 0 of 1. A
    value that is not a whole number, or a rank outside its world, is a one-line error naming the variables."""
    e = os.environ if env is None else env
    if "RANK" in e and "WORLD_SIZE" in e:
        world = _env_int(e, "WORLD_SIZE", launcher="torchrun")
        return _checked(RankInfo(_env_int(e, "RANK", launcher="torchrun"), world,
                                 _env_int(e, "LOCAL_RANK", 0, launcher="torchrun"),
                                 _env_int(e, "LOCAL_WORLD_SIZE", world, launcher="torchrun"), "torchrun",
                                 _job_id(e, "torchrun")),
                        "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE", "torchrun")
    if _env_int(e, "SLURM_NTASKS", 1, launcher="srun") > 1 and "SLURM_PROCID" in e:
        n = _env_int(e, "SLURM_NTASKS", launcher="srun")
        per_node = e.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        return _checked(RankInfo(_env_int(e, "SLURM_PROCID", launcher="srun"), n,
                                 _env_int(e, "SLURM_LOCALID", 0, launcher="srun"),
                                 int(per_node) if per_node.isdigit() else n, "slurm", _job_id(e, "slurm")),
                        "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE", "srun")
    return RankInfo()


def rank_device(device: str, info: RankInfo) -> torch.device:
    """``auto`` on a multi-GPU node gives each local rank its own GPU."""
    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None and device == "auto":
        return torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return dev


def auto_workers(dev: torch.device, info: RankInfo, *, cores: int | None = None, torch_threads: int | None = None) -> int:
    """Reader processes: the node's spare cores per rank on CUDA (at most :data:`MAX_GPU_READERS`); on CPU
    one reader process only when this rank has a core that its torch threads do not use, else 0 (read
    between forward passes, in this process).

    Why 0 on a full CPU: a reader process sharing the model's cores preempts one of its OpenMP threads,
    and every parallel region then waits for the preempted one. On 2 cores with 2 torch threads this
    cost end-to-end encode 20-35 % of the forward-pass rate, against 3-15 % for reading inline, where
    decoding at ~3,000 tiles/s is a few percent of a CPU forward pass (``benchmarks/bench_encode.py``).
    """
    cores = (cpu_cores() // max(1, info.local_world)) if cores is None else cores
    return loader_workers(dev, cores=cores, torch_threads=torch_threads, cpu_most=1, cuda_most=MAX_GPU_READERS)


def lpt_shares(sizes: Sequence[int], world: int) -> list[int]:
    """Rank of each item under longest-processing-time-first assignment (ties: lower index, lower rank)."""
    load = [0] * max(1, world)
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def rank_order(sizes: Sequence[int], info: RankInfo) -> list[int]:
    """Indices in the order this rank tries them: its own LPT share longest first, then the rest longest first."""
    owner = lpt_shares(sizes, info.world)
    longest = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    return [i for i in longest if owner[i] == info.rank] + [i for i in longest if owner[i] != info.rank]


__all__ = ["RankInfo", "auto_workers", "lpt_shares", "rank_device", "rank_info", "rank_order"]

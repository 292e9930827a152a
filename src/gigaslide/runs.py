"""The run layer: one run folder, one identity rule, one checkpoint format for every training loop.

A training loop opens its output folder with :func:`open_run`::

    run = runs.open_run(out, kind="mil", identity={"model": "abmil", "lr": 1e-3, ...},
                        config=asdict(cfg), seed=cfg.seed, inputs={"features": features_dir})
    ck = run.load()                      # None, or the payload of the last checkpoint
    ...
    run.save({"model": runs.module_state(model), "optimizer": opt.state_dict(),
              "rng": runs.rng_state(), "epoch": epoch, "selection": sel.state()})
    run.finish(auc=0.93)

* ``RUN/run.json`` records the command line, the full config, the gigaslide version, the git commit
  when there is one, torch / CUDA versions, host, seed, and **input fingerprints**: for each named
  input its path, file count, total bytes and a content hash (a folder: hash of its listing of
  names and sizes; a file: sha256 of its bytes). The ``identity`` (the options that change results,
  plus the input hashes) decides resumption: a re-run continues only when it matches; otherwise a
  one-line error names the differing key and both values.
* Checkpoints (:func:`save_checkpoint`) are pickle-free: every tensor of the payload goes into one
  ``checkpoint/<name>-<n>.safetensors``, everything else (numbers, strings, optimizer hyper-parameters,
  RNG states) into ``checkpoint/<name>.json``, written last and atomically — a crash or ``kill -9``
  at any point leaves the previous consistent checkpoint. With optimizer and RNG states restored, a
  resumed run continues bit-exactly (tested).
* One process at a time: :func:`open_run` takes a lock on ``RUN/run.lock`` that lasts as long as the
  returned :class:`Run` (the kernel drops it when the process ends, also on ``kill -9``); a second process
  opening the folder meanwhile gets a one-line error naming the holder's pid instead of both writing
  checkpoints there. The same process may open its run again (a notebook resuming after an error).
* :class:`Selection` keeps the best epoch and patience; :class:`Stopper` turns SIGTERM / Ctrl-C and
  a wall-clock ``--budget`` into a clean stop at the end of the current step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from gigaslide import __version__, atomic
from gigaslide.errors import GigaslideError
from gigaslide.files import walk_file_paths
from gigaslide.provenance import Provenance, check_format, file_sha256

RUN_JSON = "run.json"
RUN_LOCK = "run.lock"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = "gigaslide.checkpoint/1"
BUFFER_PREFIX = "buffer::"

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- fingerprints
def _sample_hash(f: str | os.PathLike, size: int, chunk: int = 1 << 16) -> str:
    """sha256 of a file's first and last 64 KiB (the whole file when smaller): cheap, and catches rewrites."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        h.update(fh.read(chunk))
        if size > 2 * chunk:
            fh.seek(size - chunk)
        h.update(fh.read(chunk))
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Path, file count, bytes and content hash of an input file or folder (hidden/temporary files skipped).

    A file is hashed whole; a folder by its listing: each file's relative name, size and the hash of its first
    and last 64 KiB — so a folder whose files are rewritten (e.g. re-encoded features) no longer matches.
    An encode output (``manifest.json`` beside ``features/``) is hashed by its ``features/`` folder, the files
    that are read from it (``gigaslide.features.store.list_feature_files``): its manifest (times, a failed slide
    tried again), locks and overlays change on every re-run that changes no features, and refused to resume a
    training on the same features.
    """
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "files": 1, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
    if not p.is_dir():
        raise GigaslideError("input not found", path=p, fix="check the path")
    if (p / "manifest.json").is_file() and (p / "features").is_dir():
        return {**fingerprint(p / "features"), "path": str(p.resolve()), "hashed": "features/"}
    return _listing(p)


def _listing(p: Path) -> dict[str, Any]:
    """A folder's fingerprint by the listing of all its files (see :func:`fingerprint`)."""
    h = hashlib.sha256()
    n = size = 0
    root = str(p).rstrip(os.sep) + os.sep
    # symlinked sub-folders included (rglob skipped them: their files were not fingerprinted); plain strings, not a
    # Path per file: a folder of a million tiles is fingerprinted on every start and resume
    for f in walk_file_paths(p):
        rel = f[len(root):] if f.startswith(root) else os.path.relpath(f, p)
        if any(part.startswith(".") for part in rel.split(os.sep)):
            continue
        s = os.stat(f).st_size
        h.update(f"{rel.replace(os.sep, '/')}\0{s}\0{_sample_hash(f, s)}\n".encode())
        n, size = n + 1, size + s
    return {"path": str(p.resolve()), "files": n, "bytes": size, "listing_sha256": h.hexdigest()}


def _content_key(fp: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint that identifies content (the path may move)."""
    return {k: fp[k] for k in ("files", "bytes", "sha256", "listing_sha256") if k in fp}


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """The commit of the gigaslide checkout this module runs from; None where it is not one (an installed package,
    also inside another project's repository -- e.g. its ``.venv`` --, whose commit is not gigaslide's)."""
    here = Path(__file__).resolve()
    with contextlib.suppress(Exception):
        tracked = subprocess.run(["git", "-C", str(here.parent), "ls-files", "--error-unmatch", "--", here.name],
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:  # this file is no file of the repository around it
            return None
        out = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    return None


def environment() -> dict[str, Any]:
    """Versions and machine of this process (for run records)."""
    return {"gigaslide": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}


# --------------------------------------------------------------------------- identity
def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf whose value differs (nested keys dot-joined; a missing key counts as None)."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True):
            out.append((k, a.get(k), b.get(k)))
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_identity(run_dir: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    diff = identity_diff(old, new)
    if diff:
        k, a, b = diff[0]
        more = f" and {len(diff) - 1} more" if len(diff) > 1 else ""
        raise GigaslideError(f"run folder holds another run ({k}: {_short(a)} -> {_short(b)}{more})", path=run_dir,
                             fix="repeat the original options to resume, or choose a new --out")


# --------------------------------------------------------------------------- checkpoints
def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.array(obj, order="C", copy=True))  # (ascontiguousarray makes 0-d 1-d)
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint payload cannot hold {type(obj).__name__}")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj and len(obj) == 1:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj and len(obj) == 1:
            return tensors[obj["__ndarray__"]].numpy()
        if "__float__" in obj and len(obj) == 1:
            return float(obj["__float__"])
        if "__tuple__" in obj and len(obj) == 1:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj and len(obj) == 1:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def save_checkpoint(run_dir: str | os.PathLike, payload: Mapping[str, Any], name: str = "last") -> Path:
    """Write ``payload`` (nested dicts/lists of tensors, arrays, numbers, strings) as checkpoint ``name``."""
    from safetensors.torch import save_file

    d = atomic.ensure_writable_dir(checkpoint_dir(run_dir))
    tensors: dict[str, torch.Tensor] = {}
    flat = _flatten(dict(payload), tensors)
    prev = read_checkpoint_record(run_dir, name)
    n = int(prev.get("n", 0)) + 1 if prev else 1
    tensor_file = f"{name}-{n:08d}.safetensors"
    with atomic.atomic_path(d / tensor_file, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    atomic.write_json(d / f"{name}.json", {"format": CHECKPOINT_FORMAT, "n": n, "tensors": tensor_file,
                                          "saved": time.time(), "payload": flat})
    own = re.compile(re.escape(name) + r"-\d+\.safetensors")  # not "<name>-ema-1.safetensors" of checkpoint <name>-ema
    for f in d.glob(f"{glob.escape(name)}-*.safetensors"):  # superseded tensor files
        if f.name != tensor_file and own.fullmatch(f.name):
            with contextlib.suppress(OSError):
                f.unlink()
    return d / f"{name}.json"


def read_checkpoint_record(run_dir: str | os.PathLike, name: str = "last") -> dict[str, Any] | None:
    f = checkpoint_dir(run_dir) / f"{name}.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
        if rec.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {rec.get('format')!r}")
        return rec
    except (OSError, ValueError, AttributeError) as e:
        raise GigaslideError(f"checkpoint is damaged or not a gigaslide checkpoint ({e})", path=f,
                             fix="delete RUN/checkpoint to start this run over, or use a new --out") from None


def load_checkpoint(run_dir: str | os.PathLike, name: str = "last") -> dict[str, Any] | None:
    """The payload saved by :func:`save_checkpoint` (tensors on CPU), or None when there is none."""
    from safetensors.torch import load_file

    rec = read_checkpoint_record(run_dir, name)
    if rec is None:
        return None
    tf = checkpoint_dir(run_dir) / rec["tensors"]
    try:
        tensors = load_file(str(tf), device="cpu")
    except Exception as e:  # noqa: BLE001 - any damage: name the file
        raise GigaslideError(f"checkpoint tensors are damaged ({str(e).splitlines()[0][:120]})", path=tf,
                             fix="delete RUN/checkpoint to start this run over, or use a new --out") from None
    try:
        return _unflatten(rec["payload"], tensors)
    except KeyError as e:
        raise GigaslideError(f"checkpoint tensors do not match its record (missing {e})", path=tf,
                             fix="delete RUN/checkpoint to start this run over, or use a new --out") from None


def module_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` plus non-persistent buffers (e.g. a MoCo queue) under ``buffer::<name>``."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, b in model.named_buffers():
        if name not in sd and b is not None:
            sd[BUFFER_PREFIX + name] = b.detach()
    return sd


def load_module_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str | os.PathLike,
                      fix: str = "resume with the same options, or use a new --out") -> None:
    """Load :func:`module_state` output into ``model`` (strict); a mismatch is a one-line error naming ``source``."""
    buffers = {k[len(BUFFER_PREFIX):]: v for k, v in sd.items() if k.startswith(BUFFER_PREFIX)}
    params = {k: v for k, v in sd.items() if not k.startswith(BUFFER_PREFIX)}
    try:
        model.load_state_dict(params, strict=True)
    except RuntimeError as e:
        raise GigaslideError(f"checkpoint does not fit this model ({str(e).splitlines()[0][:160]})", path=source,
                             fix=fix) from None
    named = dict(model.named_buffers())
    for name, v in buffers.items():
        if name in named:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if named[name].shape == v.shape:
                named[name].copy_(v)
            else:
                setattr(mod, attr, v.to(named[name].device))


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and CUDA RNG states."""
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


@contextlib.contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block on its own Python / NumPy (global) / torch RNG streams, seeded with ``seed`` (as
    ``random.seed``, ``np.random.seed`` and ``torch.manual_seed`` would), and give the caller's streams back
    afterwards, also on an exception: a library call that trains or draws with a seed must neither reset nor consume
    the random state of the notebook or script that called it. ``seed=None`` only isolates."""
    saved = rng_state()
    try:
        if seed is not None:
            random.seed(int(seed))
            np.random.seed(int(seed) % 2**32)
            torch.manual_seed(int(seed))
        yield
    finally:
        set_rng_state(saved)


def keeps_caller_rng(fn: F) -> F:
    """Decorator: ``fn`` runs inside :func:`isolated_rng` (isolation only; the function seeds what it draws)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with isolated_rng():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --------------------------------------------------------------------------- selection and stopping
@dataclass
class Selection:
    """Best-epoch selection with patience: ``improved = sel.update(value, epoch)``; ``sel.stop``.

    ``value`` is a number or a tuple compared lexicographically (e.g. ``(auc, -loss)``: AUC, ties broken
    by loss); ``mode`` says whether larger (``max``) or smaller (``min``) is better. Non-finite values
    never count as an improvement.
    """

    mode: str = "min"
    patience: int | None = None
    best: float | list[float] | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def update(self, value: float | tuple[float, ...], epoch: int) -> bool:
        key = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else (float(value),)
        if not all(math.isfinite(v) for v in key):
            self.bad_epochs += 1
            return False
        old = None if self.best is None else (tuple(self.best) if isinstance(self.best, list) else (self.best,))
        better = old is None or (key < old if self.mode == "min" else key > old)
        if better:
            self.best = list(key) if len(key) > 1 else key[0]
            self.best_epoch, self.bad_epochs = int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, st: Mapping[str, Any]) -> Selection:
        return cls(**st)


class Stopper:
    """Clean stop: SIGTERM or Ctrl-C (a second Ctrl-C interrupts at once) or an elapsed ``budget_s``.

    ``elapsed`` continues from ``elapsed_s`` (the time already spent by earlier invocations of a run).
    """

    def __init__(self, budget_s: float | None = None, elapsed_s: float = 0.0):
        self.budget_s, self.elapsed0 = budget_s, float(elapsed_s)
        self.requested: str | None = None
        self._t0 = time.monotonic()
        self._old: dict[int, Any] = {}

    @property
    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self._t0

    def reason(self) -> str | None:
        """Why to stop now (``signal`` / ``interrupt`` / ``budget``), or None."""
        if self.requested:
            return self.requested
        if self.budget_s is not None and self.elapsed >= self.budget_s:
            return "budget"
        return None

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if signum == signal.SIGINT:
            if self.requested == "interrupt":
                raise KeyboardInterrupt
            self.requested = "interrupt"
            print("stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)
        else:
            self.requested = "signal"

    def __enter__(self) -> Stopper:
        self._t0 = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def parse_duration(text: str | float | int | None) -> float | None:
    """``2h``, ``15m``, ``90s``, ``1h30m`` or plain seconds -> seconds (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().lower()
        try:
            value = float(s)
        except ValueError:
            pat = r"(\d+(?:\.\d+)?)\s*(d|h|m|s)"
            parts = re.findall(pat, s)
            if not parts or re.sub(pat, "", s).strip():
                raise GigaslideError(f"cannot read duration '{text}'", fix="use e.g. 2h, 15m, 90s or 1h30m") from None
            value = sum(float(v) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for v, u in parts)
    if not math.isfinite(value) or value <= 0:
        raise GigaslideError(f"duration '{text}' must be a positive time", fix="use e.g. 2h, 15m, 90s or 1h30m")
    return value


#: Exit status of a command whose training a signal stopped (checkpoint saved; :meth:`Stopper.reason`): Ctrl-C 130,
#: SIGTERM (a batch system's limit) 143, as a shell reports them -- a script must not go on as if it had finished
#: (``pretrain && embed-tiles``). A ``--budget`` stop is a success (0).
STOP_EXIT_STATUS = {"interrupt": 130, "signal": 143}


# --------------------------------------------------------------------------- the run folder
@dataclass
class Run:
    """An open run folder (see :func:`open_run`)."""

    dir: Path
    kind: str
    identity: dict[str, Any]
    record: dict[str, Any]
    resumed: bool

    def save(self, payload: Mapping[str, Any], name: str = "last") -> Path:
        return save_checkpoint(self.dir, payload, name)

    def load(self, name: str = "last") -> dict[str, Any] | None:
        return load_checkpoint(self.dir, name)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into ``run.json`` (atomically)."""
        self.record.update(_jsonable(fields))
        atomic.write_json(self.dir / RUN_JSON, self.record)

    def finish(self, **summary: Any) -> dict[str, Any]:
        """Mark the run finished with ``summary`` in ``run.json``; returns the record."""
        self.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary)
        return self.record


#: run folders this process holds: resolved path -> [lock fd, open Run objects]
_HELD: dict[str, list[int]] = {}


def _lock_run_dir(run_dir: Path) -> str:
    """Hold ``run_dir`` for this process (a ``lockf`` lock on RUN/run.lock), or a one-line error naming the
    process that holds it. Returns the key to :func:`_unlock_run_dir` with. File systems without locks run
    unlocked."""
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    path = run_dir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:  # a POSIX record lock, not flock: forked children (DataLoader workers) do not inherit it, so a resume
        # right after a kill -9 is not refused while orphaned workers wind down
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)  # no locks on this file system (ENOLCK, ENOTSUP): as before, unguarded
            return ""
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise GigaslideError(f"the run folder is in use by {holder}: two processes would write one run", path=run_dir,
                             fix="wait for it to finish (or stop it), then re-run to resume; or choose another --out"
                             ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return key


def _unlock_run_dir(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.close(held[0])


def read_run(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    f = Path(run_dir) / RUN_JSON
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GigaslideError(f"run.json is damaged ({e})", path=f,
                             fix="delete the run folder to start over, or use a new --out") from None
    if isinstance(rec, dict) and isinstance(rec.get("provenance"), dict):
        check_format(rec["provenance"], f)
    return rec


def open_run(out: str | os.PathLike, kind: str, identity: Mapping[str, Any], config: Mapping[str, Any] | None = None,
             *, seed: int | None = None, inputs: Mapping[str, str | os.PathLike | None] | None = None,
             provenance: Mapping[str, Any] | None = None, caches: Sequence[str] = ()) -> Run:
    """Create or resume the run folder ``out`` for a ``kind`` of training.

    ``identity``: the options that must match to resume; ``inputs``: named input paths, fingerprinted,
    whose *content* joins the identity (moving a data folder is fine, changing it is refused);
    ``provenance``: facts of the run's artifacts (mpp, tile size, encoder, weights hash) for run.json.

    A run of the same kind that stopped before it wrote anything -- the folder holds only run.json, its lock,
    killed writes' temporaries and the sub-folders named in ``caches`` (content-keyed caches, valid for any run) --
    is replaced by a run of another identity instead of refused: the usual case is a run refused by an input check
    after run.json was written, whose fix (another option, a corrected input) must be able to run on the same --out.
    """
    run_dir = atomic.ensure_writable_dir(out)
    key = _lock_run_dir(run_dir)  # before anything is cleaned or read: another live process may be writing
    try:
        run = _open_locked(run_dir, kind, identity, config, seed=seed, inputs=inputs, provenance=provenance,
                           caches=tuple(caches))
    except BaseException:
        _unlock_run_dir(key)
        raise
    if key:
        weakref.finalize(run, _unlock_run_dir, key)
    return run


def _holds_results(run_dir: Path, caches: tuple[str, ...]) -> bool:
    """``run_dir`` holds a file other than run.json, its lock and killed writes' temporaries outside ``caches``."""
    for root, dirs, files in os.walk(run_dir):
        if Path(root) == run_dir:
            dirs[:] = [d for d in dirs if d not in caches]
        for f in files:
            if f.startswith(atomic.TMP_PREFIX) or (Path(root) == run_dir and f in (RUN_JSON, RUN_LOCK)):
                continue
            return True
    return False


def _open_locked(run_dir: Path, kind: str, identity: Mapping[str, Any], config: Mapping[str, Any] | None, *,
                 seed: int | None, inputs: Mapping[str, str | os.PathLike | None] | None,
                 provenance: Mapping[str, Any] | None, caches: tuple[str, ...] = ()) -> Run:
    atomic.clean_stale_tmp(run_dir)
    atomic.clean_stale_tmp(checkpoint_dir(run_dir))
    fps = {k: fingerprint(v) for k, v in (inputs or {}).items() if v is not None}
    ident = _jsonable({**identity, **{f"input:{k}": _content_key(fp) for k, fp in fps.items()}})
    old, replaced = read_run(run_dir), None
    if old is not None:
        if old.get("run_kind") != kind:
            raise GigaslideError(f"run folder holds a run of another kind ({old.get('run_kind')!r}, not {kind!r})",
                                 path=run_dir, fix="choose a new --out")
        for k, fp in fps.items():  # a run recorded before encode outputs were hashed by their features/ alone
            key, was = f"input:{k}", old.get("identity", {}).get(f"input:{k}")
            if fp.get("hashed") == "features/" and was is not None and was != ident[key] \
                    and _jsonable(_content_key(_listing(Path(inputs[k])))) == was:  # type: ignore[index]
                ident[key] = was
        if old.get("status") != "finished" and identity_diff(old.get("identity", {}), ident) \
                and not _holds_results(run_dir, caches):  # stopped before writing anything: nothing to resume
            replaced = old
        else:
            check_identity(run_dir, old.get("identity", {}), ident)
    prov = Provenance(kind="run", seed=seed, **{k: v for k, v in (provenance or {}).items()
                                                if k in ("mpp", "tile_size", "encoder", "encoder_weights_sha256")},
                      extra={k: v for k, v in (provenance or {}).items()
                             if k not in ("mpp", "tile_size", "encoder", "encoder_weights_sha256")})
    record = dict(old or {})
    invocations = list(record.get("invocations", []))
    if replaced is not None:  # a fresh run (its own provenance, nothing resumed); the record keeps what it replaced
        record, old = {"replaced_identity": replaced.get("identity", {})}, None
    invocations.append({"command": list(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "environment": environment()})
    record.update(_jsonable({
        "run_kind": kind, "status": "running", "identity": ident, "config": dict(config or {}), "seed": seed,
        "inputs": fps, "provenance": prov.to_dict() if old is None else record.get("provenance", prov.to_dict()),
        "invocations": invocations[-20:],
    }))
    atomic.write_json(run_dir / RUN_JSON, record)
    return Run(run_dir, kind, ident, record, resumed=old is not None)


__all__ = ["STOP_EXIT_STATUS", "Run", "Selection", "Stopper", "check_identity", "checkpoint_dir", "environment",
           "file_sha256", "fingerprint", "identity_diff", "load_checkpoint", "load_module_state", "module_state", "open_run",
           "parse_duration", "read_run", "rng_state", "save_checkpoint", "set_rng_state"]

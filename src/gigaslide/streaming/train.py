"""StreamingCLAM training (Dooper et al. 2023): whole-slide canvases, streamed trunk, max-pool, CLAM head.

One fold (:func:`train_fold`): the trunk is frozen for ``freeze_epochs`` epochs (head only, no trunk
backward) and then trained end to end; checkpoint selection and patience (:class:`gigaslide.runs.Selection`
on the validation loss) start when the trunk unfreezes, so the kept model is trained end to end; one
slide per step with gradient accumulation; AMP on CUDA (bf16, else fp16 with a grad scaler), bf16 on
CPU only when :func:`gigaslide.devices.choose_precision` finds it accurate. The run layer
(:mod:`gigaslide.runs`) checkpoints model, optimizer, scaler and every RNG after each epoch (and at the
optimizer step where a SIGTERM / Ctrl-C / ``--budget`` stops the run), so a resumed run -- also after
``kill -9`` -- continues bit-exactly. Cross-validation: :mod:`gigaslide.streaming.cv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gigaslide import atomic, runs
from gigaslide.errors import GigaslideError, check_finite_weights
from gigaslide.streaming.data import Augment, AugmentedImage, Canvas, Normalize
from gigaslide.streaming.head import StreamingMIL, build_trunk
from gigaslide.streaming.stream import StreamingCNN

#: Settings that change memory or speed only: a run may resume with other values (kept out of the identity).
MEMORY_ONLY = ("device", "checkpoint_blocks", "trim_memory", "budget")


@dataclass
class TrainConfig:
    """Defaults are the paper's scale (Dooper et al. 2023 and the authors' reference implementation,
    DIAGNijmegen/pathology-streamingclam: ResNet-34, max-pool 8, tile 3200, unfreeze at epoch 15,
    lr 1e-3, accumulation 4, mixed precision) -- a GPU setting. A CPU-sized example is in the README."""

    mpp: float = 0.5
    image_size: int = 65536
    tile_size: int = 3200
    encoder: str = "resnet34"
    weights: str = "default"  # registry/export weights; "random" for tests and benchmarks; or a file
    head: str = "clam_sb"
    pool_kernel: int = 8
    folds: int = 5
    epochs: int = 100
    freeze_epochs: int = 15
    lr: float = 1e-3
    trunk_lr: float = 1e-3
    weight_decay: float = 1e-4
    accumulate: int = 4
    instance_weight: float = 0.3
    patience: int = 10
    val_fraction: float = 0.2
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"
    slide_mpp: float | str | None = None  # level-0 µm/px of every slide, or a CSV slide_id,mpp (those it lists)
    checkpoint_blocks: bool = True  # recompute block activations in backward: lower memory per tile
    trim_memory: bool = True  # return freed tile buffers to the OS at once (glibc): peak RSS tracks live tensors
    budget: str | None = None  # wall-clock budget (e.g. 12h): a clean stop, resumed by re-running


def build_model(cfg: TrainConfig, n_classes: int, device: torch.device) -> StreamingMIL:
    """The streamed trunk (from the encoder registry, seeded) + head; ``model.spec`` is the encoder spec.

    Seeds torch's global RNG with ``cfg.seed`` (the initialisation and the training stream that follows it come from
    the seed, whatever the encoder builder does with the global stream): callers keep theirs with
    :func:`gigaslide.runs.isolated_rng`."""
    torch.manual_seed(cfg.seed)
    trunk, spec, weights_id = build_trunk(cfg.encoder, cfg.weights, seed=cfg.seed)
    stream = StreamingCNN(trunk, cfg.tile_size, transform=Normalize(spec.mean, spec.std), channels_last=True,
                          checkpoint_blocks=cfg.checkpoint_blocks, trim_memory=cfg.trim_memory,
                          pool_kernel=cfg.pool_kernel)
    model = StreamingMIL(stream, cfg.head, n_classes).to(device)
    trunk.to(memory_format=torch.channels_last)
    model.spec, model.weights_id = spec, weights_id
    return model


def step_loss(model: StreamingMIL, canvas: Canvas, label: int, cfg: TrainConfig, device: torch.device,
              dtype: torch.dtype | None, aug: Augment | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and class probabilities of one slide (augmented when ``aug`` is given); the canvas is held once."""
    image = AugmentedImage(canvas.pixels(), aug)  # flips / rot90 per crop: no second full-size copy
    model.stream.transform = Normalize(model.spec.mean, model.spec.std, aug)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(image, label if model.training else None)
    logits = out["logits"].float().reshape(1, -1)
    loss = F.cross_entropy(logits, torch.tensor([label], device=device))
    if model.training and "instance_loss" in out:
        loss = (1 - cfg.instance_weight) * loss + cfg.instance_weight * out["instance_loss"].float()
    return loss, torch.softmax(logits.detach(), -1)[0].cpu()


def evaluate(model: StreamingMIL, canvases: list[Canvas], labels: list[int], cfg: TrainConfig, device: torch.device,
             dtype: torch.dtype | None) -> tuple[float, np.ndarray]:
    model.eval()
    losses, probs = [], []
    with torch.no_grad():
        for c, y in zip(canvases, labels):
            loss, p = step_loss(model, c, y, cfg, device, dtype, None)
            losses.append(float(loss.detach()))
            probs.append(p.numpy())
    return float(np.mean(losses)) if losses else float("nan"), np.asarray(probs)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic.atomic_path(path, suffix=".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "gigaslide.streaming"})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:  # a damaged or truncated file: a SafetensorError traceback
        raise GigaslideError(f"unreadable weights ({str(e).splitlines()[0][:120]})", path=path,
                             fix="train this fold again into a new --out (or pass another --fold)") from None
    runs.load_module_state(model, sd, path)


def _check_finite(value: float, at: str, run_dir: Path, dtype: torch.dtype | None, what: str = "") -> None:
    """Stop a fold whose loss (or weights) became NaN/inf, before it is back-propagated or saved: a diverged model
    never recovers, and its epochs went on printing 'train nan' until a traceback (no best checkpoint to test)."""
    if math.isfinite(value):
        return
    raise GigaslideError(f"{what or f'the loss became {value}'} at {at}: {DIVERGED}", path=run_dir,
                         fix=_diverged_fix(dtype))


#: what a stop for NaN/inf (loss or weights) says happened
DIVERGED = "training diverged; the checkpoints kept hold no NaN weights"


def _diverged_fix(dtype: torch.dtype | None) -> str:
    fix = "train with a lower --lr / --trunk-lr (e.g. 10x lower) into a new --out (they are part of the run)"
    if dtype is torch.float16:
        fix += ", or with --precision bf16 / fp32 (fp16 activations overflow)"
    return fix


def train_fold(run: runs.Run, fold: int, model: StreamingMIL, train: list[tuple[Canvas, int]],
               val: list[tuple[Canvas, int]], cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
               stopper: runs.Stopper, log: Any = print) -> dict[str, Any]:
    """Train fold ``fold`` (checkpoint ``fold<k>`` in the run; best weights in ``fold<k>/best.safetensors``).

    Returns the fold state: ``{"epoch", "selection", "history", "stopped": reason or None}``."""
    fold_dir = atomic.ensure_writable_dir(run.dir / f"fold{fold}")
    opt = torch.optim.AdamW([{"params": model.head_parameters(), "lr": cfg.lr},
                             {"params": model.trunk_parameters(), "lr": cfg.trunk_lr}], weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16 and device.type == "cuda")
    rng = np.random.default_rng([cfg.seed, fold])
    sel = runs.Selection("min", cfg.patience)
    st: dict[str, Any] = {"epoch": 0, "pos": 0, "order": None, "losses": [], "history": []}
    ck = run.load(f"fold{fold}")
    if ck is not None:
        runs.load_module_state(model, ck["model"], run.dir)
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        runs.set_rng_state(ck["rng"])
        rng.bit_generator.state = ck["gen"]
        sel = runs.Selection.from_state(ck["selection"])
        st = {k: ck[k] for k in st}
        log(f"  resuming at epoch {st['epoch']}" + (f", slide {st['pos']}" if st["pos"] else ""))

    def save(at: str) -> None:
        check_finite_weights(model, f"fold {fold}, {at}", run.dir, then=DIVERGED, fix=_diverged_fix(dtype))
        run.save({"model": runs.module_state(model), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                  "rng": runs.rng_state(), "gen": rng.bit_generator.state, "selection": sel.state(), **st},
                 name=f"fold{fold}")

    while st["epoch"] < cfg.epochs and not sel.stop:
        epoch = st["epoch"]
        frozen = epoch < cfg.freeze_epochs
        for p in model.trunk_parameters():
            p.requires_grad_(not frozen)
        model.train()
        if st["order"] is None:
            st.update(order=rng.permutation(len(train)), pos=0, losses=[])
        order = st["order"]
        opt.zero_grad(set_to_none=True)
        for i in range(st["pos"], len(order)):
            c, y = train[int(order[i])]
            loss, _ = step_loss(model, c, y, cfg, device, dtype, Augment.draw(rng))
            value = float(loss.detach())
            _check_finite(value, f"fold {fold}, epoch {epoch}, slide {c.slide_id}", run.dir, dtype)  # before backward
            scaler.scale(loss / cfg.accumulate).backward()
            st["losses"].append(value)
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(order):
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                st["pos"] = i + 1
                if i + 1 < len(order) and stopper.reason():  # a clean stop at an optimizer step
                    save(f"epoch {epoch}, the optimizer step after slide {c.slide_id}")
                    return {**st, "selection": sel.state(), "stopped": stopper.reason()}
        val_loss, _ = (evaluate(model, [c for c, _ in val], [y for _, y in val], cfg, device, dtype) if val
                       else (float(np.mean(st["losses"])), None))
        _check_finite(val_loss, f"fold {fold}, epoch {epoch}, on the validation slides", run.dir, dtype)
        # the frozen epochs warm the head up: selection and patience start once the trunk trains,
        # so the model kept is trained end to end (unless the trunk never unfreezes)
        selecting = not frozen or cfg.freeze_epochs >= cfg.epochs
        improved = selecting and sel.update(val_loss, epoch)
        if improved:
            save_weights(model, fold_dir / "best.safetensors")
        train_loss = float(np.mean(st["losses"]))
        st["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "trunk_frozen": frozen})
        st.update(epoch=epoch + 1, order=None, pos=0, losses=[])
        save(f"the end of epoch {epoch}")
        # without validation slides the loss selected on is the training loss: said so, not printed as 'val'
        shown = f"val {val_loss:.4f}" if val else "(no val slides: selected on it)"
        log(f"  epoch {epoch}: train {train_loss:.4f} {shown}{' *' if improved else ''}"
            f"{' (trunk frozen)' if frozen else ''}")
        if stopper.reason() and (st["epoch"] < cfg.epochs and not sel.stop):
            return {**st, "selection": sel.state(), "stopped": stopper.reason()}
    return {**st, "selection": sel.state(), "stopped": None}

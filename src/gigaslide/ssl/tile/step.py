"""What every tile-SSL engine shares: the model, its parameter groups, the lr schedule, one training step
and the step plan of a ``--budget``.

:func:`train_step` is the one optimisation step of both the native loop (:mod:`.train`) and the
Lightning wrapper (:mod:`.lightning`): lr of each group (``lr_scale``: layer decay and the patch
embedding's multiplier), the method's loss under the run's autocast, the non-finite-loss guard,
backward through the AMP scaler, gradient clipping (a non-finite gradient norm stops the run before the weights
change, unless fp16's scaler skips the step), the method's gradient surgery and momentum updates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from gigaslide.devices import autocast_ctx, guard_bf16_convs
from gigaslide.encoders import create_trunk, trunk_width, with_embed_dim
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.ssl.tile.config import PretrainConfig
from gigaslide.ssl.tile.init import load_init_weights, patch_size_of, run_spec
from gigaslide.ssl.tile.methods import SSL_METHODS

CLIP_GRAD_NORM = 3.0


def build_model(cfg: PretrainConfig, *, load: bool = True):  # noqa: ANN201
    """(method module, export spec, init source or None); ``load=False`` skips ``--init`` (a checkpoint follows)."""
    cls = SSL_METHODS.get(cfg.method)
    spec = run_spec(cfg.backbone, cfg.method, cfg.tile_size, cfg.mpp, cfg.augment)
    torch.manual_seed(cfg.seed)
    build_spec = spec
    if spec.family == "vit" and cfg.drop_path:
        build_spec = dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, "drop_path_rate": float(cfg.drop_path)})
    trunk = create_trunk(build_spec)
    spec = with_embed_dim(spec, trunk)  # the exported encoder's size (pool included); the heads take the trunk's width
    source, mask_token = load_init_weights(trunk, spec, cfg.init, cfg.backbone) if (cfg.init and load) else (None, None)
    model = cls(trunk, trunk_width(trunk, spec.input_size), spec.mean, spec.std, channels_last=spec.family == "cnn",
                **cfg.method_args)
    own = getattr(model, "mask_token", None)
    if mask_token is not None and isinstance(own, torch.nn.Parameter) and own.shape == mask_token.shape:
        with torch.no_grad():  # DINOv2 continued from a release: its trained mask token, not a zero one (Roth et al.)
            own.copy_(mask_token)
    if spec.family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    guard_bf16_convs(model)  # small crops: CPU bf16 weight gradients of a conv strided past its input are wrong
    return model, spec, source


def trunk_patch_size(model: torch.nn.Module) -> int | None:
    """The ViT patch size read from the trunk (``patch_embed.patch_size``); None for CNNs."""
    return patch_size_of(model.backbone)


_VIT_STEM = ("cls_token", "pos_embed", "patch_embed.", "mask_token")  # DINOv2's layer 0 (register tokens are not)


def _vit_layer_scales(trunk: torch.nn.Module, decay: float) -> dict[int, float] | None:
    """{id(param): lr scale} of a ViT trunk by DINOv2's rule (``get_vit_lr_decay_rate``; BEiT's): the embeddings
    (patch, position, class token) are layer 0, ``blocks.i`` layer i + 1, the rest (final norm; register tokens,
    as in DINOv2's code) layer L + 1; scale ``decay ** (L + 1 - layer)``. (timm's ``param_groups_layer_decay`` on
    a headless trunk puts the final norm in the last block's layer, so every layer got one ``decay`` factor less
    than DINOv2's: the last block at the full lr.) None for trunks without ``blocks`` and ``patch_embed`` (CNNs:
    timm's grouping)."""
    blocks = getattr(trunk, "blocks", None)
    if blocks is None or not hasattr(trunk, "patch_embed"):
        return None
    n = len(blocks)
    out = {}
    for name, p in trunk.named_parameters():
        if name.startswith(_VIT_STEM):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = n + 1
        out[id(p)] = decay ** (n + 1 - layer)
    return out


def param_groups(model, cfg: PretrainConfig, family: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """Trunk groups (layer-wise lr decay: DINOv2's layers for ViTs (:func:`_vit_layer_scales`), timm's otherwise;
    no weight decay on norms/biases; the patch embedding's own ``lr_scale`` times ``cfg.patch_embed_lr_mult``)
    + a method's mask token at layer 0's scale (DINOv2) + head groups. Every group has ``lr_scale``."""
    ld = 1.0 if cfg.layer_decay is None else float(cfg.layer_decay)
    wd = 0.0 if cfg.weight_decay is None else float(cfg.weight_decay)
    trunk = model.backbone
    vit_scales = _vit_layer_scales(trunk, ld) if ld < 1.0 else None
    if vit_scales is not None:  # split timm's weight-decay groups by DINOv2's layer scales
        groups = []
        for g in param_groups_weight_decay(trunk, weight_decay=wd):
            for scale in sorted({vit_scales[id(p)] for p in g["params"]}):
                groups.append({**g, "params": [p for p in g["params"] if vit_scales[id(p)] == scale],
                               "lr_scale": scale})
    elif ld < 1.0 and hasattr(trunk, "group_matcher"):
        groups = param_groups_layer_decay(trunk, weight_decay=wd, layer_decay=ld)
    else:
        groups = param_groups_weight_decay(trunk, weight_decay=wd)
    groups = [{**g, "lr_scale": g.get("lr_scale", 1.0)} for g in groups]
    # the embedding layer's scale (layer 0 of the decay), before the patch embedding's own multiplier
    pe_first = next((p for n, p in trunk.named_parameters() if n.startswith("patch_embed.")), None)
    stem_scale = next((g["lr_scale"] for g in groups if any(p is pe_first for p in g["params"])), 1.0)
    mult = 1.0 if cfg.patch_embed_lr_mult is None else float(cfg.patch_embed_lr_mult)
    if mult != 1.0:
        pe = {id(p) for n, p in trunk.named_parameters() if n.startswith("patch_embed.")}
        split = []
        for g in groups:
            inside = [p for p in g["params"] if id(p) in pe]
            rest = [p for p in g["params"] if id(p) not in pe]
            split.append({**g, "params": rest})
            if inside:
                split.append({**g, "params": inside, "lr_scale": g["lr_scale"] * mult})
        groups = split
    heads = model.head_parameters()
    # DINOv2's mask token is an input embedding of the student trunk: DINOv2 (get_vit_lr_decay_rate) puts it in
    # layer 0 with the patch embedding, positions and class token, so it gets their decayed lr, not the heads'
    token = getattr(model, "mask_token", None)
    if isinstance(token, torch.nn.Parameter) and token.requires_grad and any(p is token for p in heads):
        heads = [p for p in heads if p is not token]
        groups.append({"params": [token], "weight_decay": wd, "lr_scale": stem_scale})
    groups += [{"params": [p for p in heads if p.ndim > 1], "weight_decay": wd, "lr_scale": 1.0},
               {"params": [p for p in heads if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def lr_at(progress: float, base: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the run, then cosine to 1 % of ``base``."""
    if progress < warmup:
        return base * progress / warmup
    p = (progress - warmup) / max(1e-8, 1 - warmup)
    return base * (0.5 * (1 + math.cos(math.pi * min(p, 1.0))) * 0.99 + 0.01)


def check_finite_gradient(norm: torch.Tensor, at: str, loss: torch.Tensor, run_dir: Any) -> None:
    """Stop before the optimiser step when the gradient norm is NaN/inf although the loss was finite: clipping
    would spread the NaN to every gradient, the step to every weight, and the next checkpoint and the export
    would hold NaN weights (the loss guard only sees it one step later, after they were saved)."""
    value = float(norm)
    if not math.isfinite(value):
        raise GigaslideError(f"the gradients became {value} at {at} (loss {float(loss.detach()):.5g}); "
                             "the weights were not updated", path=run_dir,
                             fix="lower --lr or use --precision fp32; the last good checkpoint is kept and a re-run "
                                 "resumes from it")


def train_step(model: torch.nn.Module, batch: list[torch.Tensor], opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, step: int, progress: float, *, base_lr: float, warmup_frac: float,
               device: torch.device, precision: str, run_dir: Any,
               backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One optimisation step at ``step`` / ``progress`` (0..1 of the planned run); returns the detached loss.

    ``precision`` is the resolved one (``fp32``/``bf16``/``fp16``); ``backward`` replaces ``loss.backward()``
    (Lightning passes its ``manual_backward``).
    """
    for g in opt.param_groups:
        g["lr"] = lr_at(progress, base_lr, warmup_frac) * g["lr_scale"]
    with autocast_ctx(device, precision):
        loss = model.loss(batch, step, progress)
    check_finite_loss(loss, f"step {step}", run_dir)
    opt.zero_grad(set_to_none=True)
    scaled = scaler.scale(loss)
    (backward or torch.Tensor.backward)(scaled)
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD_NORM)
    if not scaler.is_enabled():  # fp16's scaler skips a step with a non-finite gradient (and lowers its scale)
        check_finite_gradient(norm, f"step {step}", loss, run_dir)
    model.before_optimizer_step(step)
    scaler.step(opt)
    scaler.update()
    model.after_step(progress)
    return loss.detach()


@dataclasses.dataclass
class StepPlan:
    """How many steps the schedules span: ``--steps``, or for a ``--budget`` an estimate from measured step times.

    A budget run plans from the first step's time (start-up included: pessimistic, so the lr warm-up
    is not spread over steps that never come) and re-estimates after :data:`CALIBRATE_AT` local steps
    from the mean step time (excluding the first step and monitor points), minus the time the
    remaining monitor points will take. Progress is ``step / planned``.

    A resumed run (``resumed``) starts from the checkpoint's plan and skips the first-step estimate: that step's
    start-up time would shrink the plan, so progress (lr, EMA momentum, teacher temperature) would jump towards the
    end of the schedule until the next calibration point.
    """

    steps: int | None
    budget_s: float | None
    planned: int = 0
    step_times: list[float] = dataclasses.field(default_factory=list)
    monitor_cost_s: float = 0.0
    monitor_points_left: float = 0.0
    resumed: bool = False

    CALIBRATE_AT = (1, 5, 30, 100)

    def __post_init__(self) -> None:
        if not self.planned:
            self.planned = self.steps or max(10, int(self.budget_s or 0))

    def progress(self, step: int) -> float:
        return min(1.0, step / max(1, self.planned))

    def observe(self, local_step: int, seconds: float, step: int, elapsed: float) -> bool:
        """Record one step's time; at a calibration point re-estimate ``planned``; True when it changed."""
        if local_step > 1:
            self.step_times.append(seconds)
        if self.budget_s is None or local_step not in self.CALIBRATE_AT or (self.resumed and local_step == 1):
            return False
        # the first step (start-up included) gives a pessimistic first plan: a quick warm-up rather than none
        per = sum(self.step_times) / len(self.step_times) if self.step_times else seconds
        left = self.budget_s - elapsed - self.monitor_cost_s * self.monitor_points_left
        est = step + max(0, int(left / per))
        new = min(self.steps, est) if self.steps else est
        changed = new != self.planned
        self.planned = max(step + 1, new)
        return changed

    @property
    def seconds_per_step(self) -> float | None:
        return sum(self.step_times) / len(self.step_times) if self.step_times else None


__all__ = ["CLIP_GRAD_NORM", "StepPlan", "build_model", "check_finite_gradient", "lr_at", "param_groups", "train_step",
           "trunk_patch_size"]

"""SSL methods built from lightly's heads, losses and momentum utilities.

Each method wraps a timm trunk (``gigaslide.encoders.create_trunk``) and exposes
``loss(views, step, progress)``, ``after_step(progress)`` (momentum/EMA updates) and
``export_trunk()`` (the backbone to export: the EMA teacher for DINO, the query encoder otherwise).
Views arrive as float tensors in [0, 1]; the method normalises them with the run's mean/std.

Precision: the trunk runs in the run's autocast (bf16 / fp16); the heads and the losses run in float32
(:func:`full_precision`). CPU autocast keeps softmax, log-softmax, exp and sums in bf16 (CUDA's does not),
and DINO / SwAV divide head outputs by temperatures of 0.04-0.1, which magnifies bf16's rounding of the
logits (2^-8 relative) to whole-percent errors in the targets; the heads are a few percent of the compute.

Defaults are the papers' recipes shrunk for small runs (projection sizes, prototypes, queue); they
were not tuned here (MoCo v2's temperature and SwAV's queue, prototypes and prototype freezing were tried, and
the defaults kept: see :class:`MoCoV2` and :class:`SwAV`).
Each method's ``recipe`` (see :class:`SSLMethod`) fills run options the user
left unset.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gigaslide.registry import Registry

SSL_METHODS: Registry[type[SSLMethod]] = Registry("ssl_method")


def full_precision(like: torch.Tensor) -> torch.autocast:
    """Autocast switched off on ``like``'s device: heads and losses run in float32 inside it."""
    return torch.autocast(like.device.type, enabled=False)


def _cosine(progress: float, start: float, end: float) -> float:
    import math

    p = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1) / 2


class SSLMethod(nn.Module):
    """Base class: a trunk, its input normalisation and a head; subclasses define the loss."""

    view_kind = "two"  # "two", "multicrop" or "dinov2" (gigaslide.ssl.tile.augment.view_recipes)
    default_lr = 1e-3
    hparams: dict[str, Any] = {}
    #: Recipe defaults for :class:`~gigaslide.ssl.tile.config.PretrainConfig` fields the user left ``None``
    #: (e.g. ``batch_size``, ``lr``, ``warmup_frac``, ``layer_decay``, ``patch_embed_lr_mult``, ``drop_path``,
    #: ``n_local``, ``crop_size``, ``local_size``, ``local_scale``, ``global_scale``), plus ``method_args``
    #: merged under the user's ``--method-args``. Applied by ``config.resolve_config``; unknown keys are refused.
    recipe: dict[str, Any] = {}
    #: Set where ``benchmarks/bench_tile_precision.py`` measured this method as good in bf16 autocast as in
    #: fp32 per step on CPU (it then trains ~1.4x the steps per budget): ``--precision auto`` on a CPU with
    #: native bf16 trains in bf16 and records this line as its basis. None: ``auto`` trains in fp32 on CPU.
    cpu_bf16_basis: str | None = None

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__()
        unknown = set(kw) - set(self.hparams)
        if unknown:
            from gigaslide.errors import GigaslideError

            raise GigaslideError(f"unknown option(s) {sorted(unknown)} for {type(self).__name__}",
                                 fix=f"--method-args accepts: {', '.join(sorted(self.hparams))}")
        kw = {k: _check_hparam(type(self).__name__, k, v, self.hparams[k]) for k, v in kw.items()}
        self.hp = {**self.hparams, **kw}
        self.backbone = trunk
        self.embed_dim = embed_dim
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed(self, x: torch.Tensor, trunk: nn.Module | None = None) -> torch.Tensor:
        """The trunk's pooled output of ``x`` (in the run's autocast), as float32 for the heads."""
        return (trunk or self.backbone)(self.prep(x)).flatten(1).float()

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Momentum / EMA updates after the optimiser step."""

    def prepare_distributed(self) -> None:
        """Once the process group exists (DDP): gather negatives / codes / statistics across ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            crit = getattr(self, "criterion", None)
            for attr in ("gather_distributed", "sinkhorn_gather_distributed"):
                if crit is not None and hasattr(crit, attr):
                    setattr(crit, attr, True)

    def before_optimizer_step(self, step: int) -> None:
        """Gradient surgery (e.g. DINO freezes its last layer for the first steps)."""

    def export_trunk(self) -> nn.Module:
        return self.backbone

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]


def weight_norm_head(cls: type[nn.Module], *args: Any, **kw: Any) -> nn.Module:
    """``cls(*args, **kw)`` for lightly's DINO / DINOv2 heads, without the FutureWarning that their use of
    ``torch.nn.utils.weight_norm`` raises on every construction (lightly's code: nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*weight_norm.* is deprecated", category=FutureWarning)
        return cls(*args, **kw)


def _frozen_copy(m: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    c = copy.deepcopy(m)
    deactivate_requires_grad(c)
    return c


def _no_drop_path(vit: nn.Module) -> None:
    """Replace a timm ViT's stochastic depth by identities: for EMA teachers, whose targets must not be dropped at
    random (DINO and DINOv2 build the teacher without drop-path; ``--drop-path`` is for the student only)."""
    for blk in getattr(vit, "blocks", []):
        for name in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, name):
                setattr(blk, name, nn.Identity())


def _ema(model: nn.Module, ema: nn.Module, m: float) -> None:
    """EMA of the parameters only, as MoCo's key encoder, BYOL's target and DINO's teacher (lightly's
    ``update_momentum``): the EMA network keeps its own buffers -- a teacher in train mode estimates its BatchNorm
    running statistics from its own forward passes (DINO's teacher: the global crops only, with its own weights), and
    those are the statistics the exported teacher is evaluated with. (Copying the student's, estimated on its
    weights and on the small local crops too, gave the exported DINO teacher normalisations of another network.)"""
    from lightly.models.utils import update_momentum

    update_momentum(model, ema, m)


def _check_hparam(method: str, key: str, value: Any, default: Any) -> Any:
    """One ``--method-args`` value, checked: the default's type (a whole number where the default is an int,
    returned as an int; a number where it is a float), finite, not negative, above 0 for sizes, temperatures and
    epsilons (0 there divides by zero or builds an empty layer), and at most 1 for momenta, probabilities and
    fractions (an EMA momentum above 1 extrapolates away from the student; a masked share above 1 makes more masks
    than images)."""
    from gigaslide.errors import GigaslideError

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and float(value).is_integer()
    elif isinstance(default, float):
        ok = number
    else:
        ok = isinstance(value, type(default))
    why = None if ok else f"expected {type(default).__name__} (default {default!r})"
    if ok and number and not isinstance(default, bool):
        positive = key.endswith(("_dim", "temp", "temperature", "epsilon")) or key in ("n_prototypes", "queue")
        fraction = key.endswith(("momentum", "_prob", "_frac")) or key.startswith("mask_ratio")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            why = "must be above 0" if positive else "must be finite and 0 or more"
        elif fraction and value > 1:
            why = "must be between 0 and 1"
    if why:
        raise GigaslideError(f"--method-args {key}={value!r} for {method}: {why}",
                             fix=f"e.g. --method-args '{{\"{key}\": {json.dumps(default)}}}' (the default)")
    return int(value) if isinstance(default, int) and not isinstance(default, bool) else value


@SSL_METHODS.register("simclr")
class SimCLR(SSLMethod):
    """SimCLR (Chen et al. 2020): NT-Xent between two views, both views in one batch (global BN)."""

    hparams = {"hidden_dim": 2048, "out_dim": 128, "temperature": 0.2}
    cpu_bf16_basis = "benchmarks/results/tile_precision.md (bf16 as good as fp32 per step, ResNet-18 on PCam)"

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, channels_last, **kw)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.head = SimCLRProjectionHead(embed_dim, self.hp["hidden_dim"], self.hp["out_dim"])
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.criterion = NTXentLoss(temperature=self.hp["temperature"], gather_distributed=dist)
        bank = getattr(self.criterion, "memory_bank", None)
        if bank is not None and hasattr(bank, "bank_ptr"):
            # lightly leaves an unused bank's pointer uninitialised (torch.empty); the run layer checkpoints every
            # buffer and a resumed run is compared bit for bit, so it gets a defined value
            bank.bank_ptr.zero_()

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        h = self.embed(torch.cat(views[:2]))
        with full_precision(h):
            z0, z1 = self.head(h).chunk(2)
            return self.criterion(z0, z1)


def _info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: each unit query ``q[i]`` against its key ``k[i]`` and the queue's ``negatives`` [dim, K]."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.to(q.dtype)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@SSL_METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    """MoCo v2 (Chen et al. 2020): query vs momentum-encoder key with a queue of negatives, symmetrised."""

    #: temperature: the paper's 0.2. 0.1 was better at 5 min on held-out PCam train tiles (tile_ssl.md section
    #: ``tune``) but not better at the 15 min protocol on PCam valid (section ``temperature``), so 0.2 stays.
    hparams = {"hidden_dim": 2048, "out_dim": 128, "temperature": 0.2, "queue": 4096, "momentum": 0.99}
    cpu_bf16_basis = "benchmarks/results/tile_precision.md (bf16 as good as fp32 per step, ResNet-18 on PCam)"

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, channels_last, **kw)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        self.head = MoCoProjectionHead(embed_dim, self.hp["hidden_dim"], self.hp["out_dim"])
        self.backbone_m = _frozen_copy(self.backbone)
        self.head_m = _frozen_copy(self.head)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.criterion = NTXentLoss(temperature=self.hp["temperature"],
                                    memory_bank_size=(int(self.hp["queue"]), int(self.hp["out_dim"])), gather_distributed=dist)

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        v = torch.cat(views[:2])
        h = self.embed(v)
        with torch.no_grad():
            h_m = self.embed(v, self.backbone_m)
        with full_precision(h):
            q0, q1 = F.normalize(self.head(h), dim=1).chunk(2)
            with torch.no_grad():
                k0, k1 = F.normalize(self.head_m(h_m), dim=1).chunk(2)
            # both directions against the queue as it was before this batch, then this batch's keys enqueued once.
            # (Two calls of lightly's NTXentLoss would enqueue k1 in the first, so that the second would count each
            # query's own-view key k1 -- its nearest vector -- among its negatives.)
            _, negatives = self.criterion.memory_bank(torch.cat([k1, k0]), update=q0.requires_grad)  # [dim, queue]
            t = self.criterion.temperature
            return 0.5 * (_info_nce(q0, k1, negatives, t) + _info_nce(q1, k0, negatives, t))

    def after_step(self, progress: float) -> None:
        m = _cosine(progress, self.hp["momentum"], 1.0)
        _ema(self.backbone, self.backbone_m, m)
        _ema(self.head, self.head_m, m)


@SSL_METHODS.register("barlowtwins")
class BarlowTwins(SSLMethod):
    """Barlow Twins (Zbontar et al. 2021): cross-correlation of the two views' embeddings towards identity."""

    hparams = {"proj_dim": 2048, "lambda_param": 5e-3}

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, channels_last, **kw)
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        d = int(self.hp["proj_dim"])
        self.head = BarlowTwinsProjectionHead(embed_dim, d, d)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.criterion = BarlowTwinsLoss(lambda_param=self.hp["lambda_param"], gather_distributed=dist)

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        h0, h1 = self.embed(views[0]), self.embed(views[1])  # separate passes: per-view batch statistics (paper)
        with full_precision(h0):
            return self.criterion(self.head(h0), self.head(h1))


def _by_size(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Consecutive runs of same-sized views -> [(start, end)], so each resolution is one forward pass."""
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


@SSL_METHODS.register("swav")
class SwAV(SSLMethod):
    """SwAV (Caron et al. 2020): swapped prediction of Sinkhorn cluster codes, multi-crop."""

    view_kind = "multicrop"
    #: queue_length: features of past batches' global crops (per crop) added to the Sinkhorn step, as the paper does
    #: for batches of 256 or fewer (its queue: 3840); used once it holds only real features. 0: no queue.
    #: Queues of 1024 and 3840, 300 prototypes and 20 frozen-prototype steps were each no better than these defaults
    #: at 5 min on held-out PCam train tiles (tile_ssl.md section ``tune_swav``, paired Δ CIs all include 0), so the
    #: queue stays off: at this scale it fills only after 16-60 of ~160 steps.
    hparams = {"hidden_dim": 2048, "out_dim": 128, "n_prototypes": 1000, "freeze_prototypes_steps": 100,
               "temperature": 0.1, "sinkhorn_epsilon": 0.05, "queue_length": 0}

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, channels_last, **kw)
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        self.head = SwaVProjectionHead(embed_dim, self.hp["hidden_dim"], self.hp["out_dim"])
        self.prototypes = SwaVPrototypes(self.hp["out_dim"], int(self.hp["n_prototypes"]),
                                         n_steps_frozen_prototypes=int(self.hp["freeze_prototypes_steps"]))
        # SwAV's prototypes are bias-free vectors c_k: scores z . c_k (official code: Linear(..., bias=False)).
        # lightly's SwaVPrototypes layers have a bias, trained and never normalised: dropped
        for layer in self.prototypes.heads:
            layer.register_parameter("bias", None)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.criterion = SwaVLoss(temperature=self.hp["temperature"], sinkhorn_epsilon=self.hp["sinkhorn_epsilon"],
                                  sinkhorn_gather_distributed=dist)
        n = int(self.hp["queue_length"])
        if n < 0:
            from gigaslide.errors import GigaslideError

            raise GigaslideError(f"swav queue_length {n} is negative", fix="give 0 (no queue) or a positive length")
        self.queues = None
        if n:
            from lightly.models.modules.memory_bank import MemoryBankModule

            self.queues = nn.ModuleList([MemoryBankModule((n, int(self.hp["out_dim"])), gather_distributed=dist,
                                                          feature_dim_first=False) for _ in range(2)])
        # how many real features the queues have taken in (their random initial entries are never used)
        self.register_buffer("queue_seen", torch.zeros((), dtype=torch.long))

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        self.prototypes.normalize()
        hs = [(a, b, self.embed(torch.cat(views[a:b]))) for a, b in _by_size(views)]
        outs: list[torch.Tensor] = []
        z_global: list[torch.Tensor] = []
        with full_precision(hs[0][2]):
            for a, b, h in hs:
                z = F.normalize(self.head(h), dim=1)
                z_global += list(z.chunk(b - a))[: max(0, 2 - a)]
                outs += list(self.prototypes(z, step).chunk(b - a))
            queue_outputs = None
            if self.queues is not None:
                with torch.no_grad():
                    full = int(self.queue_seen) >= self.queues[0].size[0]
                    banks = [q(z.detach(), update=True)[1] for q, z in zip(self.queues, z_global)]  # before update
                    self.queue_seen += z_global[0].shape[0]
                    if full:
                        queue_outputs = [self.prototypes(bank, step) for bank in banks]
            return self.criterion(outs[:2], outs[2:], queue_outputs).reshape(())  # lightly returns shape [1]


@SSL_METHODS.register("dino")
class DINO(SSLMethod):
    """DINO (Caron et al. 2021): student matches the EMA teacher's centred, sharpened output; multi-crop.

    With ``--init`` teacher and student both start from the given encoder (the exported encoder is
    the teacher), but the loss is DINO v1's only: Roth et al.'s continued pre-training of a DINOv2
    ViT (DINO + iBOT + KoLeo, Sinkhorn-Knopp) is ``--method dinov2`` (:mod:`gigaslide.ssl.tile.dinov2`).
    """

    view_kind = "multicrop"
    default_lr = 5e-4
    # No cpu_bf16_basis: with heads and losses in fp32, bf16 gained little speed and its paired linear-probe CI
    # fell below the non-inferiority margin (tile_precision.md), so --precision auto trains DINO in fp32 on CPU.
    # (Its earlier bf16 NaN on a tiny model was PyTorch's CPU bf16 weight gradient of a conv strided past its
    # input, which gigaslide.devices.guard_bf16_convs routes to fp32; --precision bf16 is safe.)
    hparams = {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "teacher_temp": 0.04,
               "warmup_teacher_temp": 0.04, "warmup_teacher_temp_frac": 0.1, "student_temp": 0.1,
               "momentum": 0.996, "freeze_last_layer_steps": 50, "batch_norm_head": False}

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, channels_last, **kw)
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        hp = self.hp
        dims = (embed_dim, hp["hidden_dim"], hp["bottleneck_dim"], int(hp["out_dim"]))
        self.head = weight_norm_head(DINOProjectionHead, *dims, batch_norm=bool(hp["batch_norm_head"]),
                                     freeze_last_layer=int(hp["freeze_last_layer_steps"]))
        self.teacher_backbone = _frozen_copy(self.backbone)
        _no_drop_path(self.teacher_backbone)  # the teacher runs in train mode (its BatchNorm), without drop-path
        self.teacher_head = weight_norm_head(DINOProjectionHead, *dims,
                                             batch_norm=bool(hp["batch_norm_head"]))  # weight-norm: no deepcopy
        self.teacher_head.load_state_dict(self.head.state_dict())
        from lightly.models.utils import deactivate_requires_grad

        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=int(hp["out_dim"]), warmup_teacher_temp=hp["warmup_teacher_temp"],
                                  teacher_temp=hp["teacher_temp"], student_temp=hp["student_temp"])

    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        hp = self.hp
        w = hp["warmup_teacher_temp_frac"]
        t = hp["teacher_temp"] if progress >= w or w <= 0 else (
            hp["warmup_teacher_temp"] + (hp["teacher_temp"] - hp["warmup_teacher_temp"]) * progress / w)
        with torch.no_grad():
            h_t = self.embed(torch.cat(views[:2]), self.teacher_backbone)
        hs = [(a, b, self.embed(torch.cat(views[a:b]))) for a, b in _by_size(views)]
        with full_precision(h_t):
            with torch.no_grad():
                teacher = list(self.teacher_head(h_t).chunk(2))
            student: list[torch.Tensor] = []
            for a, b, h in hs:
                student += list(self.head(h).chunk(b - a))
            return self.criterion(teacher, student, teacher_temp=t)

    def before_optimizer_step(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(step)

    def after_step(self, progress: float) -> None:
        m = _cosine(progress, self.hp["momentum"], 1.0)
        _ema(self.backbone, self.teacher_backbone, m)
        _ema(self.head, self.teacher_head, m)

    def export_trunk(self) -> nn.Module:
        return self.teacher_backbone

"""DINOv2 self-supervised training of a ViT (Oquab et al. 2023), as continued on pathology tiles by
Roth et al. (ISBI 2024): ``gigaslide pretrain --method dinov2 --backbone vit_small_dinov2 --init vit_small_dinov2``.

Built from lightly's parts: :class:`~lightly.loss.DINOLoss` (image level, cross-view),
:class:`~lightly.loss.IBOTPatchLoss` (masked-patch level), :class:`~lightly.loss.KoLeoLoss`
(spreads the student's image embeddings), :class:`~lightly.models.modules.DINOv2ProjectionHead`,
:class:`~lightly.models.modules.MaskedVisionTransformerTIMM` (student forward with mask tokens),
``random_block_mask`` (DINOv2's block masks: half the global crops, 10-50 % of their patches)
and ``sinkhorn`` (Sinkhorn-Knopp centring of the teacher, DINOv2's default).

Recipe (all defaults; crop/optimiser numbers in :attr:`DINOv2.recipe`, the rest ``--method-args``):
2 global crops at the tile size (scale 0.32-1) + 8 local crops of 98/224 of it (scale 0.05-0.32),
sizes whole multiples of the patch (read from the model); layer-wise lr decay 0.9, patch-embedding
lr x 0.2, drop-path 0.1 on every block of the student (DINOv2's uniform rate); teacher temperature
0.04 -> 0.07 over the first 30 % of training; EMA teacher 0.992 -> 1 (cosine). The exported encoder is the teacher.

State: teacher weights, the mask token and lightly's centre buffers are module parameters /
buffers (checkpointed); schedules are functions of ``progress``; masks are drawn from
``(seed, step, rank)`` alone, so a resumed run draws the same masks.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
from torch import nn

from gigaslide.errors import GigaslideError
from gigaslide.ssl.tile.methods import (
    SSL_METHODS,
    SSLMethod,
    _by_size,
    _cosine,
    _ema,
    _no_drop_path,
    full_precision,
    weight_norm_head,
)

CENTERINGS = ("sinkhorn_knopp", "centering")


def _dist_rank() -> tuple[bool, int]:
    on = torch.distributed.is_available() and torch.distributed.is_initialized()
    return on, (torch.distributed.get_rank() if on else 0)


def _uniform_drop_path(vit: nn.Module) -> None:
    """Give every block of the student the trunk's drop-path rate (DINOv2's ``drop_path_uniform: true``), where timm's
    ``drop_path_rate`` rises linearly from 0 at the first block (DINO v1's and timm's stochastic-depth rule)."""
    from timm.layers import DropPath

    rate = max((m.drop_prob for m in vit.modules() if isinstance(m, DropPath)), default=0.0)
    if rate <= 0:
        return
    for blk in getattr(vit, "blocks", []):
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(rate))


@SSL_METHODS.register("dinov2")
class DINOv2(SSLMethod):
    """DINO + iBOT + KoLeo with a Sinkhorn-Knopp-centred EMA teacher (ViT backbones only)."""

    view_kind = "dinov2"
    default_lr = 1e-3  # DINOv2's 4e-3 at batch 1024, square-root scaled to batch 64
    recipe: dict[str, Any] = {"layer_decay": 0.9, "patch_embed_lr_mult": 0.2, "drop_path": 0.1, "n_local": 8,
                              "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32)}
    hparams = {"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "ibot_separate_head": False,
               "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_frac": 0.3, "student_temp": 0.1,
               "momentum": 0.992, "centering": "sinkhorn_knopp", "sinkhorn_iterations": 3, "center_momentum": 0.9,
               "dino_weight": 1.0, "ibot_weight": 1.0, "koleo_weight": 0.1,
               "mask_ratio_min": 0.1, "mask_ratio_max": 0.5, "mask_sample_prob": 0.5, "freeze_last_layer_steps": 50}

    def __init__(self, trunk: nn.Module, embed_dim: int, mean, std, channels_last: bool = False, **kw: Any):  # noqa: ANN001
        super().__init__(trunk, embed_dim, mean, std, False, **kw)
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import MaskedVisionTransformerTIMM

        from gigaslide.ssl.tile.init import patch_size_of

        hp = self.hp
        if patch_size_of(trunk) is None or not hasattr(trunk, "forward_features"):
            raise GigaslideError("--method dinov2 needs a ViT backbone (its iBOT loss works on patch tokens)",
                                 fix="use e.g. --backbone vit_small_dinov2, or --method dino for a CNN")
        if hp["centering"] not in CENTERINGS:
            raise GigaslideError(f"unknown centering '{hp['centering']}'", fix=f"--method-args centering: {' or '.join(CENTERINGS)}")
        if not 0 <= hp["mask_ratio_min"] <= hp["mask_ratio_max"] <= 1:
            raise GigaslideError(f"mask ratio {hp['mask_ratio_min']}-{hp['mask_ratio_max']} must satisfy 0 <= min <= max <= 1",
                                 fix='e.g. --method-args \'{"mask_ratio_min": 0.1, "mask_ratio_max": 0.5}\'')
        self.patch = int(patch_size_of(trunk))
        self.n_prefix = int(getattr(trunk, "num_prefix_tokens", 1))
        k = int(hp["out_dim"])
        self.head = self._new_head(embed_dim)
        self.ibot_head = self._new_head(embed_dim) if hp["ibot_separate_head"] else None
        _uniform_drop_path(trunk)
        self.teacher_backbone = copy.deepcopy(trunk)
        _no_drop_path(self.teacher_backbone)  # drop-path is for the student only
        self.teacher_head = self._copy_head(self.head, embed_dim)
        self.teacher_ibot_head = self._copy_head(self.ibot_head, embed_dim) if self.ibot_head is not None else None
        for p in self.teacher_backbone.parameters():
            p.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # the student's masked forward: a view on self.backbone (not a second registered copy of it)
        object.__setattr__(self, "_masked", MaskedVisionTransformerTIMM(
            vit=self.backbone, mask_token=self.mask_token, weight_initialization="skip", pos_embed_initialization="skip",
            antialias=True))
        # Sinkhorn-Knopp: the losses get log-probabilities at temperature 1 and a frozen (zero) centre.
        cm = float(hp["center_momentum"]) if hp["centering"] == "centering" else 1.0
        self.dino_loss = DINOLoss(output_dim=k, teacher_temp=hp["teacher_temp"], student_temp=hp["student_temp"], center_momentum=cm)
        self.ibot_loss = IBOTPatchLoss(output_dim=k, teacher_temp=hp["teacher_temp"], student_temp=hp["student_temp"], center_momentum=cm)
        self.koleo_loss = KoLeoLoss()
        self.mask_seed = int(torch.initial_seed())  # build_model seeds torch with the run's seed first
        self.last_terms: dict[str, float] = {}

    # -- parts ---------------------------------------------------------------------------------
    def _new_head(self, embed_dim: int) -> nn.Module:
        from lightly.models.modules import DINOv2ProjectionHead

        hp = self.hp
        return weight_norm_head(DINOv2ProjectionHead, embed_dim, int(hp["hidden_dim"]), int(hp["bottleneck_dim"]),
                                int(hp["out_dim"]))

    def _copy_head(self, head: nn.Module, embed_dim: int) -> nn.Module:
        t = self._new_head(embed_dim)  # weight-norm modules do not deepcopy: build, then copy the weights
        t.load_state_dict(head.state_dict())
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    def train(self, mode: bool = True) -> DINOv2:
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        if self.teacher_ibot_head is not None:
            self.teacher_ibot_head.eval()
        return self

    def teacher_temp(self, progress: float) -> float:
        hp = self.hp
        w = float(hp["warmup_teacher_temp_frac"])
        if w <= 0 or progress >= w:
            return float(hp["teacher_temp"])
        return float(hp["warmup_teacher_temp"] + (hp["teacher_temp"] - hp["warmup_teacher_temp"]) * max(progress, 0.0) / w)

    def masks(self, n: int, grid: int, step: int) -> torch.Tensor:
        """Block masks [n, grid, grid] for the global crops of ``step`` (a function of seed, step and rank only;
        never empty, so every rank takes part in the iBOT centre / Sinkhorn collectives)."""
        from lightly.models.utils import random_block_mask

        hp = self.hp
        _, rank = _dist_rank()
        state = random.getstate()
        try:
            random.seed(f"gigaslide-dinov2-{self.mask_seed}-{int(step)}-{rank}")
            m = random_block_mask((n, grid, grid), batch_mask_ratio=float(hp["mask_sample_prob"]),
                                  min_image_mask_ratio=float(hp["mask_ratio_min"]),
                                  max_image_mask_ratio=float(hp["mask_ratio_max"]),
                                  min_num_masks_per_block=max(1, min(4, grid * grid // 16)),
                                  max_num_masks_per_block=grid * grid)  # lightly's default fails on 0-patch images
            if not m.any():  # tiny grids can round every image's share down to 0: mask one patch, so that every
                m.view(n, -1)[random.randrange(n), random.randrange(grid * grid)] = True  # step (and DDP rank) runs iBOT
            return m
        finally:
            random.setstate(state)

    def _targets(self, logits: torch.Tensor, temp: float) -> tuple[torch.Tensor, float]:
        """(teacher input for lightly's loss, temperature): raw logits, or log Sinkhorn-Knopp probabilities at T=1."""
        if self.hp["centering"] == "centering":
            return logits, temp
        from lightly.loss.swav_loss import sinkhorn

        on, _ = _dist_rank()
        q = sinkhorn(logits, iterations=int(self.hp["sinkhorn_iterations"]), epsilon=temp, gather_distributed=on)
        return torch.log(q.clamp_min(1e-30)), 1.0

    def _pool(self, vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return vit.forward_head(tokens, pre_logits=True)  # the trunk's own pooling: what the export returns

    # -- the loss ------------------------------------------------------------------------------
    def loss(self, views: list[torch.Tensor], step: int, progress: float) -> torch.Tensor:
        hp = self.hp
        glob = self.prep(torch.cat(views[:2]))
        n, side = glob.shape[0], glob.shape[-1]
        grid = side // self.patch
        if hp["ibot_weight"] > 0:
            mask = self.masks(n, grid, step).to(glob.device)
        else:  # iBOT off: no masked-image modelling at all (plain DINO + KoLeo on whole crops)
            mask = torch.zeros(n, grid, grid, dtype=torch.bool, device=glob.device)
        flat = mask.flatten(1)
        temp = self.teacher_temp(progress)
        ibot_head_s = self.ibot_head if self.ibot_head is not None else self.head
        ibot_head_t = self.teacher_ibot_head if self.teacher_ibot_head is not None else self.teacher_head
        # trunks in the run's autocast; heads, targets and losses in float32 (see gigaslide.ssl.tile.methods)
        with torch.no_grad():
            t_tok = self.teacher_backbone.forward_features(glob)
            t_glob = self._pool(self.teacher_backbone, t_tok).float()
            t_patch = t_tok[:, self.n_prefix:][flat].float()
        full = torch.cat([flat.new_zeros(n, self.n_prefix), flat], dim=1)
        s_tok = self._masked.encode(glob, mask=full)
        s_glob = self._pool(self.backbone, s_tok).float()
        s_patch = s_tok[:, self.n_prefix:][flat].float()
        s_loc = []  # local crops, one pass per size
        for a, b in _by_size(views[2:]):
            loc = self.prep(torch.cat(views[2 + a:2 + b]))
            s_loc.append((a, b, self._pool(self.backbone, self.backbone.forward_features(loc)).float()))
        with full_precision(s_glob):
            with torch.no_grad():
                t_cls, t_cls_temp = self._targets(self.teacher_head(t_glob), temp)
            student = list(self.head(s_glob).chunk(2))
            for a, b, h in s_loc:
                student += list(self.head(h).chunk(b - a))
            dino = self.dino_loss(list(t_cls.chunk(2)), student, teacher_temp=t_cls_temp)
            if bool(flat.any()):
                with torch.no_grad():
                    t_p, t_p_temp = self._targets(ibot_head_t(t_patch), temp)
                ibot = self.ibot_loss(t_p, ibot_head_s(s_patch), mask, teacher_temp=t_p_temp)
            else:  # iBOT off: no patch term, centre untouched
                ibot = s_tok.sum() * 0.0
            koleo = (sum(self.koleo_loss(c) for c in s_glob.chunk(2)) if hp["koleo_weight"] > 0
                     else s_glob.sum() * 0.0)
        total = hp["dino_weight"] * dino + hp["ibot_weight"] * ibot + hp["koleo_weight"] * koleo
        self.last_terms = {"dino": float(dino.detach()), "ibot": float(ibot.detach()), "koleo": float(koleo.detach()),
                           "masked": int(flat.sum())}
        return total

    def before_optimizer_step(self, step: int) -> None:
        if step < int(self.hp["freeze_last_layer_steps"]):
            for head in (self.head, self.ibot_head):
                if head is not None:
                    for p in head.last_layer.parameters():
                        p.grad = None

    def after_step(self, progress: float) -> None:
        m = _cosine(progress, self.hp["momentum"], 1.0)
        _ema(self.backbone, self.teacher_backbone, m)
        _ema(self.head, self.teacher_head, m)
        if self.ibot_head is not None:
            _ema(self.ibot_head, self.teacher_ibot_head, m)

    def export_trunk(self) -> nn.Module:
        return self.teacher_backbone

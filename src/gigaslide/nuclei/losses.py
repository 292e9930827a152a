"""HoVer-Net losses: cross-entropy + soft Dice on NP (and NC), MSE + gradient MSE (MSGE) on HV."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice(logits: torch.Tensor, target: torch.Tensor, n_classes: int, eps: float = 1e-3) -> torch.Tensor:
    """1 - Dice of the softmax probabilities against one-hot ``target`` [N, H, W], summed over classes."""
    p = logits.float().softmax(1)
    t = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    inter = (p * t).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    return (1.0 - (2 * inter + eps) / (denom + eps)).sum()


def _sobel(x: torch.Tensor, size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """x- and y-gradients of [N, 1, H, W] with HoVer-Net's normalised 5x5 Sobel kernels."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32, device=x.device)
    h = r.view(1, -1).expand(size, size)
    v = r.view(-1, 1).expand(size, size)
    kh = h / (h * h + v * v + 1e-15)
    kv = v / (h * h + v * v + 1e-15)
    gx = F.conv2d(x, kh.view(1, 1, size, size), padding=size // 2)
    gy = F.conv2d(x, kv.view(1, 1, size, size), padding=size // 2)
    return gx, gy


def msge(pred: torch.Tensor, target: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the HV maps' gradients (h along x, v along y) inside nuclei (``focus``)."""
    ph, _ = _sobel(pred[:, :1].float())
    _, pv = _sobel(pred[:, 1:].float())
    th, _ = _sobel(target[:, :1])
    _, tv = _sobel(target[:, 1:])
    f = focus.float().unsqueeze(1)
    err = (ph - th) ** 2 * f + (pv - tv) ** 2 * f
    return err.sum() / (2 * f.sum() + 1e-8)


def hovernet_loss(out: dict[str, torch.Tensor], np_t: torch.Tensor, hv_t: torch.Tensor,
                  nc_t: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. ``np_t`` [N,H,W] 0/1, ``hv_t`` [N,2,H,W], ``nc_t`` [N,H,W] types."""
    parts = {
        "np_ce": F.cross_entropy(out["np"].float(), np_t),
        "np_dice": soft_dice(out["np"], np_t, 2),
        "hv_mse": F.mse_loss(out["hv"].float(), hv_t),
        "hv_msge": msge(out["hv"], hv_t, np_t),
    }
    if nc_t is not None and "nc" in out:
        k = out["nc"].shape[1]
        parts["nc_ce"] = F.cross_entropy(out["nc"].float(), nc_t)
        parts["nc_dice"] = soft_dice(out["nc"], nc_t, k)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


__all__ = ["hovernet_loss", "msge", "soft_dice"]

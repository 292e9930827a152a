"""Giga-SSL (Lazard et al., CVPRW 2023): SimCLR at slide level over cached augmented views.

A training step takes ``batch_size`` slides, two different cached views of each (a view = a random
tile subset encoded under one shared augmentation), encodes both with the slide encoder
(SparseConvMIL by default), projects them (lightly ``SimCLRProjectionHead``) and applies lightly's
``NTXentLoss(temperature=0.05)``; Adam. Each epoch's randomness is seeded by (seed, epoch), so a
run resumed from its per-epoch checkpoint ends with the same weights as an uninterrupted one.

Embedding (:func:`embed_views`): the average of the encoder's output over ``ensemble`` random views
of ``tiles_per_view`` plain (non-augmented) tiles — the paper's "ensembling".
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from gigaslide.devices import autocast_ctx
from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.ssl.slide import run as runs
from gigaslide.ssl.slide.encoders import build_slide_encoder
from gigaslide.ssl.slide.views import load_cache

RESUME_KEYS = ("method", "encoder", "data", "train")


class GigaSSLModel(nn.Module):
    def __init__(self, encoder: nn.Module, out_dim: int, proj_dim: int):
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.encoder = encoder
        self.head = SimCLRProjectionHead(out_dim, out_dim, proj_dim, batch_norm=False)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(feats, pos))


def pretrain_gigassl(cache: str | os.PathLike, out: str | os.PathLike, *, encoder: str = "sparseconvmil",
                     epochs: int = 50, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-6,
                     temperature: float = 0.05, out_dim: int = 512, hidden: int = 256, proj_dim: int = 128,
                     seed: int = 0, device: str = "auto", bf16: bool = False, stop_after: int | None = None,
                     log=print) -> dict[str, Any]:  # noqa: ANN001
    """Pre-train (or resume) a Giga-SSL slide encoder on an augmented-view cache; exports RUN/model.safetensors.

    ``stop_after``: stop after this many epochs *in this call* (tests simulate an interruption)."""
    from lightly.loss import NTXentLoss

    vc = load_cache(cache)
    if len(vc) < 2:
        raise GigaslideError(f"SimCLR needs at least 2 slides, the cache has {len(vc)}", path=cache,
                             fix="cache more slides with augment-cache")
    n_views = min(int(v.shape[0]) for v in vc.views)
    if n_views < 2:
        raise GigaslideError("each slide needs at least 2 cached views", path=cache, fix="rebuild with --views 2 or more")
    bs = max(2, min(batch_size, len(vc)))
    a = vc.attrs
    config = {
        "method": "gigassl",
        "encoder": {"name": encoder, "in_dim": vc.dim, "out_dim": out_dim, "hidden": hidden},
        "data": {"tile_encoder": a.get("encoder"), "encoder_weights_sha256": a.get("encoder_weights_sha256"),
                 "dim": vc.dim, "mpp": a.get("mpp"), "tile_size": a.get("tile_size"),
                 "tiles_per_view": int(vc.views[0].shape[1]), "n_slides": len(vc)},
        "train": {"epochs": epochs, "batch_size": bs, "lr": lr, "weight_decay": weight_decay, "temperature": temperature,
                  "proj_dim": proj_dim, "seed": seed},
        "cache": str(cache),
    }
    run, ck = runs.prepare(out, config, RESUME_KEYS)
    dev = runs.device_of(device)
    torch.manual_seed(seed)
    model = GigaSSLModel(build_slide_encoder(encoder, vc.dim, out_dim=out_dim, hidden=hidden), out_dim, proj_dim).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = NTXentLoss(temperature=temperature)
    start, history = 0, []
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        start, history = int(ck["epoch"]), list(ck.get("history", []))
        log(f"resuming {run} at epoch {start}/{epochs}")
    t0 = time.perf_counter()
    base = history[-1]["seconds"] if history else 0.0  # training seconds are cumulative over resumes
    done_now = 0
    for epoch in range(start, epochs):
        if stop_after is not None and done_now >= stop_after:
            break
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 100_003 + epoch)
        model.train()
        order = rng.permutation(len(vc))
        losses = []
        for s in range(0, len(order) - 1, bs):
            batch = order[s:s + bs]
            if len(batch) < 2:
                continue
            pairs = [rng.choice(n_views, size=2, replace=False) for _ in batch]
            f0 = torch.stack([vc.views[i][p[0]] for i, p in zip(batch, pairs)]).to(dev, torch.float32)
            f1 = torch.stack([vc.views[i][p[1]] for i, p in zip(batch, pairs)]).to(dev, torch.float32)
            p0 = torch.stack([vc.pos[i][p[0]] for i, p in zip(batch, pairs)]).to(dev)
            p1 = torch.stack([vc.pos[i][p[1]] for i, p in zip(batch, pairs)]).to(dev)
            with autocast_ctx(dev, "bf16" if bf16 and dev.type != "cuda" else "auto"):
                z = model(torch.cat([f0, f1]), torch.cat([p0, p1])).float()
            loss = loss_fn(z[: len(batch)], z[len(batch):])
            check_finite_loss(loss, f"epoch {epoch}", run)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "seconds": base + time.perf_counter() - t0})
        runs.save_checkpoint(run, {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1,
                                   "history": history})
        done_now += 1
        log(f"epoch {epoch + 1}/{epochs} loss {history[-1]['loss']:.4f}")
    finished = bool(history) and history[-1]["epoch"] >= epochs
    if finished:
        runs.export(run, model.encoder, history)
    return {"run": str(run), "finished": finished, "history": history, "seconds": base + time.perf_counter() - t0}


def load_encoder(run: str | os.PathLike) -> tuple[nn.Module, dict]:
    cfg = runs.read_config(run)
    e = cfg["encoder"]
    enc = build_slide_encoder(e["name"], e["in_dim"], out_dim=e["out_dim"], hidden=e["hidden"])
    return runs.load_weights(run, enc), cfg


@torch.no_grad()
def embed_views(encoder: nn.Module, feats: np.ndarray, pos: np.ndarray, *, ensemble: int, tiles_per_view: int,
                rng: np.random.Generator, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Mean embedding over ``ensemble`` random views of ``tiles_per_view`` tiles (all tiles if fewer)."""
    n = len(feats)
    t = min(tiles_per_view, n)
    idx = np.stack([rng.choice(n, size=t, replace=False) for _ in range(max(1, ensemble))])
    f = torch.as_tensor(feats[idx], dtype=torch.float32, device=device)
    p = torch.as_tensor(pos[idx], dtype=torch.long, device=device)
    return encoder(f, p).mean(0).float().cpu().numpy()

"""A label-free progress monitor for tile SSL: is the encoder still improving?

A fixed set of ``size`` tiles (drawn from the training data by the run's seed) is embedded with the
encoder that will be exported, in eval mode, at the native tile size; two augmented views of each
tile (the run's global-view recipes, fixed seeds) are embedded too. Reported per monitor point:

* ``rankme``: the effective rank of the native-size embeddings (Garrido et al. 2023, RankMe:
  ``exp`` of the entropy of the normalised singular values; at most ``size``). A collapsing encoder
  loses rank; a rising rank usually goes with a better linear probe.
* ``view_top1``: how often a tile's second view has its own first view as nearest neighbour
  (cosine) among all first views: invariance and discrimination together, 1/size by chance.

Nothing here touches the training RNG, optimiser or BatchNorm statistics, so monitoring does not
change what a run learns (resume stays bit-exact).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from gigaslide.devices import autocast_ctx


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of embeddings ``z`` [N, D] (RankMe)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def view_top1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows of ``b`` whose nearest row of ``a`` (cosine) is the same index."""
    sim = F.normalize(b.float(), dim=1) @ F.normalize(a.float(), dim=1).T
    return float((sim.argmax(1) == torch.arange(len(b))).float().mean())


def native_tiles(source, n: int, tile_size: int, seed: int, salt: int) -> torch.Tensor:  # noqa: ANN001
    """``n`` tiles of ``source`` drawn by ``(seed, salt)``, float [n, 3, S, S] at the native ``tile_size``."""
    from gigaslide.ssl.tile.augment import to_float

    idx = np.random.default_rng([seed, salt]).choice(len(source), min(n, len(source)), replace=False)
    out = []
    for k, i in enumerate(idx):
        g = torch.Generator().manual_seed(seed * 1_000_003 + salt + k)
        img = to_float(torch.from_numpy(np.array(source.load(int(i), g), dtype=np.uint8, copy=True)))
        if img.shape[-2:] != (tile_size, tile_size):
            img = F.interpolate(img[None], size=(tile_size, tile_size), mode="bilinear", align_corners=False,
                                antialias=True)[0].clamp(0, 1)
        out.append(img)
    return torch.stack(out)


@torch.no_grad()
def recalibrate_bn(trunk: torch.nn.Module, prep, images: torch.Tensor, batch: int = 64) -> int:  # noqa: ANN001
    """Re-estimate the BatchNorm running statistics of ``trunk`` (in place) on ``images`` seen as ``prep(x)``:
    cumulative averages over all of them, weights unchanged. Returns the number of BatchNorm layers (0: nothing to do).

    Training sees augmented crops (smaller than the tiles by default); the export embeds native tiles, whose
    activation statistics differ (Touvron et al. 2019, FixRes), so the export's statistics are measured on those.
    """
    bns = [m for m in trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    trunk.train()
    for i in range(0, len(images), batch):
        trunk(prep(images[i:i + batch]))
    trunk.eval()
    return len(bns)


class Monitor:
    """The fixed monitor set of a run and its evaluation (see the module docstring)."""

    def __init__(self, source, recipes, tile_size: int, size: int, seed: int):  # noqa: ANN001
        from gigaslide.ssl.tile.augment import apply_view

        self.native = native_tiles(source, size, tile_size, seed, 20230)
        va, vb = [], []
        for k, img in enumerate(self.native):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            va.append(apply_view(img, recipes[0], g))
            vb.append(apply_view(img, recipes[1], g))
        self.view_a, self.view_b = torch.stack(va), torch.stack(vb)

    def __len__(self) -> int:
        return len(self.native)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, precision: str, batch: int = 128) -> dict:
        t0 = time.monotonic()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        trunk = model.export_trunk()

        def emb(x: torch.Tensor) -> torch.Tensor:
            out = []
            for i in range(0, len(x), batch):
                with autocast_ctx(device, precision):
                    out.append(trunk(model.prep(x[i:i + batch].to(device))).flatten(1).float().cpu())
            return torch.cat(out)

        try:
            z = emb(self.native)
            za, zb = emb(self.view_a), emb(self.view_b)
        finally:
            for m, t in modes.items():
                m.training = t
        finite = bool(torch.isfinite(z).all() and torch.isfinite(za).all() and torch.isfinite(zb).all())
        return {"rankme": round(rankme(z), 2) if finite else None,  # the loss guard stops a diverged run, not the monitor
                "view_top1": round(view_top1(za, zb), 4) if finite else None, "n": len(z),
                "seconds": round(time.monotonic() - t0, 2)}


__all__ = ["Monitor", "native_tiles", "rankme", "recalibrate_bn", "view_top1"]

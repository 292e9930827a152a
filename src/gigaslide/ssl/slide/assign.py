"""Per-tile cluster ids of a slide-SSL run, recomputed from a slide's tile features (for the viewer).

* SLPD: each tile gets the id of its region's nearest prototype (cosine), the prototypes being the
  k-means (``prototypes`` per slide, the run's seed) of the slide's region embeddings by the exported
  teacher, as SLPD's intra-slide step computes them. Ids are per slide (prototype 2 of one slide is
  not prototype 2 of another); slides with fewer than ``2 * prototypes`` regions get none, as in training.
* Giga-SSL learns slide embeddings only; its per-tile output is the encoder's hidden state of each tile
  before pooling (tile reduction, plus the first sparse residual block at full resolution for
  SparseConvMIL), clustered by k-means into ``GIGASSL_CLUSTERS`` per slide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gigaslide import runs
from gigaslide.errors import GigaslideError
from gigaslide.ssl.slide.export import check_features, read_config
from gigaslide.ssl.slide.views import tile_cells

GIGASSL_CLUSTERS = 8


@dataclass
class TileClusters:
    ids: np.ndarray  # [N] int64 per tile, -1: none
    k: int  # number of ids
    method: str  # "slpd" or "gigassl"


def n_clusters(cfg: dict[str, Any]) -> int:
    return int(cfg["train"]["prototypes"]) if cfg["method"] == "slpd" else GIGASSL_CLUSTERS


def check_slide(run_dir: str | os.PathLike, cfg: dict[str, Any], ff: Any) -> None:
    """Refuse features the run cannot read, and SLPD slides with too few regions for prototypes (cheap: no model)."""
    check_features(run_dir, cfg["data"], ff.provenance, ff.path or ff.slide_id, ff.dim)
    k = n_clusters(cfg)
    if cfg["method"] == "slpd":
        from gigaslide.ssl.slide.regions import regions_of

        n = len(regions_of(ff, int(cfg["data"]["region_size"]), float(cfg["data"]["region_mpp"])))
        if n < 2 * k:
            raise GigaslideError(f"slide has {n} regions; SLPD gives prototypes to slides with at least {2 * k}",
                                 path=ff.path, fix="nothing to show for this slide (use a smaller --region-size in training)")
    elif len(ff) < k:
        raise GigaslideError(f"slide has {len(ff)} tiles, fewer than {k} clusters", path=ff.path, fix="nothing to show")


@runs.keeps_caller_rng
def tile_clusters(run_dir: str | os.PathLike, ff: Any, model: torch.nn.Module | None = None) -> TileClusters:
    """Per-tile ids of feature file ``ff`` under the slide-SSL run ``run_dir`` (``model``: its loaded encoder)."""
    cfg = read_config(run_dir)
    check_slide(run_dir, cfg, ff)
    k, seed = n_clusters(cfg), int(cfg["train"].get("seed", 0))
    if cfg["method"] == "slpd":
        from gigaslide.ssl.slide.prototypes import assign_nearest, slide_prototypes
        from gigaslide.ssl.slide.slpd import embed_regions, load_encoder

        enc = model if model is not None else load_encoder(run_dir)[0]
        emb, regs = embed_regions(enc, ff, cfg, per_region=True)
        centres, _ = slide_prototypes(emb, k, seed=seed)
        per_region = assign_nearest(emb, centres)
        ids = np.full(len(ff), -1, np.int64)
        for r, members in enumerate(regs.members):
            ids[members] = per_region[r]
        return TileClusters(ids, k, "slpd")
    from gigaslide.ssl.slide.gigassl import load_encoder

    enc = model if model is not None else load_encoder(run_dir)[0]
    return TileClusters(_kmeans(gigassl_tile_states(enc, ff), k, seed), k, "gigassl")


@torch.no_grad()
def gigassl_tile_states(encoder: torch.nn.Module, ff: Any) -> np.ndarray:
    """[N, hidden] per-tile hidden states of a Giga-SSL slide encoder (before any pooling)."""
    from gigaslide.ssl.slide.sparse import neighbour_index

    encoder.eval()
    x = torch.as_tensor(np.asarray(ff.features, np.float32))
    h = encoder.reduce(x)
    blocks = getattr(encoder, "blocks", None)
    if blocks:  # SparseConvMIL: the first residual block sees each tile's grid neighbours, at full resolution
        pos = torch.as_tensor(tile_cells(ff))
        h = blocks[0](h, neighbour_index(pos, torch.zeros(len(pos), dtype=torch.long), encoder.kernel_size))
    return h.float().numpy()


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    with threadpool_limits(1):
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(z).labels_.astype(np.int64)

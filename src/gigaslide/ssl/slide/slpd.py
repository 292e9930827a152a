"""SLPD (Yu et al., MICCAI 2023): slide-level prototypical distillation over regions.

Region encoder: a small HIPT-style ViT over a region's tile features (Linear -> + learned lattice
position embedding -> CLS + pre-norm Transformer -> CLS). Training: DINO self-distillation
(student/teacher, EMA; lightly ``DINOProjectionHead``, ``DINOLoss``, ``update_momentum``) with
feature-level views of a region = random tile subsets (2 global keeping 60-100 % of tiles, ``n_local``
local keeping 20-40 %). After ``warmup`` epochs, at the start of each epoch the teacher's region
embeddings are clustered per slide (k-means, ``prototypes`` per slide; slides with fewer than
``2 * prototypes`` regions are skipped), each slide is matched to its nearest slide by the
bipartite set distance of prototype sets, and two losses are added on the global views:
intra-slide (region -> its own prototype) and inter-slide (region -> its most similar prototype of
the matched slide), both as teacher-head-of-prototype -> student-head-of-region cross-entropy.

Slide embedding (:func:`embed_regions`): the mean of the teacher backbone's CLS embeddings of all
the slide's regions (all tiles, no augmentation).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from gigaslide.errors import GigaslideError, check_finite_loss
from gigaslide.features import store
from gigaslide.ssl.slide import run as runs
from gigaslide.ssl.slide.prototypes import assign_nearest, nearest_slides, prototype_distill_loss, slide_prototypes
from gigaslide.ssl.slide.regions import SlideRegions, pack, regions_of

RESUME_KEYS = ("method", "encoder", "data", "train")


class RegionViT(nn.Module):
    """Tile features of a region [R, T, D] + lattice index [R, T] + mask -> CLS embedding [R, dim]."""

    def __init__(self, in_dim: int, dim: int = 192, depth: int = 2, heads: int = 3, grid: int = 16, dropout: float = 0.0):
        super().__init__()
        self.grid, self.out_dim = grid, dim
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.pos = nn.Parameter(torch.zeros(grid * grid, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor, lattice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats) + self.pos[lattice.clamp(0, self.grid * self.grid - 1)]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        return self.norm(self.blocks(x, src_key_padding_mask=pad)[:, 0])


def _subset(mask: torch.Tensor, keep: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Random tile subsets of each region (at least one tile kept)."""
    r = torch.rand(mask.shape[0], 1, generator=g) * (keep[1] - keep[0]) + keep[0]
    m = mask & (torch.rand(mask.shape, generator=g) < r)
    first = mask.float().argmax(dim=1)
    m[torch.arange(len(m)), first] |= ~m.any(dim=1)
    return m


def _load_slides(features: str | os.PathLike, region_size: int, region_mpp: float):
    files = store.load_dir(features)
    slides: list[tuple[str, np.ndarray, SlideRegions]] = []
    for sid, ff in files.items():
        regs = regions_of(ff, region_size, region_mpp)
        if len(regs):
            slides.append((sid, ff.features.astype(np.float32), regs))
    if not slides:
        raise GigaslideError("no regions in these feature files", path=features, fix="check --features")
    return files, slides


@torch.no_grad()
def _region_embeddings(backbone: nn.Module, feats: np.ndarray, regs: SlideRegions, dev: torch.device, bs: int = 64) -> np.ndarray:
    out = []
    for s in range(0, len(regs), bs):
        f, p, m = pack(feats, regs, list(range(s, min(s + bs, len(regs)))))
        out.append(backbone(f.to(dev), p.to(dev), m.to(dev)).float().cpu().numpy())
    return np.concatenate(out)


def pretrain_slpd(features: str | os.PathLike, out: str | os.PathLike, *, region_size: int = 4096, region_mpp: float = 0.5,
                  prototypes: int = 4, epochs: int = 20, warmup: int = 5, batch_size: int = 64, lr: float = 5e-4,
                  weight_decay: float = 0.04, dim: int = 192, depth: int = 2, heads: int = 3, head_dim: int = 4096,
                  n_local: int = 4, momentum: float = 0.996, intra_weight: float = 1.0, inter_weight: float = 1.0,
                  seed: int = 0, device: str = "auto", stop_after: int | None = None, log=print) -> dict[str, Any]:  # noqa: ANN001
    """Pre-train (or resume) an SLPD region encoder on tile feature files; exports RUN/model.safetensors."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    files, slides = _load_slides(features, region_size, region_mpp)
    ff0 = next(iter(files.values()))
    grid = max(r.grid for _, _, r in slides)
    n_regions = sum(len(r) for _, _, r in slides)
    config = {
        "method": "slpd",
        "encoder": {"name": "region_vit", "in_dim": ff0.dim, "dim": dim, "depth": depth, "heads": heads, "grid": grid},
        "data": {"tile_encoder": ff0.encoder, "dim": ff0.dim, "mpp": ff0.mpp, "region_size": region_size,
                 "region_mpp": region_mpp, "n_slides": len(slides), "n_regions": n_regions},
        "train": {"epochs": epochs, "warmup": warmup, "prototypes": prototypes, "batch_size": batch_size, "lr": lr,
                  "weight_decay": weight_decay, "head_dim": head_dim, "n_local": n_local, "momentum": momentum,
                  "intra_weight": intra_weight, "inter_weight": inter_weight, "seed": seed},
        "features": str(features),
    }
    run, ck = runs.prepare(out, config, RESUME_KEYS)
    dev = runs.device_of(device)
    def make() -> nn.ModuleDict:
        torch.manual_seed(seed)
        return nn.ModuleDict({"backbone": RegionViT(ff0.dim, dim, depth, heads, grid),
                              "head": DINOProjectionHead(dim, 512, 128, head_dim)}).to(dev)

    student, teacher = make(), make()  # (weight-normed heads cannot be deep-copied)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    dino = DINOLoss(output_dim=head_dim, warmup_teacher_temp_epochs=max(1, warmup)).to(dev)
    start, history = 0, []
    if ck is not None:
        student.load_state_dict(ck["student"])
        teacher.load_state_dict(ck["teacher"])
        opt.load_state_dict(ck["optim"])
        dino.center.copy_(ck["center"])
        start, history = int(ck["epoch"]), list(ck.get("history", []))
        log(f"resuming {run} at epoch {start}/{epochs}")
    index = [(s, r) for s, (_, _, regs) in enumerate(slides) for r in range(len(regs))]
    t0, done_now = time.perf_counter(), 0
    base = history[-1]["seconds"] if history else 0.0  # training seconds are cumulative over resumes
    for epoch in range(start, epochs):
        if stop_after is not None and done_now >= stop_after:
            break
        rng = np.random.default_rng([seed, epoch])
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        targets = _prototype_targets(teacher["backbone"], slides, prototypes, dev, seed) if epoch >= warmup else None
        student.train()
        sums = {"dino": [], "intra": [], "inter": []}
        order = rng.permutation(len(index))
        for b in range(0, len(order), batch_size):
            items = [index[i] for i in order[b:b + batch_size]]
            f, p, m = _pack_items(slides, items)
            f, p, m = f.to(dev), p.to(dev), m.to(dev)
            glob = [_subset(m.cpu(), (0.6, 1.0), g).to(dev) for _ in range(2)]
            loc = [_subset(m.cpu(), (0.2, 0.4), g).to(dev) for _ in range(n_local)]
            with torch.no_grad():
                t_out = [teacher["head"](teacher["backbone"](f, p, gm)) for gm in glob]
            s_emb = [student["backbone"](f, p, vm) for vm in glob + loc]
            s_out = [student["head"](e) for e in s_emb]
            loss = dino(t_out, s_out, epoch=epoch)
            sums["dino"].append(float(loss.detach()))
            if targets is not None:
                for name, w in (("intra", intra_weight), ("inter", inter_weight)):
                    ok = [k for k, it in enumerate(items) if it in targets[name]]
                    if ok and w > 0:
                        protos = torch.as_tensor(np.stack([targets[name][items[k]] for k in ok]), dtype=torch.float32, device=dev)
                        with torch.no_grad():
                            t_logit = teacher["head"](protos)
                        li = sum(prototype_distill_loss(s_out[v][ok], t_logit, teacher_temp=dino.teacher_temp, center=dino.center)
                                 for v in range(2)) / 2
                        loss = loss + w * li
                        sums[name].append(float(li.detach()))
            check_finite_loss(loss, f"epoch {epoch}", run)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_momentum(student, teacher, m=momentum)
        history.append({"epoch": epoch + 1, **{k: float(np.mean(v)) if v else None for k, v in sums.items()},
                        "seconds": base + time.perf_counter() - t0})
        runs.save_checkpoint(run, {"student": student.state_dict(), "teacher": teacher.state_dict(),
                                   "optim": opt.state_dict(), "center": dino.center.detach().cpu(),
                                   "epoch": epoch + 1, "history": history})
        done_now += 1
        h = history[-1]
        log(f"epoch {epoch + 1}/{epochs} dino {h['dino']:.4f}"
            + (f" intra {h['intra']:.4f}" if h["intra"] is not None else "")
            + (f" inter {h['inter']:.4f}" if h["inter"] is not None else ""))
    finished = bool(history) and history[-1]["epoch"] >= epochs
    if finished:
        runs.export(run, teacher["backbone"], history)
    return {"run": str(run), "finished": finished, "history": history, "seconds": base + time.perf_counter() - t0}


def _pack_items(slides, items):  # noqa: ANN001, ANN202
    fs, ps, ms = [], [], []
    for s, r in items:
        _, feats, regs = slides[s]
        f, p, m = pack(feats, regs, [r])
        fs.append(f[0]), ps.append(p[0]), ms.append(m[0])
    t = max(len(x) for x in fs)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, 0, 0, t - len(x)) if x.ndim == 2 else (0, t - len(x)), value=v)  # noqa: E731
    return torch.stack([pad(x, 0.0) for x in fs]), torch.stack([pad(x, 0) for x in ps]), torch.stack([pad(x, False) for x in ms])


def _prototype_targets(backbone: nn.Module, slides, k: int, dev: torch.device, seed: int) -> dict[str, dict]:  # noqa: ANN001
    """{"intra": {(slide, region): prototype}, "inter": {...}} from the current teacher backbone."""
    backbone.eval()
    embs = [_region_embeddings(backbone, feats, regs, dev) for _, feats, regs in slides]
    fits = [slide_prototypes(e, k, seed=seed) for e in embs]
    scale = [float(np.linalg.norm(e, axis=1).mean()) for e in embs]  # centres back at the embeddings' norm
    protos = [None if fit is None else fit[0] * scale[s] for s, fit in enumerate(fits)]
    partner = nearest_slides(protos)
    intra, inter = {}, {}
    for s, fit in enumerate(fits):
        if fit is None:
            continue
        centres, labels = protos[s], fit[1]
        for r, lab in enumerate(labels):
            intra[(s, r)] = centres[lab]
        j = partner[s]
        if j >= 0:
            near = assign_nearest(embs[s], protos[j])
            for r, c in enumerate(near):
                inter[(s, r)] = protos[j][c]
    return {"intra": intra, "inter": inter}


def load_encoder(run: str | os.PathLike) -> tuple[nn.Module, dict]:
    cfg = runs.read_config(run)
    e = cfg["encoder"]
    enc = RegionViT(e["in_dim"], e["dim"], e["depth"], e["heads"], e["grid"])
    return runs.load_weights(run, enc), cfg


@torch.no_grad()
def embed_regions(backbone: nn.Module, ff, cfg: dict, device: torch.device = torch.device("cpu")) -> np.ndarray:  # noqa: ANN001
    """Slide embedding = mean of the region CLS embeddings (all tiles, no augmentation)."""
    d = cfg["data"]
    regs = regions_of(ff, int(d["region_size"]), float(d["region_mpp"]))
    return _region_embeddings(backbone, ff.features.astype(np.float32), regs, device).mean(0)

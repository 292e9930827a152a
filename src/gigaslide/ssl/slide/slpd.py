"""SLPD (Yu et al., MICCAI 2023): slide-level prototypical distillation over regions.

Region encoder: a small HIPT-style ViT over a region's tile features (standardised with the
training set's per-dimension mean / sd -> Linear -> + learned lattice position embedding -> CLS +
pre-norm Transformer -> CLS). Training: DINO self-distillation (student / teacher EMA; lightly
``DINOProjectionHead``, ``DINOLoss``, ``update_momentum``) over *feature-grid crops* of a region:
``n_global`` (2) contiguous sub-grids covering 50-100 % of the region side and ``n_local`` (8)
covering 20-45 % (:func:`.regions.grid_crop`). ``losses``: ``dino`` (DINO only, the ablation),
``dino+intra`` or ``dino+intra+inter`` (default). After ``warmup`` epochs, each epoch starts by
clustering every slide's teacher region embeddings (k-means, ``prototypes`` per slide; slides with
fewer than ``2 * prototypes`` regions are skipped) and matching each slide to its nearest slide by
the bipartite set distance of prototype sets (:mod:`.prototypes`); intra-slide (region -> its own
prototype) and inter-slide (region -> the most similar prototype of the matched slide) terms are
added on the global crops.

Other differences from the authors' code (Carboxy/SLPD), kept on purpose (the recorded SLPD results use them): the
teacher EMA momentum is constant (``momentum``), not DINO's cosine ramp 0.996 -> 1; prototypes are k-means of the
teacher *backbone* embeddings passed through the whole teacher head (the authors cluster the head's bottleneck output
and apply its last layer); an inter-slide target is the matched slide's prototype nearest the *region* (the authors
take the one nearest the region's own prototype); the prototype terms use the DINO loss's centre and the student's
global crops (the authors': a centre of their own, every crop).

Collapse guards: teacher temperature warm-up (``warmup_teacher_temp`` -> ``teacher_temp`` over
``teacher_temp_epochs``), a modest head (``head_dim`` 1024), input standardisation, and a monitor
logged every epoch — teacher per-sample entropy and entropy of the batch-mean teacher distribution
(both / log K) and KL(teacher || student). A run whose teacher ends near uniform (per-sample entropy
> 0.95 log K: the old log(4096) plateau) or on one output (batch-mean entropy < 0.05 log K) is
named COLLAPSED in the log and in ``run.json`` (``collapse``).

Checkpoints (gigaslide.runs) at every epoch end: student, teacher, DINO centre, optimiser, all RNG
states; a stop (Stopper / kill) resumes bit-exactly from the last finished epoch.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gigaslide import runs
from gigaslide.devices import pick_device
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.stats import STD_FLOOR, feature_stats, nonfinite_rows
from gigaslide.ssl.slide.export import data_record, export_model, read_config
from gigaslide.ssl.slide.gigassl import check_loss, lr_at
from gigaslide.ssl.slide.prototypes import assign_nearest, nearest_slides, prototype_distill_loss, slide_prototypes
from gigaslide.ssl.slide.regions import SlideRegions, compact, grid_crop, pack, regions_of
from gigaslide.ssl.slide.views import refuse_nonfinite
from gigaslide.ssl.tile.methods import weight_norm_head

LOSSES = ("dino", "dino+intra", "dino+intra+inter")


@dataclass
class SLPDConfig:
    region_size: int = 4096
    region_mpp: float = 0.5
    prototypes: int = 4
    losses: str = "dino+intra+inter"
    epochs: int = 20
    warmup: int = 5  # epochs of DINO only before the prototype terms
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.04
    dim: int = 192
    depth: int = 2
    heads: int = 3
    head_dim: int = 1024
    n_global: int = 2
    n_local: int = 8
    global_crop: tuple[float, float] = (0.5, 1.0)
    local_crop: tuple[float, float] = (0.2, 0.45)
    momentum: float = 0.99
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.06
    teacher_temp_epochs: int = 5
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    seed: int = 0


class RegionViT(nn.Module):
    """Tile features of a region [R, T, D] + lattice index [R, T] + mask -> CLS embedding [R, dim]."""

    def __init__(self, in_dim: int, dim: int = 192, depth: int = 2, heads: int = 3, grid: int = 16, dropout: float = 0.0):
        super().__init__()
        self.grid, self.out_dim = grid, dim
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.pos = nn.Parameter(torch.zeros(grid * grid, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor, lattice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj((feats - self.in_mean) / self.in_std) + self.pos[lattice.clamp(0, self.grid * self.grid - 1)]
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        return self.norm(self.blocks(x, src_key_padding_mask=pad)[:, 0])


#: The run folder's sub-folder holding the memory-mapped copy of the cohort's tile features while a run trains.
SPILL = ".features-mmap"
#: Free space kept beyond the memory-mapped copy (:func:`mapped`).
SPILL_MARGIN = 64 << 20


def scan_slides(features: str | os.PathLike, region_size: int, region_mpp: float):  # noqa: ANN201
    """(files, slides, (mean, std)) of a feature folder in one pass that holds one slide's features at a time: the
    files (features not loaded), ``slides`` = [(slide id, its features, read when used, regions)] of the slides with
    regions, and the input standardisation over their tiles; refuses NaN / inf tiles (naming every such file) and a
    folder without regions. SLPD held every slide's features in memory from here on (the cohort's size: 157 MB of
    features, +218 MB peak at 400 slides); training reads them from :func:`mapped`."""
    files = store.load_dir(features, arrays=False)  # refuses mixed encoders / weights / mpp / tile size
    regs = {sid: regions_of(ff, region_size, region_mpp) for sid, ff in files.items()}  # coords only
    slides = [(sid, ff.features, regs[sid]) for sid, ff in files.items() if len(regs[sid])]
    bad: list[tuple[Any, int]] = []

    def arrays():  # noqa: ANN202
        for sid, ff in files.items():
            a = np.asarray(ff.features)  # stored dtype (float16 costs half); pack() makes float32
            if n := nonfinite_rows(a):
                bad.append((ff.path or sid, n))
            if len(regs[sid]):
                yield a

    if slides:
        stats = feature_stats(arrays())
    else:  # still every file's NaN check, which is said first
        stats = None
        for _ in arrays():
            pass
    refuse_nonfinite(bad, features)  # a NaN tile made the loss NaN at epoch 0 ("lower --lr")
    if not slides:
        raise GigaslideError("no regions in these feature files", path=features, fix="check --features")
    return files, slides, stats


def load_slides(features: str | os.PathLike, region_size: int, region_mpp: float):  # noqa: ANN201
    """(files, slides) of :func:`scan_slides` (each slide's features read when used)."""
    files, slides, _ = scan_slides(features, region_size, region_mpp)
    return files, slides


def mapped(run_dir: Path, slides, log) -> list:  # noqa: ANN001
    """``slides`` with their features memory-mapped from a copy in ``RUN/.features-mmap`` (one file per dtype,
    written one slide at a time, then unlinked: the mapping keeps it until the process ends, even killed; a copy a
    kill left mid-write is removed by the next run): the cohort's features are paged in from disk as batches need
    them and given back under memory pressure, instead of all held in the process's memory. The same arrays (stored
    dtype, same values), so the same run. Without room for the copy on the run's disk, the features are held in
    memory as before (said in one line)."""
    folder = run_dir / SPILL
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's (the run's lock is held: no other live writer)
    need = sum(f.nbytes for _, f, _ in slides)
    try:
        st = os.statvfs(run_dir)
        room = st.f_bavail * st.f_frsize >= need + SPILL_MARGIN
    except (OSError, AttributeError):
        room = False
    why = f"no room for it ({need / 1e9:.2f} GB) in {run_dir}"
    if room:
        try:
            return _map(folder, slides)
        except OSError as e:  # the disk filled up after all, or the folder cannot be written
            why = f"{str(e).splitlines()[0] if str(e) else type(e).__name__} in {folder}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the mapped files are unlinked: their pages stay mapped
    log(f"warning: cannot memory-map a copy of the tile features ({why}): they are held in memory")
    return [(sid, np.asarray(f), regs) for sid, f, regs in slides]


def _map(folder: Path, slides) -> list:  # noqa: ANN001
    """:func:`mapped`'s copy: each dtype's slides one after another in ``folder/<dtype>.bin``, mapped read-only."""
    folder.mkdir()
    by_dtype: dict[np.dtype, list[int]] = {}
    for k, (_, f, _) in enumerate(slides):
        by_dtype.setdefault(np.dtype(f.dtype), []).append(k)
    out = list(slides)
    for dt, ks in by_dtype.items():
        path, rows = folder / f"{dt.name}.bin", []
        with open(path, "wb") as fh:
            for k in ks:  # one slide in memory at a time
                a = np.ascontiguousarray(np.asarray(slides[k][1]))
                rows.append(len(a))
                a.tofile(fh)
        d = int(slides[ks[0]][1].shape[1])
        mm = np.memmap(path, dtype=dt, mode="r", shape=(sum(rows), d))  # every slide here has regions: rows > 0
        start = 0
        for k, n in zip(ks, rows):
            sid, _, regs = slides[k]
            out[k] = (sid, mm[start:start + n], regs)
            start += n
    return out


@torch.no_grad()
def region_embeddings(backbone: nn.Module, feats: np.ndarray, regs: SlideRegions, dev: torch.device, bs: int = 64) -> np.ndarray:
    """CLS embedding of every region of one slide (all its tiles) [R, dim]."""
    backbone.eval()
    out = []
    for s in range(0, len(regs), bs):
        f, p, m = pack(feats, regs, list(range(s, min(s + bs, len(regs)))), grid=getattr(backbone, "grid", None))
        out.append(backbone(f.to(dev), p.to(dev), m.to(dev)).float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def teacher_stats(t_out: list[torch.Tensor], s_out: list[torch.Tensor], center: torch.Tensor, temp: float,
                  student_temp: float = 0.1) -> dict[str, float]:
    """Collapse monitor of one step: teacher per-sample entropy and batch-mean entropy (both / log K) and
    KL(teacher || student) of the same crops, with the teacher centred and sharpened as the DINO loss does."""
    k = t_out[0].shape[-1]
    t = torch.softmax((torch.stack(t_out).float() - center.float()) / temp, dim=-1)  # [V, B, K]
    s = torch.log_softmax(torch.stack(s_out[: len(t_out)]).float() / student_temp, dim=-1)
    logt = torch.log(t.clamp_min(1e-12))
    ent = float(-(t * logt).sum(-1).mean()) / math.log(k)
    mean = t.reshape(-1, k).mean(0)
    marg = float(-(mean * torch.log(mean.clamp_min(1e-12))).sum()) / math.log(k)
    kl = float((t * (logt - s)).sum(-1).mean())
    return {"teacher_entropy": ent, "teacher_batch_entropy": marg, "kl": kl}


def collapse_verdict(stats: dict[str, float]) -> str | None:
    """``uniform`` / ``single-output`` / None from an epoch's mean :func:`teacher_stats`."""
    if stats["teacher_entropy"] > 0.95:
        return "uniform"
    if stats["teacher_batch_entropy"] < 0.05:
        return "single-output"
    return None


def slide_partners(backbone: nn.Module, slides, k: int, dev: torch.device, seed: int):  # noqa: ANN001, ANN201
    """(region embeddings, k-means fits, scaled prototypes, nearest-slide partner) from ``backbone``."""
    embs = [region_embeddings(backbone, feats, regs, dev) for _, feats, regs in slides]
    fits = [slide_prototypes(e, k, seed=seed) for e in embs]
    scale = [float(np.linalg.norm(e, axis=1).mean()) for e in embs]  # centres back at the embeddings' norm
    protos = [None if fit is None else fit[0] * scale[s] for s, fit in enumerate(fits)]
    return embs, fits, protos, nearest_slides(protos)


def prototype_targets(backbone: nn.Module, slides, k: int, dev: torch.device, seed: int) -> dict[str, dict]:  # noqa: ANN001
    """{"intra": {(slide, region): prototype}, "inter": {...}} from the current teacher backbone."""
    embs, fits, protos, partner = slide_partners(backbone, slides, k, dev, seed)
    intra, inter = {}, {}
    for s, fit in enumerate(fits):
        if fit is None:
            continue
        for r, lab in enumerate(fit[1]):
            intra[(s, r)] = protos[s][lab]
        j = partner[s]
        if j >= 0:
            for r, c in enumerate(assign_nearest(embs[s], protos[j])):
                inter[(s, r)] = protos[j][c]
    return {"intra": intra, "inter": inter}


def _pack_items(slides, items, grid: int):  # noqa: ANN001, ANN202
    fs, ps, ms = [], [], []
    for s, r in items:
        _, feats, regs = slides[s]
        f, p, m = pack(feats, regs, [r], grid=grid)  # the model's lattice, not the slide's
        fs.append(f[0]), ps.append(p[0]), ms.append(m[0])
    t = max(len(x) for x in fs)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, 0, 0, t - len(x)) if x.ndim == 2 else (0, t - len(x)), value=v)  # noqa: E731
    return torch.stack([pad(x, 0.0) for x in fs]), torch.stack([pad(x, 0) for x in ps]), torch.stack([pad(x, False) for x in ms])


def _make(in_dim: int, cfg: SLPDConfig, grid: int, dev: torch.device, stats: tuple[np.ndarray, np.ndarray]) -> nn.ModuleDict:
    from lightly.models.modules import DINOProjectionHead

    torch.manual_seed(cfg.seed)
    m = nn.ModuleDict({"backbone": RegionViT(in_dim, cfg.dim, cfg.depth, cfg.heads, grid),
                       "head": weight_norm_head(DINOProjectionHead, cfg.dim, 512, 128, cfg.head_dim)})
    m["backbone"].in_mean.copy_(torch.from_numpy(stats[0]))
    m["backbone"].in_std.copy_(torch.from_numpy(stats[1]))
    return m.to(dev)


#: Largest region lattice (cells per side) a run takes: its position embedding is cells^2 x dim (HIPT: 16 x 16;
#: 256: 50 MB at dim 192, 16 px tiles in a 4096 px region).
MAX_GRID = 256


def check_config(cfg: SLPDConfig) -> None:
    """One line for an option the run could not use, before any work: each of these failed deep inside as a bare
    error (sklearn's KMeans for ``--prototypes 0``, a division by zero for ``--batch-size 0``, torch's assertion for a
    width not divisible by the heads, "cannot convert float NaN to integer" for a NaN region mpp), or trained a
    nonsense run without a word (``--epochs 0`` exported the untrained encoder as finished; a teacher momentum above
    1 moves the teacher away from the student)."""
    if cfg.losses not in LOSSES:
        raise GigaslideError(f"--losses {cfg.losses!r}", fix=f"use one of {', '.join(LOSSES)}")
    if cfg.head_dim < 2:  # the collapse monitor divides by log K; one output is collapse by construction
        raise GigaslideError(f"--head-dim {cfg.head_dim} must be >= 2", fix="use e.g. --head-dim 1024")
    for opt, t in (("--teacher-temp", cfg.teacher_temp), ("warmup_teacher_temp", cfg.warmup_teacher_temp)):
        if not t > 0:  # the teacher's softmax divides by it
            raise GigaslideError(f"{opt} {t} must be positive", fix="use e.g. --teacher-temp 0.06")
    for opt, v, least, eg in (("--prototypes", cfg.prototypes, 1, "4 (NSCLC; 2 BRCA)"),
                              ("--epochs", cfg.epochs, 1, "20"), ("--batch-size", cfg.batch_size, 1, "64"),
                              ("--region-size", cfg.region_size, 1, "4096"), ("dim", cfg.dim, 1, "192"),
                              ("depth", cfg.depth, 1, "2"), ("heads", cfg.heads, 1, "3"),
                              ("n_global", cfg.n_global, 1, "2"), ("--n-local", cfg.n_local, 0, "8"),
                              ("--warmup", cfg.warmup, 0, "5"),
                              ("teacher_temp_epochs", cfg.teacher_temp_epochs, 0, "5")):
        if v < least:
            raise GigaslideError(f"{opt} {v} must be >= {least}", fix=f"use e.g. {opt} {eg}")
    if cfg.dim % cfg.heads:
        raise GigaslideError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}", fix="use e.g. dim 192, heads 3")
    if not (math.isfinite(cfg.region_mpp) and cfg.region_mpp > 0):
        raise GigaslideError(f"--region-mpp {cfg.region_mpp} must be a positive number",
                             fix="use e.g. --region-mpp 0.5")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):  # 0: a run that does not learn (a control)
        raise GigaslideError(f"--lr {cfg.lr} must be a number >= 0", fix="use e.g. --lr 5e-4")
    if not 0 <= cfg.momentum <= 1:
        raise GigaslideError(f"momentum {cfg.momentum} must be in [0, 1] (teacher EMA)", fix="use e.g. momentum 0.99")
    for opt, (lo, hi) in (("global_crop", cfg.global_crop), ("local_crop", cfg.local_crop)):
        if not 0 < lo <= hi <= 1:
            raise GigaslideError(f"{opt} ({lo}, {hi}) must be fractions 0 < low <= high <= 1 of the region side",
                                 fix=f"use e.g. {opt} (0.5, 1.0)")


@runs.keeps_caller_rng
def pretrain_slpd(features: str | os.PathLike, out: str | os.PathLike, cfg: SLPDConfig | None = None, *,
                  device: str = "auto", budget: str | float | None = None, stop_after: int | None = None,
                  log=print, **overrides: Any) -> dict[str, Any]:  # noqa: ANN001
    """Pre-train (or resume) an SLPD region encoder on tile feature files; exports RUN/model.safetensors.
    ``stop_after``: stop after this many epochs in this call (tests simulate an interruption)."""
    from lightly.loss import DINOLoss
    from lightly.models.utils import update_momentum

    cfg = SLPDConfig(**{**asdict(cfg or SLPDConfig()), **overrides})
    check_config(cfg)
    budget_s = runs.parse_duration(budget)  # a bad --budget is one line before a run folder is made
    files, slides, stats = scan_slides(features, cfg.region_size, cfg.region_mpp)  # one slide in memory at a time
    ff0 = next(iter(files.values()))
    grid = max(r.grid for _, _, r in slides)
    if grid > MAX_GRID:  # the position embedding alone was grid^2 x dim (--region-size 1e9: 15 PB asked for)
        raise GigaslideError(f"a region of --region-size {cfg.region_size} px at {cfg.region_mpp} µm/px is {grid} "
                             f"tiles wide (at most {MAX_GRID})", path=features,
                             fix="use a region of a few thousand px (SLPD / HIPT: --region-size 4096 at 0.5 µm/px)")
    if (stats[1] <= STD_FLOOR).all():  # every tile of every slide the same: every slide was embedded alike, unflagged
        raise GigaslideError(f"every tile feature is the same in all {len(slides)} slides (std 0 in every dimension): "
                             "there is nothing to learn and every slide would get the same embedding", path=features,
                             fix="check the tile encoder (a broken --weights file gives one output for every tile) "
                                 "and re-encode the slides")
    data = {**data_record(ff0.provenance), "dim": ff0.dim, "region_size": cfg.region_size, "region_mpp": cfg.region_mpp,
            "n_slides": len(slides), "n_regions": sum(len(r) for _, _, r in slides)}
    enc = {"name": "region_vit", "in_dim": ff0.dim, "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "grid": grid}
    config = {"encoder": enc, "data": data, "train": asdict(cfg), "features": str(features)}
    run = runs.open_run(out, "slpd", {"encoder": enc, "data": data, "train": asdict(cfg)}, config, seed=cfg.seed,
                        inputs={"features": features}, provenance={**ff0.provenance.to_dict(), "run": str(out)},
                        caches=(SPILL,))  # a killed run's memory-mapped features are not results
    slides = mapped(run.dir, slides, log)  # memory-mapped: not the cohort in memory
    dev = pick_device(device)
    student, teacher = _make(ff0.dim, cfg, grid, dev, stats), _make(ff0.dim, cfg, grid, dev, stats)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dino = DINOLoss(output_dim=cfg.head_dim, warmup_teacher_temp=cfg.warmup_teacher_temp, teacher_temp=cfg.teacher_temp,
                    warmup_teacher_temp_epochs=max(1, cfg.teacher_temp_epochs)).to(dev)
    rng = np.random.default_rng([cfg.seed, 3])
    epoch, history = 0, []
    ck = run.load()
    if ck is not None:
        runs.load_module_state(student, ck["student"], run.dir)
        runs.load_module_state(teacher, ck["teacher"], run.dir)
        runs.load_module_state(dino, ck["dino"], run.dir)
        opt.load_state_dict(ck["optimizer"])
        runs.set_rng_state(ck["rng"])
        rng.bit_generator.state = ck["gen"]
        epoch, history = int(ck["epoch"]), list(ck["history"])
        log(f"resuming {run.dir} at epoch {epoch}/{cfg.epochs}")
    index = [(s, r) for s, (_, _, regs) in enumerate(slides) for r in range(len(regs))]
    steps_per_epoch = math.ceil(len(index) / cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, min(cfg.warmup, cfg.epochs) * steps_per_epoch
    use = {"intra": "intra" in cfg.losses, "inter": "inter" in cfg.losses}
    weight = {"intra": cfg.intra_weight, "inter": cfg.inter_weight}
    if ck is None and (use["intra"] or use["inter"]):
        _warn_prototype_losses(run, slides, cfg, log)
    stopped, done_now = None, 0
    with runs.Stopper(budget_s, elapsed_s=history[-1]["seconds"] if history else 0.0) as stopper:
        while epoch < cfg.epochs:
            if stop_after is not None and done_now >= stop_after:
                stopped = "stop_after"
                break
            # DINO's schedule (linspace over teacher_temp_epochs, then constant); 0 epochs: no warm-up (lightly's
            # schedule of max(1, 0) = 1 epoch ran epoch 0 at warmup_teacher_temp)
            temp = float(dino.teacher_temp_schedule[epoch]) if epoch < cfg.teacher_temp_epochs else cfg.teacher_temp
            targets = (prototype_targets(teacher["backbone"], slides, cfg.prototypes, dev, cfg.seed)
                       if epoch >= cfg.warmup and (use["intra"] or use["inter"]) else None)
            student.train()
            sums: dict[str, list[float]] = {k: [] for k in ("dino", "intra", "inter", "teacher_entropy",
                                                             "teacher_batch_entropy", "kl")}
            order = rng.permutation(len(index))
            for b in range(steps_per_epoch):
                stopped = stopper.reason()
                if stopped:
                    break
                items = [index[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                f, p, m = _pack_items(slides, items, grid)
                crops = ([grid_crop(p, m, grid, cfg.global_crop, rng) for _ in range(cfg.n_global)]
                         + [grid_crop(p, m, grid, cfg.local_crop, rng) for _ in range(cfg.n_local)])
                f, p = f.to(dev), p.to(dev)
                with torch.no_grad():
                    t_out = [teacher["head"](teacher["backbone"](*compact(f, p, c.to(dev)))) for c in crops[: cfg.n_global]]
                s_out = [student["head"](student["backbone"](*compact(f, p, c.to(dev)))) for c in crops]
                for k2, v in teacher_stats(t_out, s_out, dino.center, temp).items():
                    sums[k2].append(v)
                loss = dino(t_out, s_out, teacher_temp=temp)
                sums["dino"].append(float(loss.detach()))
                for name in ("intra", "inter"):
                    ok = [k for k, it in enumerate(items) if targets is not None and use[name] and it in targets[name]]
                    if ok and weight[name] > 0:
                        protos = torch.as_tensor(np.stack([targets[name][items[k]] for k in ok]), dtype=torch.float32, device=dev)
                        with torch.no_grad():
                            t_logit = teacher["head"](protos)
                        li = sum(prototype_distill_loss(s_out[v][ok], t_logit, teacher_temp=temp, center=dino.center)
                                 for v in range(cfg.n_global)) / cfg.n_global
                        loss = loss + weight[name] * li
                        sums[name].append(float(li.detach()))
                check_loss(loss, f"epoch {epoch + 1} step {b + 1}", run.dir)
                for g in opt.param_groups:
                    g["lr"] = lr_at(epoch * steps_per_epoch + b, total, warm, cfg.lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                update_momentum(student, teacher, m=cfg.momentum)
            if stopped:
                break
            epoch += 1
            h = {"epoch": epoch, **{k: float(np.mean(v)) if v else None for k, v in sums.items()},
                 "teacher_temp": temp, "seconds": stopper.elapsed}
            h["collapse"] = collapse_verdict(h)
            history.append(h)
            run.save({"student": runs.module_state(student), "teacher": runs.module_state(teacher),
                      "dino": runs.module_state(dino), "optimizer": opt.state_dict(), "rng": runs.rng_state(),
                      "gen": rng.bit_generator.state, "epoch": epoch, "history": history})
            done_now += 1
            log(f"epoch {epoch}/{cfg.epochs} dino {h['dino']:.4f}"
                + (f" intra {h['intra']:.4f}" if h["intra"] is not None else "")
                + (f" inter {h['inter']:.4f}" if h["inter"] is not None else "")
                + f" | teacher entropy {h['teacher_entropy']:.3f} logK, batch-mean {h['teacher_batch_entropy']:.3f} logK,"
                  f" KL {h['kl']:.3f}" + (f" | {h['collapse']} collapse" if h["collapse"] else ""))
    finished = stopped is None and epoch >= cfg.epochs
    seconds = stopper.elapsed
    if finished:
        export_model(run.dir, {k: v for k, v in runs.module_state(teacher["backbone"]).items()
                               if not k.startswith(runs.BUFFER_PREFIX)}, history)
        verdict = history[-1]["collapse"] if history else None
        collapse = {"collapsed": verdict is not None, "kind": verdict,
                    "teacher_entropy": history[-1]["teacher_entropy"] if history else None,
                    "teacher_batch_entropy": history[-1]["teacher_batch_entropy"] if history else None}
        run.update(history=history, collapse=collapse)
        run.finish(epochs=epoch, seconds=seconds, collapsed=collapse["collapsed"], collapse_kind=verdict,
                   final_dino=history[-1]["dino"] if history else None)
        if verdict:
            log(f"COLLAPSED ({verdict} teacher: entropy {collapse['teacher_entropy']:.3f} log K, batch-mean "
                f"{collapse['teacher_batch_entropy']:.3f} log K): the region embeddings carry little information; "
                "try a lower --teacher-temp, a smaller --head-dim or more epochs")
    else:
        run.update(status="stopped", stop_reason=stopped, history=history)
    return {"run": str(run.dir), "finished": finished, "history": history, "seconds": seconds, "stopped": stopped,
            "collapse": history[-1]["collapse"] if history else None}


def _warn_prototype_losses(run: runs.Run, slides, cfg: SLPDConfig, log) -> None:  # noqa: ANN001
    """Say when the prototype losses of ``cfg.losses`` cannot act (they would be silently left out): slides with fewer
    than ``2 * prototypes`` regions get no prototypes, inter needs two such slides, and they start after ``warmup``
    epochs; ``run.json`` records ``prototype_slides`` (how many slides have them)."""
    need = 2 * cfg.prototypes
    short = [sid for sid, _, regs in slides if len(regs) < need]
    ok = len(slides) - len(short)
    run.update(prototype_slides={"with_prototypes": ok, "of": len(slides), "min_regions": need})
    where = f"regions of {cfg.region_size} px at {cfg.region_mpp} µm/px"
    if ok == 0:
        most = max(len(regs) for _, _, regs in slides)
        log(f"warning: no slide has the {need} {where} that --prototypes {cfg.prototypes} needs (at most {most}): "
            f"no prototype loss ever applies, this run is DINO only (as --losses dino); use a smaller --region-size "
            "or fewer --prototypes")
    elif short:
        log(f"warning: {len(short)} of {len(slides)} slides have fewer than {need} {where} (e.g. {short[0]}): no "
            "prototype losses on their regions" + ("; only one slide has prototypes: no inter-slide loss"
                                                     if ok == 1 and "inter" in cfg.losses else ""))
    if cfg.warmup >= cfg.epochs and ok:
        log(f"warning: --warmup {cfg.warmup} >= --epochs {cfg.epochs}: the prototype losses never start, this run is "
            "DINO only (as --losses dino); use more --epochs or a shorter --warmup")


@runs.keeps_caller_rng
def load_encoder(run: str | os.PathLike) -> tuple[nn.Module, dict]:
    from gigaslide.ssl.slide.export import load_weights

    cfg = read_config(run)
    e = cfg["encoder"]
    return load_weights(run, RegionViT(e["in_dim"], e["dim"], e["depth"], e["heads"], e["grid"])), cfg


@torch.no_grad()
def embed_regions(backbone: nn.Module, ff, cfg: dict, device: torch.device = torch.device("cpu"),  # noqa: ANN001
                  per_region: bool = False) -> np.ndarray | tuple[np.ndarray, SlideRegions]:
    """Slide embedding = mean of the region CLS embeddings (all tiles, no augmentation); with
    ``per_region`` the [R, dim] region embeddings and the regions themselves."""
    d = cfg["data"]
    regs = regions_of(ff, int(d["region_size"]), float(d["region_mpp"]))
    emb = region_embeddings(backbone, ff.features, regs, device)  # pack() makes each batch float32
    return (emb, regs) if per_region else emb.mean(0)

"""GPU check of tile SSL against random init (issue #19): `pretrain --method mocov2` ResNet-18 on PCam train tiles at
96 px for a short fixed budget on the device, then the linear probe of benchmarks/bench_tile_ssl.py on PCam valid.

    .venv/bin/python benchmarks/gpu_tile_ssl.py --mode tiny --out /tmp/gpu_tile_ssl.md   # CPU, seconds (CI)
    .venv/bin/python benchmarks/gpu_tile_ssl.py --mode full --out benchmarks/results/gpu_tile_ssl.md   # a lent GPU

``full``: bench_tile_ssl.py's protocol on CUDA, only shorter: ``pretrain --method mocov2 --backbone resnet18
--tile-size 96 --budget 40s`` on the PCam train tiles under the shared data (``$GIGASLIDE_SHARED_DATA``,
``../shared/data``, or what gpu_prepare.sh carried in ``.gpu/data``), with the command's own defaults otherwise
(batch 64, 64-px crops, lr, ``--precision auto`` and loader workers as it resolves them on the device; ``--batch-size
256`` is the choice to try next on a GPU, not the default measured here). Probes on frozen features at the native 96
px (bench_tile_ssl's own ``probe`` / ``paired``: logistic regression with C on a validation split, and k-NN),
fitted on up to 2,000 balanced PCam train tiles and scored on the PCam valid tiles there; 95 % bootstrap CIs and a
paired bootstrap of Δ vs the same ResNet-18 with random weights on the same valid tiles; the verdict against the
issue's goal (Δ ≥ +0.05 with disjoint CIs) is bench_tile_ssl's ``goal_lines`` on these rows. The budget is short so
the section fits gpu_check.sh's 90-s share (``--limit``, default 90 s in full mode): when the random-init row took so
long that the SSL row would not finish within the limit, the budget is cut to what is left (the report says so).
``--budget 15m --limit 0`` runs the issue's 15 minutes. ``tiny``: the same code on CPU with the tiny test ResNet on
generated noisy tiles, so CI keeps it running (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from bench_tile_ssl import PCAM_MPP, ci, dci, goal_lines, load_split, paired, probe, random_trunk  # noqa: E402

MODES = {
    "tiny": {"backbone": "test_resnet", "tile": 32, "budget_s": 3.0, "batch": 8, "workers": 0, "probe_train": None,
             "valid": None, "bootstrap": 200, "tiles_per_class": (40, 40), "limit_s": 0.0},
    "full": {"backbone": "resnet18", "tile": 96, "budget_s": 40.0, "batch": None, "workers": None, "probe_train": 2000,
             "valid": None, "bootstrap": 1000, "tiles_per_class": None, "limit_s": 90.0},
}
#: seconds `pretrain` spends beside its budget on a GPU (loader start, monitor points, export), and a margin for the
#: interpreter's start before this script's clock: kept free when the budget is fitted into ``--limit``
PRETRAIN_EXTRA_S, MARGIN_S = 15.0, 8.0
HEADER = ("| encoder | steps done / planned | train img/s | batch, crop px, lr, precision, loader workers | wall s "
          "| linear bal. acc. [95 % CI] | Δ linear bal. acc. vs random init (paired) | linear AUC | k-NN bal. acc. |")


def tiles(mode: str, m: dict, work: Path) -> tuple[Path, Path, str]:
    """(train folder, valid folder, where they come from): PCam in full mode, generated noisy tiles in tiny mode."""
    from gigaslide.testing import shared_data_dir

    if mode == "tiny":
        n_tr, n_va = m["tiles_per_class"]
        return (noisy_tiles(work / "train", n_tr, m["tile"], 0), noisy_tiles(work / "valid", n_va, m["tile"], 1),
                f"generated tiles ({m['tile']} px, classes overlapping in colour; tests only)")
    data = shared_data_dir()
    pcam = data / "tiles" / "pcam" if data is not None else None
    if pcam is None or not all((pcam / s / c).is_dir() for s in ("train", "valid") for c in ("0", "1")):
        raise SystemExit("full mode needs PCam train and valid tiles (tiles/pcam/{train,valid}/{0,1}) under the shared "
                         "data (../shared/data, $GIGASLIDE_SHARED_DATA, or .gpu/data from benchmarks/gpu_prepare.sh)")
    return pcam / "train", pcam / "valid", f"PCam from {data}"


def noisy_tiles(root: Path, n_per_class: int, size: int, seed: int) -> Path:
    """Tiles in class folders 0/1 whose colours overlap (each tile moved a random way towards the other class's
    colour), so that no probe is perfect and two encoders' probes disagree on some tiles (tiny mode)."""
    import numpy as np
    from PIL import Image

    from gigaslide.testing import TILE_CLASS_COLOURS

    rng = np.random.default_rng(seed)
    for k in (0, 1):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
        own, other = (np.asarray(TILE_CLASS_COLOURS[j], np.float32) for j in (k, 1 - k))
        for i in range(n_per_class):
            colour = own + rng.uniform(0.0, 0.7) * (other - own) + rng.normal(0, 15, 3)
            img = colour + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / str(k) / f"{i:03d}.png")
    return root


def train_row(name: str, s: dict, wall: float, r: dict, base: dict, te_y, n_boot: int) -> dict:  # noqa: ANN001
    # no "method" key: bench_tile_ssl.goal_lines would check the row's precision against this CPU's default
    return {"name": name, "trained": True, "wall_s": wall, **{k: s.get(k) for k in (
        "steps", "planned_steps", "images_per_s", "batch_size", "crop_size", "lr", "precision", "workers")},
        **r, "paired": paired(te_y, r, base, n_boot)}


def row_line(r: dict) -> str:
    if not r.get("trained"):
        hp = steps = ips = wall = "-"
    else:
        prec = r["precision"].get("resolved", "?") if isinstance(r.get("precision"), dict) else r.get("precision")
        hp = f"{r['batch_size']}, {r['crop_size']}, {r['lr']:g}, {prec}, {r['workers']}"
        steps, ips, wall = f"{r['steps']} / {r['planned_steps']}", f"{r['images_per_s']}", f"{r['wall_s']:.1f}"
    d = dci(r["paired"]["linear_balanced_accuracy"]) if r.get("paired") else "-"
    return (f"| {r['name']} | {steps} | {ips} | {hp} | {wall} | {ci(r['linear']['balanced_accuracy'])} | {d} | "
            f"{ci(r['linear']['auc'])} | {ci(r['knn']['balanced_accuracy'])} |")


def main() -> None:  # noqa: C901
    from gigaslide.runs import parse_duration

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", default=None, help="pre-training budget (default: 40s in full mode, 3s in tiny mode)")
    ap.add_argument("--batch-size", type=int, default=None, help="pretrain --batch-size (default: the recipe's, 64)")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds this section may take (gpu_check.sh's share; default 90 in full mode, 0: no limit): "
                         "the budget is cut to fit")
    a = ap.parse_args()
    t_all = time.perf_counter()
    cuda = torch.cuda.is_available()
    mode = a.mode if cuda else "tiny"
    m = dict(MODES[mode])
    if a.budget:
        m["budget_s"] = parse_duration(a.budget)
    if a.batch_size:
        m["batch"] = a.batch_size
    if a.limit is not None:
        m["limit_s"] = a.limit
    if mode == "tiny":
        torch.set_num_threads(int(os.environ.get("GIGASLIDE_THREADS", "2")))
    device = torch.device("cuda" if cuda else "cpu")
    work = Path(tempfile.mkdtemp(prefix="gs-gpu-tile-ssl-"))
    train_dir, valid_dir, source = tiles(mode, m, work)
    n_pretrain = sum(1 for _ in train_dir.glob("*/*.*"))
    tr = load_split(train_dir, m["probe_train"], seed=0)
    te = load_split(valid_dir, m["valid"], seed=1)
    budget = f"{m['budget_s']:g}s"
    planned = budget
    scored = "PCam valid" if mode == "full" else "generated valid tiles"
    lines = [f"## Tile SSL on the device: MoCo v2 vs random init, linear probe on {scored} ({mode} mode)", "",
             f"{machine()}. `pretrain --method mocov2 --backbone {m['backbone']} --tile-size {m['tile']} "
             f"--budget {budget}" + (f" --batch-size {m['batch']}" if m["batch"] else "")
             + (f" --workers {m['workers']}" if m["workers"] is not None else "")
             + f"` on the {n_pretrain} train tiles of {source}"
             + (" (the issue's protocol pre-trains on all 10,000)" if mode == "full" and n_pretrain < 10000 else "")
             + "; the command's defaults otherwise (as resolved, in the table). Probes on frozen features at "
             f"{m['tile']} px (bench_tile_ssl.py's `probe`): linear (logistic regression, C on a validation split) and "
             f"k-NN (k=20, cosine), fitted on {len(tr[1])} balanced train tiles, scored on {len(te[1])} valid tiles; "
             f"95 % bootstrap CIs and a paired bootstrap of Δ vs random init on the same valid tiles "
             f"({m['bootstrap']} resamples).", "", HEADER, "|---|---|---|---|---|---|---|---|---|"]
    rows: list[dict] = []

    def write(more: list[str] = ()) -> None:  # the rows so far survive gpu_check.sh's time limit
        Path(a.out).write_text("\n".join(lines + [row_line(r) for r in rows] + list(more)) + "\n")

    from gigaslide.encoders import Encoder, build_encoder
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    t_probe0 = time.perf_counter()
    trunk, spec = random_trunk(m["backbone"], m["tile"])
    base = probe(Encoder(spec, trunk, "random-seed0").eval().to(device), tr, te, m["bootstrap"])
    rows.append({"name": "random init", **base})
    print(row_line(rows[-1]), flush=True)
    t_probe = time.perf_counter() - t_probe0
    if m["limit_s"]:  # the SSL row needs the budget, pretrain's extra, and another probe as long as this one
        left = m["limit_s"] - (time.perf_counter() - t_all) - t_probe - PRETRAIN_EXTRA_S - MARGIN_S
        if (cut := max(5.0, float(int(left)))) < m["budget_s"]:  # at least 5 s: a row, however short
            m["budget_s"] = cut
            budget = f"{m['budget_s']:g}s"
            lines[4:4] = [f"**Budget cut to {budget}** (planned {planned}): setup and the random-init probe took "
                          f"{time.perf_counter() - t_all:.0f} s of the section's {m['limit_s']:g} s (the probe "
                          f"{t_probe:.0f} s, and the SSL row needs another).", ""]
    write(["", f"(pre-training MoCo v2 for {budget}...)"])
    cfg = PretrainConfig(data=str(train_dir), out=str(work / "run"), method="mocov2", backbone=m["backbone"],
                         mpp=[PCAM_MPP], tile_size=m["tile"], budget_s=m["budget_s"], batch_size=m["batch"],
                         workers=m["workers"], data_kind="tiles")
    t = time.perf_counter()
    try:
        s = pretrain(cfg)
    except Exception as e:  # noqa: BLE001 - the report says why (full mode); tiny mode fails loudly
        if mode == "tiny":
            raise
        write(["", f"- mocov2 pre-training failed: {type(e).__name__}: {str(e)[:300]}"])
        sys.exit(1)
    wall = time.perf_counter() - t
    if s.get("stopped_by") in ("signal", "interrupt"):  # gpu_check.sh's time limit (SIGTERM): no probe after it
        write(["", f"- pre-training stopped by a {s['stopped_by']} after {s.get('steps')} steps ({wall:.0f} s): "
                   "no SSL row."])
        sys.exit(1)
    if cuda:
        torch.cuda.empty_cache()
    r = probe(build_encoder(str(work / "run" / "encoder")).eval().to(device), tr, te, m["bootstrap"])
    rows.append(train_row(f"mocov2, {budget}", s, wall, r, base, te[1], m["bootstrap"]))
    print(row_line(rows[-1]), flush=True)
    d = rows[1]["paired"]["linear_balanced_accuracy"]
    acc = [q["linear"]["balanced_accuracy"]["value"] for q in rows]
    goal = goal_lines(rows)  # bench_tile_ssl's verdicts against the goal, from these rows
    met = goal[0].endswith("**met**")
    more = ["", "Computed from the rows above:", "",
            f"- Δ linear bal. acc. = {acc[1]:.4f} − {acc[0]:.4f} = {d['diff']:+.4f}, paired 95 % CI "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p={d['p_value']:.3g}.", *goal,
            f"- **Verdict:** MoCo v2 after {budget} of pre-training on this device "
            + ("meets" if met else "does not meet") + " the issue's goal (Δ ≥ +0.05 over random init, disjoint CIs) "
            f"on {len(te[1])} valid tiles."]
    if s.get("images_per_s"):
        more.append(f"- {s.get('steps')} steps at {s['images_per_s']} source tiles/s: "
                    f"{s.get('steps', 0) * (s.get('batch_size') or 0)} tiles seen (compare the CPU rows of "
                    "benchmarks/results/tile_ssl.md).")
    if mode == "tiny":
        more.append("- Tiny mode (no CUDA device): the tiny test ResNet on generated tiles checks the code path on "
                    "CPU; the numbers say nothing about PCam.")
    more.append(f"- section wall time {time.perf_counter() - t_all:.0f} s.")
    write(more)
    print("\n".join(more))


if __name__ == "__main__":
    main()

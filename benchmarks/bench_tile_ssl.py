"""Tile SSL on real PCam tiles: each method vs a random init of the same architecture, equal CPU budget.

Pre-trains SimCLR, MoCo v2, Barlow Twins, SwAV and DINO (pathology augmentation) and SimCLR with
ImageNet-style augmentation on the unlabelled PCam train tiles (10,000 96² H&E tiles) for the same
wall-clock budget each, then probes frozen features on PCam valid (3,000 tiles): linear probe
(logistic regression, C chosen on a validation split) and k-NN (k=20, cosine), balanced accuracy
and AUC with bootstrap 95 % CIs (``gigaslide.evaluation.tiles``). Probes train on a random subset
of the train tiles' features.

    .venv/bin/python benchmarks/bench_tile_ssl.py            # ~25 min on 2 shared CPU cores
    .venv/bin/python benchmarks/bench_tile_ssl.py --budget-s 20 --probe-train 200 --valid 300  # smoke

Writes ``benchmarks/results/tile_ssl.md`` (and ``tile_ssl.json``). Runs go to ``--runs-dir``; a
re-run resumes finished/partial runs instead of training again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gigaslide import atomic  # noqa: E402
from gigaslide.testing import shared_data_dir  # noqa: E402

RUNS = [("simclr", "pathology"), ("mocov2", "pathology"), ("barlowtwins", "pathology"), ("swav", "pathology"),
        ("dino", "pathology"), ("simclr", "imagenet")]
#: Small-run method settings (the papers' sizes do not fit a few CPU minutes); recorded in the report.
METHOD_ARGS = {
    "simclr": {"hidden_dim": 512, "out_dim": 128, "temperature": 0.2},
    "mocov2": {"hidden_dim": 512, "out_dim": 128, "queue": 1024, "momentum": 0.99},
    "barlowtwins": {"proj_dim": 1024},
    "swav": {"hidden_dim": 512, "out_dim": 128, "n_prototypes": 300, "freeze_prototypes_steps": 20},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "out_dim": 2048, "momentum": 0.99, "freeze_last_layer_steps": 10,
             "warmup_teacher_temp_frac": 0.0},
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pcam_dir() -> Path:
    """``../shared/data/tiles/pcam`` (exits with a message when the shared data is absent)."""
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found (../shared/data)")
    return data / "tiles" / "pcam"


def random_trunk(backbone: str, tile_size: int) -> tuple[torch.nn.Module, object]:
    """(trunk, spec): ``backbone`` with random weights (seed 0) at ``tile_size``, the SSL runs' starting point."""
    from gigaslide.encoders import create_trunk
    from gigaslide.ssl.tile.init import run_spec, with_embed_dim

    spec = run_spec(backbone, "random", tile_size, [0.97], "none")
    torch.manual_seed(0)
    trunk = create_trunk(spec)
    return trunk, with_embed_dim(spec, trunk)


def load_split(folder: Path, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from gigaslide.tiling.folders import labelled_images, read_image

    files, labels, _ = labelled_images(folder)
    if n is not None and n < len(files):
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)])
        files, labels = [files[i] for i in keep], labels[keep]
    return np.stack([read_image(f) for f in files]), labels


def probe(enc, tr, te, n_boot: int) -> dict:  # noqa: ANN001
    from gigaslide.evaluation.tiles import evaluate_tile_features
    from gigaslide.features.tiles import embed_arrays

    t0 = time.perf_counter()
    xtr = embed_arrays(enc, tr[0], 128)
    xte = embed_arrays(enc, te[0], 128)
    t_embed = time.perf_counter() - t0
    rep = evaluate_tile_features((xtr, tr[1]), (xte, te[1]), "linear,knn", n_bootstrap=n_boot, seed=0)
    out = {p: {m: rep["protocols"][p][m] for m in ("balanced_accuracy", "auc")} for p in ("linear", "knn")}
    out["embed_images_per_s"] = round((len(xtr) + len(xte)) / t_embed, 1)
    return out


@torch.no_grad()
def recalibrate_bn(enc, images: np.ndarray, batch: int = 64) -> None:  # noqa: ANN001
    """Re-estimate BatchNorm running statistics of ``enc`` on ``images`` (cumulative average), weights unchanged."""
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    enc.train()
    for i in range(0, len(images), batch):
        enc(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
    enc.eval()


def ci(d: dict) -> str:
    return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=180.0, help="training wall-clock seconds per run")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=48, help="crop size the encoder trains and is probed at")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--probe-train", type=int, default=1000, help="train tiles (balanced) the probes fit on")
    ap.add_argument("--valid", type=int, default=None, help="valid tiles to test on (default: all 3,000)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                    help="training autocast on CPU (bf16: ~1.3x more steps per budget here; probes always fp32)")
    ap.add_argument("--runs", default=",".join(f"{m}:{a}" for m, a in RUNS), help="method:augment,... to train")
    ap.add_argument("--runs-dir", default="/tmp/gigaslide-bench-tile-ssl")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tile_ssl.md"))
    ap.add_argument("--section", default="main", help="name of the report section this run (re)writes; others are kept")
    ap.add_argument("--title", default="Tile-level SSL on PatchCamelyon (CPU, equal budget per method)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pcam = pcam_dir()
    from gigaslide.encoders import Encoder, build_encoder
    from gigaslide.ssl.tile.train import PretrainConfig, pretrain

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    tr = load_split(pcam / "train", args.probe_train, seed=0)
    te = load_split(pcam / "valid", args.valid, seed=1)
    print(f"probe train {len(tr[1])} tiles, valid {len(te[1])} tiles")
    results = []
    # random init of the same architecture, same preprocessing
    trunk, spec = random_trunk(args.backbone, args.tile_size)
    enc = Encoder(spec, trunk, "random-seed0").eval()
    r = probe(enc, tr, te, args.bootstrap)
    results.append({"name": "random init", "method": "-", "augment": "-", **r})
    print("random init", ci(r["linear"]["balanced_accuracy"]), ci(r["knn"]["balanced_accuracy"]), flush=True)
    # the same random weights with BatchNorm statistics re-estimated on PCam tiles (no labels, no gradients):
    # SSL training also updates BN statistics, so this separates "learned features" from "adapted BN".
    recalibrate_bn(enc, tr[0])
    r = probe(enc, tr, te, args.bootstrap)
    results.append({"name": "random init + BN recalibrated", "method": "-", "augment": "-", **r})
    print("random init + BN", ci(r["linear"]["balanced_accuracy"]), ci(r["knn"]["balanced_accuracy"]), flush=True)
    for item in args.runs.split(","):
        method, augment = item.split(":")
        run_dir = Path(args.runs_dir) / f"{method}-{augment}-{args.backbone}-{args.tile_size}"
        cfg = PretrainConfig(data=str(pcam / "train"), out=str(run_dir), method=method, backbone=args.backbone,
                             mpp=[0.97], tile_size=args.tile_size, budget_s=args.budget_s, augment=augment,
                             batch_size=args.batch_size, n_local=4, method_args=METHOD_ARGS[method], workers=args.workers,
                             lr=1e-3, warmup_frac=0.1, data_kind="tiles", checkpoint_every_s=1e9,
                             precision=args.precision)
        s = pretrain(cfg)
        enc = build_encoder(str(run_dir / "encoder"))
        r = probe(enc, tr, te, args.bootstrap)
        results.append({"name": f"{method} ({augment})", "method": method, "augment": augment, "steps": s["steps"],
                        "images": s["images"], "train_images_per_s": s["images_per_s"], "first_loss": s["first_loss"],
                        "final_loss": s["final_loss"], "device": s["device"], **r})
        print(f"{method} ({augment}) steps {s['steps']} {s['images_per_s']} img/s  linear {ci(r['linear']['balanced_accuracy'])}"
              f"  knn {ci(r['knn']['balanced_accuracy'])}", flush=True)
    total = time.perf_counter() - t_start
    write_report(args, results, total, load0)


def write_report(args, results: list[dict], total: float, load0: float) -> None:  # noqa: ANN001
    base = results[0]
    recal = next((r for r in results if "BN" in r["name"]), base)
    cmd = "`.venv/bin/python benchmarks/bench_tile_ssl.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "") + "`"
    lines = [
        f"## {args.title}", "",
        f"Command: {cmd}  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs (load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end), {args.threads} torch threads, no GPU. Total wall time {total / 60:.1f} min.", "",
        f"Setup: backbone {args.backbone} (random init, timm), pre-trained on the 10,000 unlabelled PCam train tiles "
        f"(96² H&E, ≈0.97 µm/px) with random-resized crops to {args.tile_size} px, batch {args.batch_size}, AdamW lr 1e-3, "
        f"{args.precision} autocast, **{args.budget_s:.0f} s of training per run**. Probes on frozen features at {args.tile_size} px: linear "
        f"(logistic regression, C on a validation split) and k-NN (k=20, cosine), fitted on {args.probe_train} balanced "
        f"train tiles, tested on PCam valid ({args.valid or 3000} tiles); 95 % bootstrap CIs ({args.bootstrap} resamples).", "",
        "| encoder | steps | train img/s | loss first → last | linear bal. acc. | k-NN bal. acc. | linear AUC | Δ linear vs random (vs random+BN) | Δ k-NN vs random (vs random+BN) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def d(proto: str, ref: dict) -> float:
            return r[proto]["balanced_accuracy"]["value"] - ref[proto]["balanced_accuracy"]["value"]

        dl = f"{d('linear', base):+.3f} ({d('linear', recal):+.3f})"
        dk = f"{d('knn', base):+.3f} ({d('knn', recal):+.3f})"
        loss = f"{r['first_loss']:.3f} → {r['final_loss']:.3f}" if r.get("first_loss") is not None else "-"
        lines.append(f"| {r['name']} | {r.get('steps', '-')} | {r.get('train_images_per_s', '-')} | {loss} | "
                     f"{ci(r['linear']['balanced_accuracy'])} | {ci(r['knn']['balanced_accuracy'])} | {ci(r['linear']['auc'])} | "
                     f"{dl} | {dk} |")
    lines += ["", f"Method settings (shrunk for minutes of CPU): `{json.dumps(METHOD_ARGS)}`", "",
              "Train img/s counts source tiles per second (each yields 2 views, or 2 global + 4 local crops for SwAV/DINO), "
              "including augmentation in 1 data-loader worker.", ""]
    text = merge_section(Path(args.out), args.section, "\n".join(lines) + "\n")
    atomic.write_text(args.out, text)
    js = Path(args.out).with_suffix(".json")
    prev = json.loads(js.read_text()) if js.is_file() else {}
    prev = prev if "sections" in prev else {"sections": {}}
    prev["sections"][args.section] = {"args": vars(args), "results": results, "total_s": total}
    atomic.write_json(js, prev)
    print("\n".join(lines))


def merge_section(path: Path, name: str, body: str) -> str:
    """The report with section ``name`` replaced (or appended); other sections are kept as they are."""
    import re

    head = "# Tile-level self-supervised pre-training: benchmarks\n\n"
    old = path.read_text() if path.is_file() else ""
    if old and "<!-- section:" not in old:  # a report from before sections existed: keep it as 'main'
        old = f"<!-- section: main -->\n{old.replace('# Tile-level SSL', '## Tile-level SSL', 1)}<!-- end -->\n"
    sections = dict(re.findall(r"<!-- section: (\S+) -->\n(.*?)<!-- end -->\n", old, flags=re.S))
    sections[name] = body
    order = ["main"] + sorted(k for k in sections if k != "main")
    return head + "".join(f"<!-- section: {k} -->\n{sections[k]}<!-- end -->\n" for k in order if k in sections)


if __name__ == "__main__":
    main()

"""Tile SSL as a user on a budget runs it (issue #19): each method with the command's own defaults vs random init.

For each method, ``gigaslide pretrain --method M --backbone resnet18 --data PCam/train --tile-size 96
--budget B`` (nothing else set: the method's recipe and the defaults choose batch, crops, lr, schedule)
pre-trains on the 10,000 unlabelled PCam train tiles; the exported encoder embeds at the native 96 px.
Probes on frozen features, fitted on ``--probe-train`` balanced PCam *train* tiles and scored on PCam
*valid*: linear (logistic regression, C on a validation split) and k-NN (k=20, cosine); balanced accuracy
and AUC with bootstrap 95 % CIs, and a **paired** bootstrap of the difference to the same architecture
with random weights on the same test tiles (``gigaslide.evaluation.metrics.paired_difference``).
The run's label-free monitor (RankMe, view top-1) is reported next to the probe.

    .venv/bin/python benchmarks/bench_tile_ssl.py                       # the issue's protocol: 5 methods x 15 min
    nice .venv/bin/python benchmarks/bench_tile_ssl.py --methods mocov2 --budget 4m   # one short row
    .venv/bin/python benchmarks/bench_tile_ssl.py --methods mocov2 --budget 5m,15m,45m  # what more budget buys
    .venv/bin/python benchmarks/bench_tile_ssl.py --methods swav,dino --variants ';n_local=2'  # one option changed

With several budgets each method runs once per budget (each run's lr schedule spans its own budget, as a
user's would) and each budget is compared with the next smaller one on the same test tiles (paired); that
run writes the ``budget`` section instead. With ``--variants`` (``;``-separated sets of ``pretrain`` options,
``key=value key=value``; the empty set is the defaults) each variant is compared with the defaults of the same
method and budget (paired), into the ``variants`` section. Each arm is one training run: the paired CI covers the
test tiles, not training-seed variance, which at this scale can be as large as an option's effect (sections
``stain_screen`` and ``stain15``: an option "better" at 5 min was worse or not distinguishable at 15 min), so a
variant's verdict needs a second budget or seed before it changes a default. ``--seeds N`` trains every arm
with ``pretrain --seed 0..N-1`` and adds a "Training seeds" block: each arm's spread over seeds, the single-run
test between two seeds of the same settings (the seed-noise floor), and variants vs defaults with the seeds
resampled too (``paired_difference(..., draws="independent")``), the verdict to change a default on:

    .venv/bin/python benchmarks/bench_tile_ssl.py --methods mocov2 --budget 5m --seeds 3 \\
        --variants ';augment=pathology,gray=0.3'

Writes the ``defaults`` section of ``benchmarks/results/tile_ssl.md`` (+ ``tile_ssl.json``; other
sections are kept). Runs go to ``--runs-dir``; a re-run resumes them (an exhausted budget trains no more).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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

sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import stop_if_interrupted  # noqa: E402

METHODS = ("simclr", "mocov2", "barlowtwins", "swav", "dino")
FULL_BUDGET_S = 900.0  # the protocol: 15 min per method
PCAM_MPP = 0.97  # PCam: 96 px tiles at ~0.97 µm/px (10x)


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
    from gigaslide.encoders import create_trunk, with_embed_dim
    from gigaslide.ssl.tile.init import run_spec

    spec = run_spec(backbone, "random", tile_size, [PCAM_MPP], "none")
    torch.manual_seed(0)
    trunk = create_trunk(spec)
    return trunk, with_embed_dim(spec, trunk)


def load_split(folder: Path, n: int | None, seed: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` balanced labelled tiles of ``folder`` (all when None); ``exclude=N``: none of the ``N`` tiles that
    ``load_split(folder, N, seed=0)`` draws (a held-out split of the same folder)."""
    from gigaslide.tiling.folders import labelled_images, read_image

    files, labels, _ = labelled_images(folder)
    pool = np.arange(len(files))
    if exclude:
        pool = np.setdiff1d(pool, _draw(labels, pool, exclude, 0))
    if n is not None and n < len(pool):
        pool = _draw(labels, pool, n, seed)
    return np.stack([read_image(files[i]) for i in pool]), labels[pool]


def _draw(labels: np.ndarray, pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(pool[labels[pool] == c], n // 2, replace=False) for c in (0, 1)])


def probe(enc, tr, te, n_boot: int) -> dict:  # noqa: ANN001
    """Linear and k-NN probe probabilities and metrics with CIs on the test tiles."""
    from gigaslide.evaluation.metrics import summarize
    from gigaslide.evaluation.tiles import knn_probe, linear_probe
    from gigaslide.features.tiles import embed_arrays

    t0 = time.perf_counter()
    xtr, xte = embed_arrays(enc, tr[0], 128), embed_arrays(enc, te[0], 128)
    t_embed = time.perf_counter() - t0
    p_lin, info = linear_probe(xtr, tr[1], xte, 2, seed=0)
    p_knn = knn_probe(xtr, tr[1], xte, 2)
    out = {"probs": {"linear": p_lin, "knn": p_knn}, "linear_C": info["C"],
           "embed_images_per_s": round((len(xtr) + len(xte)) / t_embed, 1)}
    for name, p in out["probs"].items():
        out[name] = summarize(te[1], p, n_bootstrap=n_boot, seed=0, metrics=("balanced_accuracy", "auc"))
    return out


def paired(te_y: np.ndarray, r: dict, base: dict, n_boot: int) -> dict:
    from gigaslide.evaluation.metrics import paired_difference

    return {f"{proto}_{m}": paired_difference(te_y, r["probs"][proto], base["probs"][proto], m, n_bootstrap=n_boot, seed=0)
            for proto in ("linear", "knn") for m in ("balanced_accuracy", "auc")}


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


def dci(d: dict) -> str:
    from gigaslide.evaluation.metrics import fmt_diff

    return fmt_diff(d)


def main() -> None:
    from gigaslide.runs import parse_duration

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="15m",
                    help="training wall-clock budget per method (e.g. 15m, 4m, 90s), or a comma-separated list (a budget curve)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all five)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=96, help="PCam's native size: pretrain --tile-size and probes")
    ap.add_argument("--probe-train", type=int, default=2000, help="balanced PCam train tiles the probes fit on")
    ap.add_argument("--valid", type=int, default=None, help="PCam valid tiles to score on (default: all)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--score-on", choices=("valid", "train-holdout"), default="valid",
                    help="score probes on PCam valid (the protocol), or on PCam train tiles the probe does not fit on "
                         "(for choosing defaults without looking at valid)")
    ap.add_argument("--ablate-bn", action="store_true",
                    help="also probe each run's trunk with BatchNorm statistics as trained (only differs from the export "
                         "when the export re-measures them: PretrainConfig.export_bn_tiles > 0)")
    ap.add_argument("--workers", type=int, default=None,
                    help="data-loader workers (default: the command's own, gigaslide.devices.loader_workers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", default="/tmp/gigaslide-bench-tile-ssl-defaults")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tile_ssl.md"))
    ap.add_argument("--section", default=None,
                    help="report section this run (re)writes; others are kept (default: defaults, or budget for a budget list)")
    ap.add_argument("--variants", default="",
                    help="';'-separated option sets applied on top of the defaults, e.g. ';n_local=2' (the empty set: defaults)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train each arm with pretrain seeds 0..N-1 (seed 0 in the run directory without a suffix); "
                         "with N > 1 the report adds each arm's spread over seeds, the single-run test between two "
                         "seeds of one arm, and variants vs defaults with the seeds resampled too")
    ap.add_argument("--goal-only", action="store_true",
                    help="only (re)write the 'goal' section from the measured rows in tile_ssl.json (no training); "
                         "--section may list sections of one protocol, e.g. defaults,recheck: each method's row from "
                         "the last one that has it; ';' separates protocols, one block each, e.g. "
                         "'defaults,recheck;probe10k'; NAME@variant takes a section's variant rows instead of its "
                         "default rows (remembered: re-running any of those sections, or the budget "
                         "section, rewrites the goal from the same list)")
    args = ap.parse_args()
    budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(";")] if args.variants else [""]
    args.section = args.section or ("budget" if len(budgets) > 1 else "variants" if any(variants) else "defaults")
    if args.goal_only:
        return write_goal(Path(args.out), args.section)
    budget_s = min(parse_duration(b) for b in budgets)
    torch.set_num_threads(args.threads)
    pcam = pcam_dir()
    from gigaslide.encoders import Encoder, build_encoder
    from gigaslide.runs import load_checkpoint, read_run
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    tr = load_split(pcam / "train", args.probe_train, seed=0)
    te = (load_split(pcam / "valid", args.valid, seed=1) if args.score_on == "valid"
          else load_split(pcam / "train", args.valid or 3000, seed=1, exclude=args.probe_train))
    print(f"probe train {len(tr[1])} tiles, scored on {len(te[1])} {scored_on(args)} tiles", flush=True)
    trunk, spec = random_trunk(args.backbone, args.tile_size)
    enc = Encoder(spec, trunk, "random-seed0").eval()
    base = probe(enc, tr, te, args.bootstrap)
    results = [{"name": "random init", **base}]
    print("random init", ci(base["linear"]["balanced_accuracy"]), flush=True)
    recalibrate_bn(enc, tr[0])  # SSL also adapts BN statistics: this separates "learned features" from "adapted BN"
    r = probe(enc, tr, te, args.bootstrap)
    results.append({"name": "random init + BN recalibrated", **r, "paired": paired(te[1], r, base, args.bootstrap)})
    arms = [(m, b, v, k) for m in args.methods.split(",") for b in budgets for v in variants for k in range(args.seeds)]
    for method, budget, variant, seed in arms:
        run_dir = Path(args.runs_dir) / (f"{method}-{args.backbone}-{args.tile_size}-{budget}"
                                         + (f"-{re.sub(r'[^A-Za-z0-9.]+', '-', variant).strip('-')}" if variant else "")
                                         + (f"-seed{seed}" if seed else ""))
        cfg = PretrainConfig(data=str(pcam / "train"), out=str(run_dir), method=method, backbone=args.backbone,
                             mpp=[PCAM_MPP], tile_size=args.tile_size, budget_s=parse_duration(budget), workers=args.workers,
                             data_kind="tiles", seed=seed, **parse_variant(variant))
        t_run = time.perf_counter()
        s = stop_if_interrupted(pretrain(cfg))
        rec = read_run(run_dir)
        mon = rec.get("monitor") or []
        r = probe(build_encoder(str(run_dir / "encoder")), tr, te, args.bootstrap)
        row = len(results)
        # compared with: the same method, budget and seed with the defaults (a variant), else the next smaller budget
        defaults = [q for q in results
                    if q.get("method") == method and not q.get("variant") and q.get("seed", 0) == seed]
        than = (next((q for q in defaults if q["budget"] == budget), None) if variant
                else defaults[-1] if defaults and len(budgets) > 1 else None)
        name = ", ".join([method] + ([budget] if len(budgets) > 1 else []) + ([variant] if variant else [])
                         + ([f"seed {seed}"] if seed else []))
        results.append({"name": name, "method": method, "budget": budget, "variant": variant, "seed": seed,
                        "trained_here": bool(s.get("images_this_invocation")), "wall_s": round(time.perf_counter() - t_run, 1),
                        **{k: s.get(k) for k in (
            "steps", "planned_steps", "images_per_s", "seconds_per_step", "first_loss", "final_loss", "batch_size",
            "crop_size", "lr", "precision", "device", "workers")}, "monitor": [mon[0], mon[-1]] if mon else [],
            "method_hparams": (rec.get("resolved") or {}).get("method_hparams"),
            "git_commit": ((rec.get("invocations") or [{}])[0].get("environment") or {}).get("git_commit"),
            **r, "paired": paired(te[1], r, base, args.bootstrap)})
        if than is not None:  # same test tiles
            results[row]["paired_vs"] = {"than": than["name"], **paired(te[1], r, than, args.bootstrap)}
        if args.ablate_bn:  # the same trained weights with BatchNorm statistics as trained (no native-size re-estimate)
            enc = build_encoder(str(run_dir / "encoder"))
            ck = load_checkpoint(run_dir)
            pre = ck["export_prefix"]
            enc.trunk.load_state_dict({k[len(pre):]: v for k, v in ck["model"].items() if k.startswith(pre)})
            r2 = probe(enc.eval(), tr, te, args.bootstrap)
            results.append({"name": f"{method}, BN statistics as trained", **r2, "paired": paired(te[1], r2, base, args.bootstrap),
                            "paired_vs_export": paired(te[1], r, r2, args.bootstrap)})
        print(f"{method}: {s['steps']} steps ({s['images_per_s']} img/s) linear {ci(r['linear']['balanced_accuracy'])} "
              f"vs random {dci(results[row]['paired']['linear_balanced_accuracy'])}", flush=True)
    seeds = seed_comparisons(results, te[1], args.bootstrap) if args.seeds > 1 else None
    write_report(args, budgets, results, time.perf_counter() - t_start, load0, len(tr[1]), len(te[1]), seeds)


def settings_lines(rows: list[dict]) -> list[str]:
    """Each trained row's method settings as its run recorded them (class defaults under ``method_args``) and the
    git HEAD when it trained (uncommitted edits are not recorded), so a row stays readable after a method's
    defaults change."""
    out = []
    for r in rows:
        hp = r.get("method_hparams")
        got = ", ".join(f"{k} {v}" for k, v in sorted(hp.items())) if hp else "not recorded (run predates the record)"
        out.append(f"- {r['name']}: {got}; git HEAD when trained {(r.get('git_commit') or 'unknown')[:7]}")
    return ["", "Method settings each run recorded:", "", *out] if out else []


def scored_on(args: argparse.Namespace) -> str:
    """What the probes are scored on, in words (``--score-on``)."""
    if args.score_on == "valid":
        return "PCam valid"
    return ("held-out PCam train (disjoint from the probe's training tiles, unlabelled-seen by pre-training, "
            "for tuning without looking at valid)")


def parse_variant(variant: str) -> dict:
    """``'n_local=2 local_size=32'`` -> ``{'n_local': 2, 'local_size': 32}`` (values read as JSON where they parse)."""
    out: dict = {}
    for item in re.split(r"\s+(?![^\[]*\])", variant.strip()) if variant.strip() else []:  # spaces outside [...]
        key, sep, val = item.partition("=")
        if not sep:
            sys.exit(f"--variants: '{item}' is not key=value")
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


def _verdict(r: dict) -> str:
    """A row's :func:`verdict` against random init, in this report's words."""
    d = r["paired"]["linear_balanced_accuracy"]
    ci = f"paired 95 % CI of Δ {d['ci_low']:+.3f} to {d['ci_high']:+.3f}"
    return {"better": f"clearly above random init ({ci} excludes 0)", "worse": f"below random init ({ci})",
            "not distinguishable": f"not distinguishable from random init ({ci} includes 0)"}[verdict(d)]


def _precision(r: dict) -> str:
    p = r.get("precision")
    return (p.get("resolved") or "-") if isinstance(p, dict) else str(p or "-")


def _shared(load0: float, load1: float, threads: int) -> str:
    """' **shared with other jobs**' when the load average said so (more than the benchmark's own threads + 0.5)."""
    return " **shared with other jobs**" if max(load0, load1) > threads + 0.5 else ""


def write_report(args, budgets: list[str], results: list[dict], total: float,  # noqa: ANN001
                 load0: float, n_tr: int, n_te: int, seeds: dict | None = None) -> None:
    from gigaslide.runs import parse_duration

    budget_s = min(parse_duration(b) for b in budgets)
    cmd = "`.venv/bin/python benchmarks/bench_tile_ssl.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "") + "`"
    methods = [r for r in results if r.get("method")]
    against = "variants against " if any(r.get("variant") for r in methods) else "with "
    lines = [
        f"## Tile SSL {against}the command's own defaults at PCam's native {args.tile_size} px "
        + (f"({budget_s / 60:g} min per method" if len(budgets) == 1 else f"(budgets {', '.join(budgets)} per method")
        + (", scored on held-out PCam train for tuning)" if args.score_on != "valid" else ")"), "",
        f"Command: {cmd}  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores{_shared(load0, os.getloadavg()[0], args.threads)} (load average "
        f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end), {args.threads} torch threads, no GPU. "
        f"Total wall time {total / 60:.1f} min.", "",
        f"Setup: `gigaslide pretrain --method M --backbone {args.backbone} --data PCam/train --tile-size {args.tile_size} "
        f"--budget {args.budget}` with nothing else set"
        + (f" but {args.workers} data-loader worker(s)" if args.workers is not None else "")
        + f" (precision and loader workers as the command resolved them, in the table); the 10,000 unlabelled PCam train tiles. "
        f"Probes on frozen features at {args.tile_size} px, fitted on {n_tr} balanced PCam train tiles, scored on {n_te} "
        f"{scored_on(args)} tiles: linear (logistic regression, C on a validation split) and k-NN (k=20, cosine); 95 % bootstrap CIs "
        f"and a paired bootstrap of Δ vs random init on the same test tiles ({args.bootstrap} resamples).", "",
        "| encoder | steps done / planned | train img/s | batch, crop px, lr, precision, loader workers | RankMe first → last | view top-1 first → last "
        "| linear bal. acc. | Δ linear bal. acc. vs random (paired) | linear AUC | Δ linear AUC (paired) | k-NN bal. acc. | Δ k-NN (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r.get("paired")
        mon = r.get("monitor") or []
        rk = f"{mon[0]['rankme']} → {mon[-1]['rankme']}" if mon else "-"
        vt = f"{mon[0]['view_top1']} → {mon[-1]['view_top1']}" if mon else "-"
        hp = (f"{r['batch_size']}, {r['crop_size']}, {r['lr']:g}, {_precision(r)}, {r.get('workers', '-')}"
              if r.get("method") else "-")
        steps = f"{r['steps']} / {r['planned_steps']}" if r.get("method") else "-"
        ips = r.get("images_per_s", "-")
        if r.get("method") and r.get("trained_here") is False:
            ips = f"{ips} (earlier invocation)"  # a finished run reused: its rate is the one it was trained at
        lines.append(f"| {r['name']} | {steps} | {ips} | {hp} | {rk} | {vt} | "
                     f"{ci(r['linear']['balanced_accuracy'])} | {dci(p['linear_balanced_accuracy']) if p else '-'} | "
                     f"{ci(r['linear']['auc'])} | {dci(p['linear_auc']) if p else '-'} | "
                     f"{ci(r['knn']['balanced_accuracy'])} | {dci(p['knn_balanced_accuracy']) if p else '-'} |")
    lines += ["", "Verdicts (linear probe, computed from the rows above):", ""]
    lines += [f"- {r['name']}: {_verdict(r)}" for r in results if r.get("paired")]
    for r in results:
        if r.get("paired_vs_export"):
            d = r["paired_vs_export"]["linear_balanced_accuracy"]
            lines.append(f"- the export's native-size BatchNorm statistics vs {r['name']}: Δ linear bal. acc. {dci(d)}")
    lines += comparison_lines(results, budgets)
    lines += seed_lines(seeds)
    lines += settings_lines(methods)
    missing = [m for m in METHODS if m not in {r["method"] for r in methods}]
    if args.section == "defaults" and (budget_s < FULL_BUDGET_S or missing):
        lines += ["", f"**Partial run.** The issue's protocol is all five methods at 15 min each; this run has "
                  f"{len(methods)} method(s) at {budget_s / 60:g} min"
                  + (f" (not run: {', '.join(missing)})" if missing else "") + ". The full run: "
                  "`.venv/bin/python benchmarks/bench_tile_ssl.py`."]
    lines += ["", "Steps are planned from the measured step time after the first steps (lr warm-up + cosine span them); "
              "train img/s counts source tiles per second. RankMe is the effective rank of 128 fixed PCam train tiles' "
              "embeddings (at most 128); view top-1 is how often a tile's second augmented view retrieves its first "
              "(chance 1/128).", ""]
    text = merge_section(Path(args.out), args.section, "\n".join(lines) + "\n")
    atomic.write_text(args.out, text)
    js = Path(args.out).with_suffix(".json")
    prev = json.loads(js.read_text()) if js.is_file() else {}
    prev = prev if "sections" in prev else {"sections": {}}
    prev["sections"][args.section] = {"args": vars(args), "total_s": total, **({"seeds": seeds} if seeds else {}),
                                      "results": [{k: v for k, v in r.items() if k != "probs"} for r in results]}
    atomic.write_json(js, prev)
    print("\n".join(lines))
    goal = goal_sections(prev)
    read = [g.partition("@")[0] for g in re.split(r"[,;]", goal)]  # the sections the goal is computed from
    if args.section in read or args.section == "budget" or seeds:
        write_goal(Path(args.out), goal)


def verdict(d: dict) -> str:
    """A paired difference's verdict from its 95 % CI (:func:`gigaslide.evaluation.compare.verdict`)."""
    from gigaslide.evaluation.compare import verdict as paired_verdict

    return paired_verdict(d)


def comparison_lines(results: list[dict], budgets: list[str]) -> list[str]:
    """Each row vs the row it is compared with (paired), and for a budget curve the first budget meeting the goal."""
    from gigaslide.evaluation.compare import tally

    out = []
    for r in results:
        if r.get("paired_vs"):
            d = r["paired_vs"]["linear_balanced_accuracy"]
            out.append(f"- {r['name']} vs {r['paired_vs']['than']}: Δ linear bal. acc. {dci(d)}: **{verdict(d)}**")
    by_variant: dict[str, list[str]] = {}
    for r in results:
        if r.get("paired_vs") and r.get("variant") and not r.get("seed"):  # over methods: seed 0's rows
            by_variant.setdefault(r["variant"], []).append(verdict(r["paired_vs"]["linear_balanced_accuracy"]))
    for v, verdicts in by_variant.items():
        if len(verdicts) > 1:
            out.append(f"- `{v}` vs the defaults, over {len(verdicts)} methods: {tally(verdicts)}")
    curves: dict[str, list[dict]] = {}
    for r in results:
        if len(budgets) > 1 and r.get("method") and not r.get("variant") and not r.get("seed"):
            curves.setdefault(r["method"], []).append(r)
    for m, rows in curves.items():
        meets = [r["budget"] for r in rows if r["paired"]["linear_balanced_accuracy"]["diff"] >= GOAL_DELTA
                 and r["linear"]["balanced_accuracy"]["value"] >= GOAL_BEST]
        delta = [r["budget"] for r in rows if r["paired"]["linear_balanced_accuracy"]["diff"] >= GOAL_DELTA]
        out.append(f"- {m}: Δ ≥ {GOAL_DELTA:+.2f} over random init first at "
                   f"{delta[0] if delta else 'none of ' + ', '.join(r['budget'] for r in rows)}; Δ goal and "
                   f"≥ {GOAL_BEST:.2f} together at {meets[0] if meets else 'none of these budgets'}")
    return out


def seed_comparisons(results: list[dict], te_y: np.ndarray, n_boot: int) -> dict:
    """What training seeds do, from the rows' test-tile probabilities (linear probe, balanced accuracy): per arm
    (method, budget, variant) trained with more than one seed, each seed's score and the arm vs random init with
    the seeds resampled too; every pair of seeds of one arm under the single-run paired test (the same settings,
    so any "better" or "worse" there is seed noise); and each variant vs its defaults with both arms' seeds
    resampled (``paired_difference(..., draws="independent")``: the CI covers training seeds and test tiles)."""
    from itertools import combinations

    from gigaslide.evaluation.metrics import paired_difference

    def diff(a: np.ndarray, b: np.ndarray, draws: str | None = None) -> dict:
        return paired_difference(te_y, a, b, "balanced_accuracy", n_bootstrap=n_boot, seed=0, draws=draws)

    base = next(r for r in results if r["name"] == "random init")
    by_arm: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("method"):
            by_arm.setdefault((r["method"], r["budget"], r.get("variant") or ""), []).append(r)
    arms = {k: rows for k, rows in by_arm.items() if len(rows) > 1}
    out: dict[str, list] = {"arms": [], "pairs": [], "variants": []}
    for (m, b, v), rows in arms.items():
        accs = [r["linear"]["balanced_accuracy"]["value"] for r in rows]
        stack = np.stack([r["probs"]["linear"] for r in rows])
        out["arms"].append({"name": rows[0]["name"], "variant": v, "seeds": [r.get("seed", 0) for r in rows],
                            "accs": accs, "mean": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1)),
                            "vs_random": diff(stack, base["probs"]["linear"], "independent")})
        for a, c in combinations(rows, 2):
            out["pairs"].append({"name": rows[0]["name"], "a": c.get("seed", 0), "b": a.get("seed", 0),
                                 **diff(c["probs"]["linear"], a["probs"]["linear"])})
        if v and (m, b, "") in arms:
            d = arms[(m, b, "")]
            out["variants"].append({"name": rows[0]["name"], "than": d[0]["name"], "runs": [len(rows), len(d)],
                                    **diff(stack, np.stack([r["probs"]["linear"] for r in d]), "independent")})
    return out


def seed_lines(seeds: dict | None) -> list[str]:
    """The report's lines for :func:`seed_comparisons` (nothing without replicates)."""
    from gigaslide.evaluation.compare import tally

    if not seeds or not seeds["arms"]:
        return []
    out = ["", "### Training seeds", "",
           "Each arm trained with `pretrain --seed 0..N-1` (rows without a seed are seed 0), everything else equal. "
           "'over seeds': a paired bootstrap that resamples the test tiles and, for each arm on its own, its training "
           "seeds, so the CI covers seed-to-seed variance too (linear probe, balanced accuracy).", "",
           "| arm | seeds | linear bal. acc. per seed | mean ± sd | Δ vs random init over seeds |",
           "|---|---|---|---|---|"]
    for a in seeds["arms"]:
        out.append(f"| {a['name']} | {', '.join(map(str, a['seeds']))} | {', '.join(f'{x:.3f}' for x in a['accs'])} | "
                   f"{a['mean']:.3f} ± {a['sd']:.3f} | {dci(a['vs_random'])} |")
    pairs = seeds["pairs"]
    out += ["", "The single-run paired test between two seeds of one arm (same settings: whatever it calls better or "
            "worse is seed noise):", ""]
    out += [f"- {p['name']}, seed {p['a']} vs seed {p['b']}: Δ {dci(p)}: **{verdict(p)}**" for p in pairs]
    if pairs:
        out.append(f"- over {len(pairs)} same-settings pairs: {tally([verdict(p) for p in pairs])}; largest |Δ| "
                   f"{max(abs(p['diff']) for p in pairs):.3f}")
    if seeds["variants"]:
        out += ["", "Variants vs their defaults over seeds:", ""]
        out += [f"- {v['name']} ({v['runs'][0]} seeds) vs {v['than']} ({v['runs'][1]} seeds): Δ {dci(v)}: "
                f"**{verdict(v)}**" for v in seeds["variants"]]
    return out


#: the issue's goal (#19): every method >= +0.05 linear balanced accuracy over random init with disjoint CIs,
#: the best >= 0.84
GOAL_DELTA, GOAL_BEST = 0.05, 0.84


def _met(ok: bool) -> str:
    return f"**{'met' if ok else 'not met'}**"


def goal_lines(results: list[dict]) -> list[str]:
    """Verdicts against the goal, computed from the measured rows (the encoder rows and their BN ablations)."""
    base = next(r for r in results if r["name"] == "random init")["linear"]["balanced_accuracy"]
    rows = [r for r in results if r.get("paired") and not r["name"].startswith("random init")]
    out = []
    for r in rows:
        acc, d = r["linear"]["balanced_accuracy"], r["paired"]["linear_balanced_accuracy"]
        disjoint = acc["ci_low"] > base["ci_high"]
        met = d["diff"] >= GOAL_DELTA and disjoint
        out.append(f"- {r['name']}: Δ {d['diff']:+.3f} (goal ≥ {GOAL_DELTA:+.2f}), CIs "
                   f"{'disjoint' if disjoint else 'overlapping'} ({acc['ci_low']:.3f} vs random's upper {base['ci_high']:.3f}): "
                   + _met(met) + ("" if met else f" (short by {max(0.0, GOAL_DELTA - d['diff']):.3f})"))
    out += stale_precision_lines(rows)
    if rows:
        best = max(rows, key=lambda r: r["linear"]["balanced_accuracy"]["value"])
        v = best["linear"]["balanced_accuracy"]["value"]
        n_met = sum(ln.endswith("**met**") for ln in out)
        out.append(f"- best: {best['name']} {v:.3f} (goal ≥ {GOAL_BEST:.2f}): {_met(v >= GOAL_BEST)}")
        out.append(f"- {n_met} of {len(rows)} rows meet the Δ goal.")
    return out


def stale_precision_lines(rows: list[dict], native_bf16: bool | None = None) -> list[str]:
    """A line for each row trained in another precision than ``pretrain --precision auto`` trains its method in
    today on this CPU (a method's ``cpu_bf16_basis`` set or removed after the row was measured)."""
    from gigaslide.devices import cpu_has_native_bf16
    from gigaslide.ssl.tile.methods import SSL_METHODS

    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    out = []
    for r in rows:
        if not r.get("method") or r.get("variant") or _precision(r) not in ("fp32", "bf16"):
            continue
        now = "bf16" if native and SSL_METHODS.get(r["method"]).cpu_bf16_basis else "fp32"
        if now != _precision(r):
            out.append(f"- {r['name']}: trained in {_precision(r)}; `--precision auto` now trains {r['method']} in "
                       f"{now} on this CPU, so this row is not today's default")
    return out


#: settings that make two sections' rows one protocol (same probes, same test tiles, same training budget)
PROTOCOL_KEYS = ("budget", "backbone", "tile_size", "probe_train", "valid", "score_on", "bootstrap")
#: what a section written before an option existed ran with
PROTOCOL_DEFAULTS = {"score_on": "valid"}


def _protocol(section: dict) -> dict:
    a = section["args"]
    return {k: a.get(k) if a.get(k) is not None else PROTOCOL_DEFAULTS.get(k) for k in PROTOCOL_KEYS}


def _scores(row: dict) -> tuple[float, ...]:
    """A row's linear-probe scores to 4 decimals (the same random init on the same tiles gives the same ones)."""
    return tuple(round(row["linear"][m]["value"], 4) for m in ("balanced_accuracy", "auc") if m in row["linear"])


def _comparable(a: dict, b: dict, but: tuple[str, ...] = ()) -> bool:
    """Sections ``a`` and ``b`` ran one protocol (``PROTOCOL_KEYS`` except ``but``) and scored the same random init
    (the same test tiles)."""
    pa, pb = ({k: v for k, v in _protocol(s).items() if k not in but} for s in (a, b))
    rnd = [next((r for r in s["results"] if r["name"] == "random init"), None) for s in (a, b)]
    return pa == pb and None not in rnd and _scores(rnd[0]) == _scores(rnd[1])


def goal_rows(sections: dict[str, dict], names: list[str]) -> tuple[list[dict], dict[str, str]]:
    """The rows the goal is checked on: each method's row from the last of ``names`` that measured it (a re-check
    of some methods after their code changed), random init from the first. ``NAME@variant`` takes a section's
    variant rows instead of its default rows (one variant per method: e.g. the setting that became the default).
    Sections of different protocols, or whose random-init rows differ (other test tiles), are refused. Returns
    (rows, method -> section)."""
    def split(name: str) -> tuple[str, bool]:
        sec, _, what = name.partition("@")
        if what not in ("", "variant"):
            raise SystemExit(f"goal section {name!r}: only NAME or NAME@variant")
        return sec, what == "variant"

    def method_rows(name: str) -> list[dict]:
        sec, variant = split(name)
        got = [r for r in sections[sec]["results"]
               if r.get("method") and bool(r.get("variant")) == variant and not r.get("seed")]  # seed 0
        if len({r["method"] for r in got}) < len(got):
            raise SystemExit(f"goal section {name!r}: more than one row per method")
        return got

    first = sections[split(names[0])[0]]
    other = [r for r in first["results"] if not r.get("method")]  # random init (+ BN recalibrated), BN ablations
    by_method: dict[str, dict] = {}
    src: dict[str, str] = {}
    for name in names:
        sec = sections[split(name)[0]]
        if not _comparable(first, sec):
            raise SystemExit(f"section {name!r} is not {names[0]!r}'s protocol ({_protocol(sec)} vs "
                             f"{_protocol(first)}, or another random init score): its rows cannot join the goal")
        for r in method_rows(name):
            by_method[r["method"]], src[r["method"]] = r, name
    return other + list(by_method.values()), src


def budget_lines(sections: dict[str, dict], first: str) -> list[str]:
    """Whether more training time closes the gap: the ``budget`` section's rows (one method at several budgets, each
    paired with the budget before it), when that section is ``first``'s protocol but for the budget and scored
    against the same random init; else nothing."""
    sec = sections.get("budget")
    if sec is None or first == "budget" or not _comparable(sections[first], sec, but=("budget",)):
        return []
    rows = [r for r in sec["results"] if r.get("method") and not r.get("variant") and r.get("paired")]
    pairs = [r for r in rows if r.get("paired_vs")]
    if not pairs:
        return []
    better = [r["name"] for r in pairs if verdict(r["paired_vs"]["linear_balanced_accuracy"]) == "better"]
    out = [f"Does more training time close the gap? Section `budget` ({sec['args'].get('budget')}; same probes, test "
           "tiles and random init), linear balanced accuracy:", ""]
    out += [f"- {r['name']}: Δ vs random init {dci(r['paired']['linear_balanced_accuracy'])}" for r in rows]
    out += comparison_lines(pairs, [])
    out.append(f"- {len(better)} of {len(pairs)} longer budgets better than the budget before it (paired 95 % CI above 0)"
               + (f": {', '.join(better)}" if better else f": for {', '.join(sorted({r['method'] for r in rows}))}, "
                  "more training time on this CPU does not close the gap"))
    return out


def seed_goal_lines(sections: dict[str, dict], first: str) -> list[str]:
    """The Δ goal checked on the mean over training seeds: each defaults arm that a section of ``first``'s protocol
    trained with several seeds (``--seeds``), scored against the same random init; else nothing."""
    out, arms = [], []
    for name, sec in sections.items():
        if name == first or not sec.get("seeds") or not _comparable(sections[first], sec):
            continue
        for a in (a for a in sec["seeds"]["arms"] if not a.get("variant")):
            d = a["vs_random"]
            arms.append(a)
            out.append(f"- {a['name']} over seeds {', '.join(map(str, a['seeds']))} (section `{name}`): mean Δ "
                       f"{dci(d)} (goal ≥ {GOAL_DELTA:+.2f}): {_met(d['diff'] >= GOAL_DELTA)}; "
                       f"linear bal. acc. {a['mean']:.3f} ± {a['sd']:.3f} over seeds")
    if not out:
        return []
    best = max(arms, key=lambda a: a["mean"])
    met = sum(a["vs_random"]["diff"] >= GOAL_DELTA for a in arms)
    out.append(f"- over seeds, {met} of {len(arms)} arm(s) meet the Δ goal; best mean {best['name']} "
               f"{best['mean']:.3f} (goal ≥ {GOAL_BEST:.2f}): {_met(best['mean'] >= GOAL_BEST)}")
    return ["Over training seeds (the rows above are seed 0 each; a seed-0 row can be a lucky or unlucky draw):", "",
            *out]


def goal_sections(saved: dict) -> str:
    """The sections the goal was last computed from (kept in ``tile_ssl.json``, so re-running any of them
    recomputes the goal from the same sections); ``defaults`` until a ``--goal-only`` run names others."""
    return saved.get("goal_sections") or "defaults"


def _group_lines(sections: dict[str, dict], names: list[str]) -> list[str]:
    """One protocol's block of the goal section: the goal checked on ``names``' rows (:func:`goal_rows`), plus what
    the ``budget`` section says about more training time (:func:`budget_lines`)."""
    rows, src = goal_rows(sections, names)
    args = sections[names[0].partition("@")[0]]["args"]
    recheck = [f"{m} from `{n}`" for m, n in src.items() if n != names[0]]
    n_probe = args.get("probe_train")
    lines = [f"## Against the issue's goal (computed from the `{names[0]}` rows"
             + (f", {', '.join(recheck)}" if recheck else "") + ", linear probe"
             + (f" fitted on {n_probe} PCam train tiles" if n_probe else "") + ")", "",
             f"Goal: every method ≥ {GOAL_DELTA:+.2f} balanced accuracy over random init with disjoint 95 % CIs, the best "
             f"≥ {GOAL_BEST:.2f}. Rows at {args.get('budget', '?')} per method.", "",
             *goal_lines(rows), ""]
    if variants := sorted({r["variant"] for r in rows if r.get("variant")}):
        lines[4:4] = [f"Rows of `@variant` sections were trained with these `pretrain` options on top of the defaults "
                      f"of their time: {', '.join(f'`{v}`' for v in variants)}.", ""]
    if why := budget_lines(sections, names[0].partition("@")[0]):
        lines += [*why, ""]
    if over := seed_goal_lines(sections, names[0].partition("@")[0]):
        lines += [*over, ""]
    return lines


def write_goal(out: Path, section: str) -> None:
    """The ``goal`` section: the issue's goal checked against the measured rows in ``tile_ssl.json`` of ``section``
    (or of comma-separated sections of one protocol, later ones re-checking some methods: see :func:`goal_rows`;
    ``;`` separates protocols, e.g. probes fitted on 2,000 and on all 10,000 train tiles: one block each)."""
    js = out.with_suffix(".json")
    saved = json.loads(js.read_text())
    groups = [[s.strip() for s in g.split(",") if s.strip()] for g in section.split(";")]
    groups = [g for g in groups if g]
    key = ";".join(",".join(g) for g in groups)
    if saved.get("goal_sections") != key:
        atomic.write_json(js, {**saved, "goal_sections": key})
    lines = [ln for g in groups for ln in _group_lines(saved["sections"], g)]
    atomic.write_text(out, merge_section(out, "goal", "\n".join(lines) + "\n"))
    print("\n".join(lines))


#: sections made from the others' encoders or rows: last in the report, so ``make bench`` (which re-runs a report's
#: recorded commands in file order) runs them after the runs they read
LAST_SECTIONS = ("finetune", "goal")


def merge_section(path: Path, name: str, body: str) -> str:
    """The report with section ``name`` replaced (or appended); other sections are kept as they are."""
    import re

    head = "# Tile-level self-supervised pre-training: benchmarks\n\n"
    old = path.read_text() if path.is_file() else ""
    if old and "<!-- section:" not in old:  # a report from before sections existed: keep it as 'main'
        old = f"<!-- section: main -->\n{old.replace('# Tile-level SSL', '## Tile-level SSL', 1)}<!-- end -->\n"
    sections = dict(re.findall(r"<!-- section: (\S+) -->\n(.*?)<!-- end -->\n", old, flags=re.S))
    sections[name] = body
    order = ["main"] + sorted(k for k in sections if k not in ("main", *LAST_SECTIONS)) + list(LAST_SECTIONS)
    return head + "".join(f"<!-- section: {k} -->\n{sections[k]}<!-- end -->\n" for k in order if k in sections)


if __name__ == "__main__":
    main()

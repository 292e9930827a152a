"""Tile SSL in bf16 autocast vs fp32 on CPU, at equal steps: is bf16 as good per step, and how much faster?

What ``gigaslide pretrain --precision auto`` trains in on CPU comes from here (issue #19: defaults that
make the budget count). For each method, the same run (ResNet-18, PCam train tiles at the native 96 px,
the method's own recipe, seed 0, ``--steps N``, no data-loader worker process) once in fp32 and once in
bf16 autocast; both exported encoders are probed like ``bench_tile_ssl.py`` does (linear and k-NN on frozen
features, fitted on 2,000 balanced PCam train tiles, scored on 3,000 PCam valid tiles) and compared with a
**paired** bootstrap on the same test tiles. Train images/s is the run's own (start-up included).

    .venv/bin/python benchmarks/bench_tile_precision.py --methods simclr,mocov2,barlowtwins,swav,dino --steps 400

Runs go to ``--runs-dir`` and are reused by a re-run (a finished run trains no more). The measured rows are
kept in ``results/tile_precision.json``; ``--render`` rewrites the report from them without training (e.g.
after a method's ``cpu_bf16_basis`` changed; ``tests/test_bench_tile_precision.py`` checks that the methods
with a basis are exactly those whose verdict here is "as good as").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, stop_if_interrupted, write_result  # noqa: E402
from bench_tile_ssl import PCAM_MPP, ci, dci, load_split, paired, pcam_dir, probe  # noqa: E402

from gigaslide import atomic  # noqa: E402

JSON = Path(__file__).resolve().parent / "results" / "tile_precision.json"

#: a bf16 run counts as "as good as fp32" when the paired CI of its linear balanced-accuracy difference
#: lies above this (a loss of at most one point is tolerated, at ~1.4x the steps per second)
NON_INFERIORITY = -0.01


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="simclr,mocov2,barlowtwins,swav,dino")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--runs-dir", default="/tmp/gs-tile-precision")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="rewrite the report from the saved rows, train nothing")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(JSON.read_text())
        write_report(argparse.Namespace(**saved["args"]), saved["rows"], saved["total_s"], saved["note"],
                     command=saved["command"], stamp=saved["stamp"])
        return
    torch.set_num_threads(args.threads)
    from gigaslide.encoders import build_encoder
    from gigaslide.ssl.tile.engine import PretrainConfig, pretrain

    t_start, note = time.perf_counter(), load_note()
    pcam = pcam_dir()
    tr = load_split(pcam / "train", 2000, seed=0)
    te = load_split(pcam / "valid", 3000, seed=1)
    rows = []
    for method in args.methods.split(","):
        got = {}
        for prec in ("fp32", "bf16"):
            out = Path(args.runs_dir) / f"{method}-{args.steps}-{prec}"
            cfg = PretrainConfig(data=str(pcam / "train"), out=str(out), method=method, backbone="resnet18",
                                 mpp=[PCAM_MPP], tile_size=96, steps=args.steps, workers=0, precision=prec,
                                 data_kind="tiles")
            rec = out / "run.json"
            reused = rec.is_file() and json.loads(rec.read_text()).get("status") == "finished"
            s = stop_if_interrupted(pretrain(cfg))
            run = json.loads((out / "run.json").read_text())
            summ = run["summary"]  # the run's own (also when this invocation found it finished)
            losses = [h["loss"] for h in run.get("history", []) if h.get("loss") is not None]
            r = probe(build_encoder(str(out / "encoder")), tr, te, args.bootstrap)
            got[prec] = {"probe": r, "images_per_s": summ.get("images_per_s"), "steps": summ.get("steps"),
                         "last_loss": summ.get("final_loss"), "finite": all(math.isfinite(v) for v in losses),
                         "reused": reused}
            print(method, prec, ci(r["linear"]["balanced_accuracy"]), got[prec]["images_per_s"], flush=True)
        d = paired(te[1], got["bf16"]["probe"], got["fp32"]["probe"], args.bootstrap)
        for g in got.values():  # the saved rows keep the metrics, not every test tile's probabilities
            g["probe"] = {k: v for k, v in g["probe"].items() if k != "probs"}
        rows.append({"method": method, **got, "diff": d})
    total = time.perf_counter() - t_start
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic.write_json(JSON, {"args": {k: v for k, v in vars(args).items() if k != "render"}, "rows": rows,
                             "total_s": total, "note": note, "stamp": stamp, "command": sys.argv})
    write_report(args, rows, total, note, command=sys.argv, stamp=stamp)


def bf16_as_good(row: dict) -> bool:
    """The verdict: the paired 95 % CI of bf16 − fp32 linear balanced accuracy lies above NON_INFERIORITY and the
    bf16 run's loss stayed finite."""
    return row["diff"]["linear_balanced_accuracy"]["ci_low"] > NON_INFERIORITY and row["bf16"]["finite"]


def write_report(args: argparse.Namespace, rows: list[dict], total: float, note: str, command: list[str],
                 stamp: str) -> None:
    n_reused = sum(r[p]["reused"] for r in rows for p in ("fp32", "bf16"))
    lines = ["# Tile SSL on CPU: bf16 autocast vs fp32 at equal steps", "",
             f"ResNet-18, PCam train tiles at 96 px, each method's own recipe, seed 0, {args.steps} steps in each "
             "precision, no data-loader worker process, "
             f"{args.threads} torch threads; {note}. Probes on frozen features (fitted on 2,000 PCam train tiles, scored "
             "on 3,000 PCam valid tiles), paired bootstrap of bf16 − fp32 on the same test tiles "
             f"({args.bootstrap} resamples). Wall time of this invocation {total / 60:.1f} min"
             + (f"; {n_reused} of {2 * len(rows)} runs were finished by an earlier invocation and reused (their "
                "images/s are their own)." if n_reused else "."), "",
             "| method | fp32 train img/s | bf16 train img/s | bf16 speed-up | fp32 linear bal. acc. | bf16 linear bal. acc. | "
             "Δ linear (bf16 − fp32, paired) | Δ k-NN (paired) | loss finite (fp32 / bf16) | last loss fp32 / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in rows:
        f, b, d = r["fp32"], r["bf16"], r["diff"]
        up = b["images_per_s"] / f["images_per_s"] if f["images_per_s"] and b["images_per_s"] else float("nan")
        ll = " / ".join("-" if x["last_loss"] is None else f"{x['last_loss']:.3f}" for x in (f, b))
        lines.append(f"| {r['method']} | {f['images_per_s']} | {b['images_per_s']} | ×{up:.2f} | "
                     f"{ci(f['probe']['linear']['balanced_accuracy'])} | {ci(b['probe']['linear']['balanced_accuracy'])} | "
                     f"{dci(d['linear_balanced_accuracy'])} | {dci(d['knn_balanced_accuracy'])} | "
                     f"{'yes' if f['finite'] else 'NO'} / {'yes' if b['finite'] else 'NO'} | {ll} |")
        lo = d["linear_balanced_accuracy"]["ci_low"]
        ok = bf16_as_good(r)
        verdicts.append(f"- {r['method']}: bf16 {'as good as' if ok else 'NOT shown as good as'} fp32 per step "
                        f"(paired CI low end {lo:+.3f} {'>' if lo > NON_INFERIORITY else '<='} {NON_INFERIORITY:+.2f}), "
                        f"×{up:.2f} the images/s")
    from gigaslide.ssl.tile.methods import SSL_METHODS

    marked = [r["method"] for r in rows if SSL_METHODS.get(r["method"]).cpu_bf16_basis]
    lines += ["", f"Verdicts (computed: bf16 counts as good as fp32 when the paired 95 % CI of Δ linear balanced "
              f"accuracy lies above {NON_INFERIORITY:+.2f} and its loss stayed finite):", "", *verdicts, "",
              "`pretrain --precision auto` on a CPU with native bf16 trains in bf16 for: "
              f"{', '.join(marked) or 'none'} (the methods' `cpu_bf16_basis` in `gigaslide.ssl.tile.methods`, read "
              "when this was written); the others train in fp32."]
    print(write_result("tile_precision", "\n".join(lines), command=command, stamp=stamp).read_text())


if __name__ == "__main__":
    main()

"""Tiling a batch of slides: one slide after another vs one slide per core (``gigaslide.tiling.parallel.tile_many``).

``encode`` tiles every slide without a tile grid before its first forward pass (and ``gigaslide tile`` tiles a
folder); one process did it one slide after another. Two measurements, each arm in a fresh output folder, arms
alternating, median of --repeats:

1. the tiling phase alone: ``tile_many(workers=1)`` vs ``tile_many(workers=cores)`` on the same generated slides,
   with the overlays ``encode`` writes by default; the coords the two arms write are compared;
2. ``encode_slides`` end to end with a tiny fast encoder (``test_resnet``: a stand-in for a GPU that embeds
   thousands of tiles a second, where tiling is what the model waits for): tiling first in one process, tiling
   first over the cores (the CPU default), and tiling while encoding (``tile_ahead=True``, the CUDA default):
   total seconds and the time before the first forward pass.

    .venv/bin/python benchmarks/bench_tiling_parallel.py [--slides 8 --size 8192 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import load_note, write_result  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gigaslide.encoders import build_encoder  # noqa: E402
from gigaslide.features import extract  # noqa: E402
from gigaslide.testing import make_slide  # noqa: E402
from gigaslide.tiling import TilingParams  # noqa: E402
from gigaslide.tiling.parallel import tile_many, tiling_workers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="gs-bench-tilepar-"))
    slides = [make_slide(work / f"s{i}.tiff", (args.size, args.size), mpp=0.5, seed=40 + i, blobs=5) for i in range(args.slides)]
    params = TilingParams(0.5, 224, 0, 0.25)
    cores = tiling_workers(len(slides))
    arms = {"one process": 1, f"{cores} processes": cores}
    tiling: dict[str, list[float]] = {a: [] for a in arms}
    coords: dict[str, dict[str, np.ndarray]] = {}
    k = 0
    for r in range(args.repeats):
        for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            k += 1
            t = time.perf_counter()
            got = {p.stem: g for p, g, err in tile_many(slides, str, work / f"t{k}", params, workers=arms[arm])}
            tiling[arm].append(time.perf_counter() - t)
            coords[arm] = {s: g.coords for s, g in got.items()}
    same = all(np.array_equal(coords["one process"][s], coords[f"{cores} processes"][s]) for s in coords["one process"])
    tiles = sum(len(c) for c in coords["one process"].values())

    enc = build_encoder("test_resnet", "random", seed=0)
    ahead_w = max(1, cores // 2)
    ahead = f"while encoding, {ahead_w} process{'es' if ahead_w > 1 else ''}"
    enc_arms = {**{a: (w, False) for a, w in arms.items()}, ahead: (ahead_w, True)}
    phase: dict[str, list[float]] = {a: [] for a in enc_arms}
    total: dict[str, list[float]] = {a: [] for a in enc_arms}
    for r in range(args.repeats):
        for arm in (list(enc_arms) if r % 2 == 0 else list(enc_arms)[::-1]):
            k += 1
            res = extract.encode_slides(slides, work / f"e{k}", enc, params, batch_size=64, precision="fp32",
                                        tile_workers=enc_arms[arm][0], tile_ahead=enc_arms[arm][1])
            assert res.tiles == tiles and not res.failed, (res.tiles, tiles, res.failed)
            total[arm].append(res.seconds)
            phase[arm].append(res.tiling_seconds)

    one, many = "one process", f"{cores} processes"
    med = {a: statistics.median(v) for a, v in tiling.items()}
    lines = ["# Tiling a batch of slides: one after another vs one per core", "",
             f"{args.slides} generated pyramidal JPEG TIFFs of {args.size}² px at 0.5 µm/px ({tiles} tiles of 224 px at "
             f"0.5 µm/px, min tissue 0.25), tissue + grid + the overlays `encode` writes by default (tissue PNG and "
             f"GeoJSON, grid PNG). Arms alternate, each in a fresh output folder; median of {args.repeats}. "
             f"Load: {load_note()}.", "",
             "| arm | tiling phase s (per run) | s per slide |", "|---|---|---|"]
    for a in arms:
        lines.append(f"| {a} | {med[a]:.2f} ({', '.join(f'{x:.2f}' for x in tiling[a])}) | {med[a] / args.slides:.3f} |")
    lines += ["", f"`encode_slides` end to end with the tiny `test_resnet` encoder (fp32, batch 64, 2 torch threads; a "
              "stand-in for a fast GPU): tiling before the first forward pass in one process (`tile_workers=1`) or over "
              f"the cores (the CPU default), and tiling while encoding (`tile_ahead=True`, the CUDA default: {ahead_w} "
              "spawned process(es) tile the next slides while the model runs; on this CPU they share the model's cores). "
              "`tiling s` = the time before the first forward pass:", "",
              "| arm | encode total s (per run) | of which tiling s | tiling share |", "|---|---|---|---|"]
    for a in enc_arms:
        t, p = statistics.median(total[a]), statistics.median(phase[a])
        lines.append(f"| {a} | {t:.2f} ({', '.join(f'{x:.2f}' for x in total[a])}) | {p:.2f} | {p / t:.0%} |")
    t1, tn, ta = statistics.median(total[one]), statistics.median(total[many]), statistics.median(total[ahead])
    lines += ["", "Verdicts (computed from the rows above):", "",
              f"- tiling phase: ×{med[one] / med[many]:.2f} faster with {cores} processes than with one "
              f"({med[one]:.2f} s → {med[many]:.2f} s for {args.slides} slides).",
              f"- encode with a fast encoder: {t1:.2f} s → {tn:.2f} s (×{t1 / tn:.2f}); tiling's share "
              f"{statistics.median(phase[one]) / t1:.0%} → {statistics.median(phase[many]) / tn:.0%}.",
              f"- tiling while encoding vs tiling first over the cores, on this CPU: {tn:.2f} s → {ta:.2f} s "
              f"(×{tn / ta:.2f}; the tiling processes and the model share {cores} cores here, unlike on a GPU node).",
              f"- the coords both arms write are identical: {'yes' if same else 'NO'}.",
              f"- measured with {cores} processes, the cores this machine has; other core counts are not measured here."]
    write_result("tiling_parallel", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

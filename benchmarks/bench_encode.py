"""Encode end to end vs the same model's forward pass alone on the same tiles (same run).

Target (spine issue): ratio >= 0.95, i.e. reading + decoding fully hidden behind compute.
Also: peak RSS of encoding one slide as the slide grows (generated 10k², 20k², 40k²).

    .venv/bin/python benchmarks/bench_encode.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_note, run_child_peak_rss, write_result  # noqa: E402

from gigaslide.devices import autocast_ctx  # noqa: E402
from gigaslide.encoders import build_encoder  # noqa: E402
from gigaslide.features.extract import encode_slides  # noqa: E402
from gigaslide.slides import iter_tiles  # noqa: E402
from gigaslide.testing import make_slide, shared_data_dir  # noqa: E402
from gigaslide.tiling import TilingParams, tile_slide  # noqa: E402


def forward_only(encoder, batches, precision: str) -> float:  # noqa: ANN001
    dev = torch.device("cpu")
    t = time.perf_counter()
    with torch.inference_mode(), autocast_ctx(dev, precision):
        for b in batches:
            encoder(b)
    return time.perf_counter() - t


def e2e_vs_forward(slides: list[Path], encoder_name: str, params: TilingParams, repeats: int, work: Path) -> dict:
    """One ``encode_slides`` call over ``slides`` (tiles made beforehand) vs the forward pass on the same tiles."""
    torch.set_num_threads(2)
    enc = build_encoder(encoder_name, "random").to(memory_format=torch.channels_last)
    batches = []
    n = 0
    for slide in slides:  # a batch never spans two slides, in encode as here
        grid = tile_slide(slide, work / "tiles", params, overlays=False)
        tiles = np.stack(list(iter_tiles(slide, grid.coords, params.tile_size, params.mpp)))  # pre-read into memory
        batches += [torch.from_numpy(tiles[i:i + 64]) for i in range(0, len(tiles), 64)]
        n += len(grid)
    e2e, fwd = [], []
    for r in range(repeats):  # interleaved so background load hits both alike
        out = work / f"e2e{r}"
        for slide in slides:
            tile_slide(slide, out, params, overlays=False)  # tiles exist, so encode_slides only reads + encodes
        res = encode_slides(slides, out, enc, params, batch_size=64, workers=1, precision="bf16", overlays=False)
        assert res.tiles == n, (res.tiles, n, res.failed)
        e2e.append(res.seconds)
        fwd.append(forward_only(enc, batches, "bf16"))
        for f in (out / "features").glob("*.h5"):
            f.unlink()  # the next round encodes again
    e, f = statistics.median(e2e), statistics.median(fwd)
    # this VM's speed drifts by up to 2x over minutes: the ratio is taken per back-to-back pair, then the median
    ratio = statistics.median(fi / ei for fi, ei in zip(fwd, e2e))
    return {"tiles": n, "e2e_s": e, "fwd_s": f, "e2e_tps": n / e, "fwd_tps": n / f, "ratio": ratio,
            "ratios": [round(fi / ei, 3) for fi, ei in zip(fwd, e2e)]}


def rss_vs_size(sizes: list[int], work: Path) -> list[tuple[int, float, int]]:
    rows = []
    for s in sizes:
        p = make_slide(work / f"gen{s}.tiff", (s, s), mpp=0.5, seed=s, blobs=4)
        code = (f"import torch; torch.set_num_threads(2)\n"
                f"from gigaslide.encoders import build_encoder\n"
                f"from gigaslide.features.extract import encode_slides\n"
                f"from gigaslide.tiling import TilingParams\n"
                f"r = encode_slides([{str(p)!r}], {str(work / f'rss{s}')!r}, build_encoder('resnet18', 'random'), "
                f"TilingParams(1.0, 224, 0, 0.25), workers=1, precision='bf16', overlays=False)\n"
                f"print(r.tiles)\n")
        gb, out = run_child_peak_rss(code)
        rows.append((s, gb, int(out.strip().splitlines()[-1])))
        print(f"  {s}²: peak RSS {gb:.2f} GB, {rows[-1][2]} tiles", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    shared = shared_data_dir()
    slide = shared / "slides" / "cmu-1-small-region.svs" if shared else make_slide(work / "s.tiff", (4096, 4096))
    lines = ["# Spine: encode throughput and memory", ""]
    lines += ["## Encode end to end vs forward pass alone (same tiles, same run)", "",
              "ResNet-18 and ResNet-50 (random weights; speed does not depend on them), bf16 autocast, channels_last, batch 64, "
              "1 reader process (the persistent pool of `encode`, reading with `iter_tiles`' decode-once path) + 2 torch threads, "
              "median of 5 (--quick: 3) back-to-back pairs. `ratio` = median over pairs of forward-only time / end-to-end time (1.0 = "
              "reading fully hidden). End to end includes the reader pool's start-up and the pipeline fill and, on 2 cores, "
              "the reader's CPU is taken from the model's two threads. " + load_note() + ": the VM's speed drifts, hence "
              "back-to-back pairs. TARGET_LINE", "",
              "| slide | encoder | tiles | end-to-end tiles/s | forward-only tiles/s | ratio (per pair) |", "|---|---|---|---|---|---|"]
    gen = make_slide(work / "generated-6k.tiff", (6144, 6144), mpp=0.5, seed=7, blobs=5)
    big = work / "generated-12k.tiff" if args.quick else make_slide(work / "generated-12k.tiff", (12288, 12288), mpp=0.5,
                                                                    seed=8, blobs=5)
    smalls = [make_slide(work / f"generated-2k-{i}.tiff", (2048, 2048), mpp=0.5, seed=20 + i, blobs=3) for i in range(8)]
    params = TilingParams(0.5, 224, 0, 0.25)
    cases = [([slide], "resnet18", slide.name), (smalls, "resnet18", "8 generated 2k² slides, one run"),
             ([gen], "resnet18", gen.name), ([big], "resnet18", big.name), ([gen], "resnet50", gen.name)]
    measured, pairs = [], []
    for sl, name, label in cases[:3] if args.quick else cases:
        r = e2e_vs_forward(sl, name, params, 3 if args.quick else 5, work)
        print(r, flush=True)
        measured.append((r["ratio"], f"{name}, {label}"))
        pairs += r["ratios"]
        lines.append(f"| {label} @0.5 µm/px | {name} | {r['tiles']} | {r['e2e_tps']:.1f} | {r['fwd_tps']:.1f} | **{r['ratio']:.3f}** ({', '.join(map(str, r['ratios']))}) |")
    if measured:
        ok = sum(r >= 0.95 for r, _ in measured)
        lo, hi = min(measured), max(measured)
        verdict = (f"Target >= 0.95: met on {ok} of {len(measured)} rows (best {hi[0]:.2f}: {hi[1]}; worst {lo[0]:.2f}: "
                   f"{lo[1]}).")
        if max(pairs) > 1.02:  # end to end cannot beat the forward pass it contains: the rest is the machine's noise
            verdict += (f" Single pairs range {min(pairs):.2f}-{max(pairs):.2f}, above 1 in {sum(p > 1 for p in pairs)} of "
                        f"{len(pairs)}: the machine's drift is larger than the reading cost, so the target is not shown "
                        "at this noise level, only not contradicted.")
        lines = [ln.replace("TARGET_LINE", verdict) for ln in lines]
    lines += ["", "## Peak RSS of encoding one generated slide as it grows", "",
              "Generated pyramidal TIFF, tiles of 224 px at 1 µm/px, ResNet-18, each size in a fresh process.", "",
              "| slide | tiles | peak RSS (GB) |", "|---|---|---|"]
    sizes = [10_000] if args.quick else [10_000, 20_000, 40_000]
    for s, gb, n in rss_vs_size(sizes, work):
        lines.append(f"| {s}×{s} | {n} | {gb:.2f} |")
    print(write_result("encode", "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()

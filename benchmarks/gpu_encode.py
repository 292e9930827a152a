"""GPU encode throughput: model-only forward vs end-to-end encode (CPU readers, or tiles decoded on the GPU), and
reader-only tiles/s by process count.

    .venv/bin/python benchmarks/gpu_encode.py --mode tiny --out /tmp/gpu_tiny.md   # CPU, seconds (CI)
    .venv/bin/python benchmarks/gpu_encode.py --mode full --out benchmarks/results/gpu_encode.md   # a lent GPU

``full``: ResNet-50, ViT-S/16 and ViT-L/16 at 224 px with random weights (speed does not depend on
them), batch 256, the device's autocast (bf16), on a generated pyramidal JPEG TIFF at 0.5 µm/px
(tiled once beforehand, so end to end = reading + decoding + copying + the model). Model-only runs
the same number of batches of uint8 tiles already on the device (normalisation included). The
end-to-end path is ``gigaslide encode``'s: a persistent reader pool (``--readers``, default sized to
the machine), uint8 batches pinned and copied ``non_blocking``, normalised on the GPU; and the same with the
stored JPEG tiles decoded and cut on the GPU (``decode_device``, nvJPEG) instead of by reader processes.
Then the stored JPEG tiles of the generated slide (and of ``cmu-1-small-region.svs``, an Aperio SVS with RGB JPEG
tiles, where the shared data or .gpu/data has it) decoded on the device in batches (nvJPEG through torchvision's
``decode_jpeg``) vs imagecodecs on one CPU thread (the reader's decoder), the same
self-contained streams (:meth:`TiffLevel.jpeg_stream`), pixels compared: whether GPU JPEG decoding would pay.
Then ``encode`` from scratch on a batch of small untiled slides (16 of 4096² in full mode), tiling all slides first
over the cores vs tiling them while earlier slides are encoded (``tile_ahead``, the CUDA default, chosen without a
GPU measurement: this row is the one that decides it).
``tiny``: the same code on CPU with the tiny test encoders and a small slide.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from gigaslide.devices import autocast_ctx, choose_precision, pick_device  # noqa: E402
from gigaslide.encoders import build_encoder  # noqa: E402
from gigaslide.features import store  # noqa: E402
from gigaslide.features.extract import encode_slides  # noqa: E402
from gigaslide.features.parallel import auto_workers, rank_info  # noqa: E402
from gigaslide.slides import open_slide  # noqa: E402
from gigaslide.slides.pool import ReaderPool, ReadTask  # noqa: E402
from gigaslide.slides.tiled import open_tiff_level  # noqa: E402
from gigaslide.testing import make_slide, shared_data_dir  # noqa: E402
from gigaslide.tiling import TilingParams, tile_slide  # noqa: E402

MODES = {
    "tiny": {"encoders": ["test_resnet", "test_vit"], "size": 1024, "tile": 64, "mpp": 0.5, "batch": 16,
             "readers": [1, 2], "scratch_slides": 2, "scratch_size": 768, "jpeg_tiles": 16},
    "full": {"encoders": ["resnet50", "vit_small", "uni"], "size": 16384, "tile": 224, "mpp": 0.5, "batch": 256,
             "readers": [1, 4, 8, 16], "scratch_slides": 16, "scratch_size": 4096, "jpeg_tiles": 4096},
}
READER_BATCH = 64  # small enough that 16 processes all get work
LABEL = {"uni": "ViT-L/16 (uni arch)", "vit_small": "ViT-S/16", "resnet50": "ResNet-50"}


def model_only(enc, dev: torch.device, n: int, tile: int, batch: int, precision: str, compile_model: bool) -> float:  # noqa: ANN001
    model = enc.to(dev).eval()
    if enc.spec.family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    x = torch.randint(0, 256, (batch, tile, tile, 3), dtype=torch.uint8, device=dev)
    choice = choose_precision(dev, precision, probe=lambda: model(x[:8]))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast_ctx(dev, choice.resolved):
        model(x)  # warm-up (and compilation)
        sync()
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            model(x)
        sync()
    return max(1, n // batch) * batch / (time.perf_counter() - t)


def reader_only(coords, slide: Path, tile: int, mpp: float, batch: int, procs: int) -> float:  # noqa: ANN001
    t = time.perf_counter()
    with ReaderPool(procs, slot_bytes=batch * tile * tile * 3) as pool:
        nxt, n = 0, 0
        while nxt < len(coords) or pool.pending:
            while nxt < len(coords) and pool.pending < pool.max_pending:
                pool.submit(ReadTask(nxt, str(slide), coords[nxt:nxt + batch], tile, mpp))
                nxt += batch
            _, px, _ = pool.get()
            assert not isinstance(px, str), px
            n += len(px)
    return n / (time.perf_counter() - t)


def _batch_decoder():  # noqa: ANN202
    """torchvision's ``decode_jpeg`` (lists of streams, nvJPEG on CUDA); deprecated since torchvision 0.29 in favour of
    TorchCodec's, which the pinned stack does not include."""
    import warnings

    from torchvision.io import decode_jpeg

    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
    return "torchvision decode_jpeg", decode_jpeg


def jpeg_decode(slides: list[Path], dev: torch.device, max_tiles: int) -> list[str]:
    """Stored JPEG tiles of each slide's level 0, decoded by imagecodecs on one CPU thread and by the batch decoder
    on ``dev`` (lists of 256 streams; nvJPEG on CUDA), the same streams; pixels compared tile by tile."""
    import imagecodecs
    import numpy as np

    name, decode = _batch_decoder()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    lines = ["", f"JPEG decoding of stored tiles: imagecodecs on one CPU thread (what the readers use) vs {name} on "
             f"{dev.type} (batches of 256; input bytes already in memory, output left on the device), the same "
             "self-contained streams (`TiffLevel.jpeg_stream`); `max diff` = largest per-channel difference to "
             "imagecodecs' pixels over every tile:", "",
             "| slide | photometric | stored tiles | tile px | imagecodecs tiles/s | batch decoder tiles/s | × "
             "| max diff |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for slide in slides:
        with open_slide(slide) as s:
            size = s.dimensions
        level = open_tiff_level(slide, size, 224)
        if level is None or not level.is_jpeg:
            lines.append(f"| {slide.name} | - | not a tiled JPEG TIFF | | | | | |")
            continue
        streams = [b for b in (level.jpeg_stream(i) for i in range(min(len(level.page.dataoffsets), max_tiles))) if b]
        photometric = {2: "RGB", 6: "YCbCr"}.get(int(level.page.photometric), str(level.page.photometric))
        level.close()
        t = time.perf_counter()
        ref = [imagecodecs.jpeg8_decode(b) for b in streams]
        cpu = len(streams) / (time.perf_counter() - t)
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in streams]
        decode(data[:8], device=dev)  # warm-up (decoder handles, memory pools)
        sync()
        t = time.perf_counter()
        out = [im for k in range(0, len(data), 256) for im in decode(data[k:k + 256], device=dev)]
        sync()
        batch = len(streams) / (time.perf_counter() - t)
        diff = max(int(np.abs(o.permute(1, 2, 0).cpu().numpy().astype(np.int16) - r).max()) for o, r in zip(out, ref))
        ratios.append((slide.name, batch / cpu, diff))
        px = f"{ref[0].shape[1]}×{ref[0].shape[0]}"
        lines.append(f"| {slide.name} | {photometric} | {len(streams)} | {px} | {cpu:.0f} | {batch:.0f} | "
                     f"{batch / cpu:.2f} | {diff} |")
    for slide_name, r, diff in ratios:
        same = "the same pixels (≤ 2)" if diff <= 2 else f"DIFFERENT pixels (max {diff})"
        if dev.type != "cuda":
            lines.append(f"- {slide_name}: {same}; on CPU this checks the code path, it does not measure GPU decoding")
            continue
        lines.append(f"- {slide_name}: the batch decoder on the GPU = {r:.1f} CPU threads of imagecodecs, {same}: "
                     + (f"it pays where fewer than {math.ceil(r)} cores per GPU are left for decoding"
                        if r > 1 else "it does not pay"))
    return lines


def from_scratch(cfg: dict, dev: torch.device, readers: int, work: Path) -> list[str]:
    """``encode`` on a batch of untiled slides with the first encoder, both ways of tiling side by side: all slides
    first over every core (the CPU default), and in the background while earlier slides are encoded (the CUDA
    default, ``tile_ahead``) -- what a GPU waits for when a batch holds many small slides."""
    n, size = cfg["scratch_slides"], cfg["scratch_size"]
    slides = [make_slide(work / f"scratch{i}.tiff", (size, size), mpp=0.5, seed=50 + i, blobs=5) for i in range(n)]
    params = TilingParams(cfg["mpp"], cfg["tile"], 0, 0.25)
    enc = build_encoder(cfg["encoders"][0], "random")
    lines = ["", f"From scratch: `encode_slides` on {n} untiled {size}² slides "
             f"({LABEL.get(cfg['encoders'][0], cfg['encoders'][0])}, overlays on as in `gigaslide encode`); "
             "`before first forward` = tiling that ran before the first batch:", "",
             "| tiling | tiles | total s | before first forward s | end-to-end tiles/s |", "|---|---|---|---|---|"]
    for label, ahead in (("all first, over the cores", False), ("while encoding (tile_ahead)", True)):
        res = encode_slides(slides, work / f"scratch-out-{int(ahead)}", enc, params, batch_size=cfg["batch"],
                            workers=readers, precision="auto", device=str(dev), tile_ahead=ahead)
        assert len(res.done) == n, res.failed
        lines.append(f"| {label} | {res.tiles} | {res.seconds:.2f} | {res.tiling_seconds:.2f} | {res.tiles / res.seconds:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=sorted(MODES), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--readers", type=int, default=None, help="reader processes for end to end (default: sized to the machine)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (model-only and end to end)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    cfg = MODES[args.mode]
    dev = pick_device("auto") if args.mode == "full" else torch.device("cpu")
    if args.mode == "full" and dev.type != "cuda":
        raise SystemExit("--mode full needs a CUDA device")
    torch.set_num_threads(int(os.environ.get("GIGASLIDE_THREADS", "2")))
    work = Path(args.work or tempfile.mkdtemp(prefix="gs-gpu-"))
    s = cfg["size"]
    t = time.perf_counter()
    slide = make_slide(work / f"gen{s}.tiff", (s, s), mpp=0.5, seed=3, blobs=5)
    t_make = time.perf_counter() - t
    params = TilingParams(cfg["mpp"], cfg["tile"], 0, 0.25)
    grid = tile_slide(slide, work / "tiles", params, overlays=False)
    coords = grid.coords
    readers = args.readers if args.readers is not None else auto_workers(dev, rank_info())
    lines = [f"# Encode throughput on {'the GPU' if dev.type == 'cuda' else 'CPU'} ({args.mode} mode)", "",
             f"Generated {s}² pyramidal JPEG TIFF (made in {t_make:.0f} s), {len(grid)} tissue tiles of {cfg['tile']} px at "
             f"{cfg['mpp']} µm/px. Batch {cfg['batch']}, random weights, precision auto "
             f"(bf16 autocast on CUDA), compile={args.compile}. End to end: `encode_slides` with {readers} reader processes "
             "(persistent pool, pinned uint8 batches, non_blocking copies, normalisation on the device), tiles already "
             f"made. `decoded on {dev.type}`: the same with `decode_device={dev.type!r}` (stored JPEG tiles "
             "decoded and cut on the device in the main process, no reader processes; `encode --decode-device`).",
             "", "| encoder | model-only tiles/s | end-to-end tiles/s | ratio | end to end, decoded on "
             f"{dev.type}: tiles/s | ratio | reader |", "|---|---|---|---|---|---|---|"]
    for name in cfg["encoders"]:
        try:
            enc = build_encoder(name, "random")
            fwd = model_only(enc, dev, len(coords), cfg["tile"], cfg["batch"], "auto", args.compile)
            e2e = []
            for dd in (None, dev.type):
                out = work / f"e2e-{name}-{dd}"
                tile_slide(slide, out, params, overlays=False)
                res = encode_slides([slide], out, enc, params, batch_size=cfg["batch"], workers=readers,
                                    precision="auto", device=str(dev), overlays=False, compile_model=args.compile,
                                    decode_device=dd)
                assert res.done and res.tiles == len(coords), (res.failed, res.tiles)
                e2e.append(res.tiles / res.seconds)
            reader = store.read_attrs(out / "features" / f"{slide.stem}.h5").get("reader")
            lines.append(f"| {LABEL.get(name, name)} | {fwd:.0f} | {e2e[0]:.0f} | {e2e[0] / fwd:.2f} | {e2e[1]:.0f} | "
                         f"{e2e[1] / fwd:.2f} | {reader} |")
        except Exception as e:  # noqa: BLE001 - one encoder failing must not lose the other rows (full mode)
            if args.mode == "tiny":
                raise
            lines.append(f"| {LABEL.get(name, name)} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | |")
        print(lines[-1], flush=True)
        _write(args.out, lines)  # partial results survive a time limit
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    shared = shared_data_dir()
    svs = shared / "slides" / "cmu-1-small-region.svs" if shared else None
    try:
        lines += jpeg_decode([slide] + ([svs] if svs and svs.is_file() else []), dev, cfg["jpeg_tiles"])
    except Exception as e:  # noqa: BLE001 - keep the other rows (full mode)
        if args.mode == "tiny":
            raise
        lines += ["", f"JPEG decoding: failed: {type(e).__name__}: {str(e)[:200]}"]
    _write(args.out, lines)
    try:
        lines += from_scratch(cfg, dev, readers, work)
    except Exception as e:  # noqa: BLE001 - keep the reader rows (full mode)
        if args.mode == "tiny":
            raise
        lines += ["", f"From scratch: failed: {type(e).__name__}: {str(e)[:200]}"]
    _write(args.out, lines)
    lines += ["", f"Reader only (decode + cut, no model), {len(coords)} tiles, batches of {READER_BATCH}:", "",
              "| reader processes | tiles/s |", "|---|---|"]
    for p in cfg["readers"]:
        lines.append(f"| {p} | {reader_only(coords, slide, cfg['tile'], cfg['mpp'], READER_BATCH, p):.0f} |")
        print(lines[-1], flush=True)
        _write(args.out, lines)
    print(Path(args.out).read_text())


def _write(out: str, lines: list[str]) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + f"\n\n_Measured {stamp} on {machine()}; command: "
                         f"`{' '.join([Path(sys.executable).name, *sys.argv])}`_\n")


if __name__ == "__main__":
    main()

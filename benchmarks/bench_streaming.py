"""Streaming vs dense ResNet-34 forward+backward: peak RSS, time, gradient error.

Every configuration runs in a fresh subprocess (peak RSS = that process's VmHWM / ru_maxrss). The
image is kept as uint8 and normalised crop by crop (``transform``), for dense as well (dense
converts the whole image). Loss: mean of squares of the feature map. Dense runs only where it
fits safely (<= 2048^2 here; 4096^2 needs ~11 GB and is run only with --dense-4096 and >= 16 GB free).

Large streamed sizes are *partial*: the full-size buffers (uint8 image, feature map, its gradient,
parameter gradients) are allocated and the first ``--tiles`` full-size tiles are run forward and
backward, so the measured peak RSS is that of a full run (every tile has the same size); the time is
extrapolated as (time per tile) x (number of tiles) and marked as such.

Run: .venv/bin/python benchmarks/bench_streaming.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "streaming.md"


def _trunk():  # noqa: ANN202
    import timm
    import torch

    torch.manual_seed(0)
    m = timm.create_model("resnet34", pretrained=False, num_classes=0, global_pool="").eval()
    return m.to(memory_format=torch.channels_last)


def _image(size: int):  # noqa: ANN202
    import torch

    return torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


def _norm(u):  # noqa: ANN001, ANN202
    return (u.float() - 128.0) / 64.0


def one(mode: str, size: int, tile: int, max_tiles: int, grads_out: str | None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from gigaslide.streaming import StreamingCNN

    trunk = _trunk()
    img = _image(size)
    rss0 = _hwm()
    t0 = time.perf_counter()
    info: dict = {"mode": mode, "size": size, "tile": tile}
    if mode == "dense":
        y = trunk(_norm(img).contiguous(memory_format=torch.channels_last))
        y.square().mean().backward()
        info.update(tiles=1, tiles_run=1)
    else:
        ckpt = os.environ.get("BENCH_CKPT") == "1"
        stream = StreamingCNN(trunk, tile, transform=_norm, channels_last=True, checkpoint_blocks=ckpt, trim_memory=ckpt)
        info["checkpoint_blocks"] = ckpt
        plan = stream.tiles((size, size))
        n = len(plan)
        info.update(tiles=n)
        if max_tiles and n > max_tiles:
            full = [t for t in plan if t.rows.stop - t.rows.start == tile and t.cols.stop - t.cols.start == tile]
            chosen = (full or plan)[:max_tiles]
            stream.tiles = lambda _size: chosen  # type: ignore[method-assign]
            info.update(tiles_run=len(chosen), partial=True)
        else:
            info.update(tiles_run=n)
        y = stream(img)
        y.square().mean().backward()
    info["seconds"] = time.perf_counter() - t0
    if info.get("partial"):
        info["seconds_extrapolated"] = info["seconds"] / info["tiles_run"] * info["tiles"]
    info["peak_rss_gb"] = _hwm() / 1e9
    info["baseline_rss_gb"] = rss0 / 1e9
    if grads_out:
        from safetensors.torch import save_file

        save_file({k: p.grad.contiguous() for k, p in trunk.named_parameters()}, grads_out)
    return info


def _hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def _spawn(mode: str, size: int, tile: int, max_tiles: int = 0, grads: str | None = None, ckpt: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, str(size), str(tile), str(max_tiles), grads or ""]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_CKPT": "1" if ckpt else "0"})
    if r.returncode != 0:
        return {"mode": mode, "size": size, "tile": tile, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def _grad_error(a_path: str, b_path: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=1, help="tiles run at the large streamed sizes (time extrapolated)")
    ap.add_argument("--big", default="4096,8192,16384", help="streamed-only sizes (partial runs)")
    ap.add_argument("--big-tiles", default="2048,1536", help="tile sizes for the streamed-only sizes")
    ap.add_argument("--big-modes", default="stream,ckpt",
                    help="streamed modes at the big sizes: stream (plain) and/or ckpt (low-memory: activation checkpointing + "
                         "freed memory returned to the OS)")
    ap.add_argument("--full-up-to", type=int, default=0,
                    help="big sizes up to this side run every tile (measured time) instead of --tiles (extrapolated)")
    ap.add_argument("--dense-4096", action="store_true", help="also run dense at 4096^2 (~11 GB) if >= 16 GB free")
    ap.add_argument("--e2e", action="store_true", help="also train end to end on mosaic slides (slow)")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end part (appended to the results file)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gigaslide_bench_streaming"))
    ap.add_argument("--e2e-slides", type=int, default=30)
    ap.add_argument("--e2e-grid", type=int, default=12)
    ap.add_argument("--e2e-tumor", type=float, default=0.25)
    ap.add_argument("--e2e-mpp", type=float, default=1.94)
    ap.add_argument("--e2e-image", type=int, default=1024)
    ap.add_argument("--e2e-tile", type=int, default=480)
    ap.add_argument("--e2e-folds", type=int, default=3)
    ap.add_argument("--e2e-epochs", type=int, default=6)
    ap.add_argument("--e2e-freeze", type=int, default=4)
    ap.add_argument("--e2e-weights", default="random",
                    help="trunk weights, comma-separated: 'random' and/or a ResNet-18 weights file or exported encoder "
                         "folder (e.g. a `gigaslide pretrain` run's encoder/); both methods run once per entry")
    args = ap.parse_args()
    if args.e2e_only:
        lines = e2e(args)
        old = RESULTS.read_text().split("\n## End-to-end")[0].rstrip("\n") if RESULTS.is_file() else ""
        _write(old + "\n" + "\n".join(lines) + f"\n\nCommand: `{' '.join(['.venv/bin/python', *sys.argv])}`\n")
        print("\n".join(lines))
        return
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, tile in ((1024, 992), (2048, 1536)):
            gd, gs = f"{tmp}/d{size}.safetensors", f"{tmp}/s{size}.safetensors"
            d = _spawn("dense", size, size, grads=gd)
            s = _spawn("stream", size, tile, grads=gs)
            if "error" not in d and "error" not in s:
                s["grad_rel_error"] = _grad_error(gs, gd)
            rows += [d, s]
            if size == 2048:  # low-memory mode: same gradients
                gl = f"{tmp}/l{size}.safetensors"
                low = _spawn("stream", size, tile, grads=gl, ckpt=True)
                if "error" not in d and "error" not in low:
                    low["grad_rel_error"] = _grad_error(gl, gd)
                rows.append(low)
        if args.dense_4096 and _mem_available_gb() >= 16:
            rows.append(_spawn("dense", 4096, 4096))
        modes = args.big_modes.split(",")
        for size in (int(v) for v in args.big.split(",") if v):
            for tile in (int(v) for v in args.big_tiles.split(",") if v):
                n = 0 if size <= args.full_up_to else args.tiles
                for m in modes:
                    rows.append(_spawn("stream", size, tile, max_tiles=n, ckpt=m == "ckpt"))
    extra = e2e(args) if args.e2e else []
    write_results(rows, time.time() - t_start, args, extra)


def e2e(args: argparse.Namespace) -> list[str]:
    """StreamingCLAM end to end on mosaic slides vs ABMIL on frozen features of the same trunk and canvases,
    once per trunk initialisation in ``--e2e-weights``."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic
    from gigaslide.streaming.train import TrainConfig
    from gigaslide.testing import shared_data_dir

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    data = shared_data_dir()
    if data is None:
        return ["", "## End-to-end", "", "skipped: no shared data (PCam tiles) found"]
    work = Path(args.work)
    frac = args.e2e_tumor
    mdir = work / f"mosaic_{args.e2e_slides}x{args.e2e_grid}_{int(frac * 100)}pct"
    build_mosaic(data / "tiles" / "pcam" / "train", mdir, MosaicConfig(slides=args.e2e_slides, grid=args.e2e_grid,
                 tumor_fraction=(frac, frac), seed=0), verbose=False)
    rows, notes, sizes = [], [], []
    for k, w in enumerate(args.e2e_weights.split(",")):
        weights = None if w == "random" else w
        name = "random init" if weights is None else f"init `{w}`"
        cfg = TrainConfig(mpp=args.e2e_mpp, image_size=args.e2e_image, tile_size=args.e2e_tile, encoder="resnet18",
                          weights=weights, head="clam_sb", folds=args.e2e_folds, epochs=args.e2e_epochs,
                          freeze_epochs=args.e2e_freeze, accumulate=2, patience=3, seed=0, device="cpu")
        run = work / f"streaming_run_{k}" if k else work / "streaming_run"
        res_s, res_a, t_stream, t_abmil, sizes = _e2e_pair(mdir, run, work / f"abmil_frozen_{k}", cfg)
        rows += [_e2e_row(f"StreamingCLAM (end to end), {name}", res_s, t_stream),
                 _e2e_row(f"ABMIL on the frozen trunk, {name}", res_a, t_abmil)]
        notes.append(f"{name}: " + _checkpoint_note(run, cfg))
    multi = sum(1 for h, w in sizes if max(h, w) > args.e2e_tile)
    return [
        "", "## End-to-end: StreamingCLAM vs ABMIL on frozen features (mosaic slides)", "",
        f"{args.e2e_slides} mosaic slides ({args.e2e_grid}x{args.e2e_grid} PCam train tiles, half positive, tumour "
        f"{frac:.0%} of tissue tiles in positives), read at {args.e2e_mpp} µm/px into tissue-cropped canvases "
        f"(max side {args.e2e_image}; sizes {min(min(s) for s in sizes)}-{max(max(s) for s in sizes)} px, {multi} of "
        f"{len(sizes)} larger than the {args.e2e_tile} px tile, i.e. streamed over several tiles). ResNet-18 trunk "
        "(initialisation per row), same seed for both methods, same canvases and folds "
        f"({args.e2e_folds}-fold CV, validation split inside training folds). StreamingCLAM: CLAM-SB head, {args.e2e_epochs} "
        f"epochs max ({args.e2e_freeze} with the trunk frozen), accumulation 2, early stopping on validation loss "
        "(counted from the first unfrozen epoch), flips/rot90/stain jitter. ABMIL: on the frozen trunk's feature-map "
        "positions (one 512-d instance per 32 px), 30 epochs max, early stopping.", "",
        "| method | AUC [95 % CI] | balanced accuracy [95 % CI] | minutes |", "|---|---|---|---|",
        *rows, "", *[f"* {n}" for n in notes],
    ]


def _e2e_pair(mdir: Path, run: Path, abmil_dir: Path, cfg):  # noqa: ANN001, ANN202
    import numpy as np
    import torch

    from gigaslide.evaluation.slides import evaluate_predictions, write_predictions
    from gigaslide.evaluation.splits import make_folds, read_labels, validation_split
    from gigaslide.mil.train import TrainConfig as MilConfig
    from gigaslide.mil.train import predict, train_fold
    from gigaslide.streaming import StreamingCNN
    from gigaslide.streaming.data import Normalize, cached_canvas
    from gigaslide.streaming.head import build_trunk
    from gigaslide.streaming.train import run_training

    t0 = time.perf_counter()
    res_s = run_training(str(mdir / "slides"), str(mdir / "labels.csv"), str(run), cfg)
    t_stream = time.perf_counter() - t0
    # baseline: the same trunk (seeded as in training, same weights), frozen; ABMIL on its feature-map positions
    t0 = time.perf_counter()
    table = read_labels(mdir / "labels.csv")
    torch.manual_seed(cfg.seed)
    stream = StreamingCNN(build_trunk(cfg.encoder, cfg.weights), cfg.tile_size, transform=Normalize(), channels_last=True)
    canvases = [cached_canvas(mdir / "slides" / f"{s}.tiff", run / "canvases", cfg.mpp, cfg.image_size, stream.stride)
                for s in table.slide_ids]
    with torch.no_grad():
        bags = [stream(c.tensor()[None])[0].flatten(1).T.contiguous() for c in canvases]
    y = table.labels.astype(int)
    groups = table.patient_ids if table.has_patients else None
    probs, fold_of = np.zeros((len(y), 2)), np.zeros(len(y), int)
    for k, (tr, te) in enumerate(make_folds(y, groups, cfg.folds, cfg.seed)):
        tr_i, va_i = validation_split(tr, y, groups, fraction=cfg.val_fraction, seed=cfg.seed + k)
        model, _ = train_fold([bags[i] for i in tr_i], y[tr_i], [bags[i] for i in va_i], y[va_i], bags[0].shape[1], 2,
                              MilConfig(model="abmil", epochs=30, patience=8, seed=cfg.seed, device="cpu"))
        probs[te], _ = predict(model, [bags[i] for i in te])
        fold_of[te] = k
    write_predictions(abmil_dir / "predictions.csv", table.slide_ids, y, probs, fold_of)
    res_a = evaluate_predictions(abmil_dir / "predictions.csv", out=abmil_dir)
    return res_s, res_a, t_stream, time.perf_counter() - t0, [c.image.shape[1:] for c in canvases]


def _e2e_row(name: str, r: dict, t: float) -> str:
    m = r["metrics"]
    return (f"| {name} | {m['auc']['value']:.3f} [{m['auc']['ci_low']:.3f}, {m['auc']['ci_high']:.3f}] | "
            f"{m['balanced_accuracy']['value']:.3f} [{m['balanced_accuracy']['ci_low']:.3f}, "
            f"{m['balanced_accuracy']['ci_high']:.3f}] | {t / 60:.1f} |")


def _checkpoint_note(run: Path, cfg: object) -> str:
    """Which epochs early stopping kept (frozen-trunk epochs mean the test predictions never used a trained trunk)."""
    best = [json.loads(f.read_text())["best_epoch"] for f in sorted(run.glob("fold*/state.json"))]
    frozen = sum(1 for b in best if b is not None and b < cfg.freeze_epochs)  # type: ignore[attr-defined]
    return (f"Checkpoints kept by early stopping (best epoch per fold): {best}; {frozen} of {len(best)} folds kept an "
            f"epoch with the trunk still frozen (epochs < {cfg.freeze_epochs}), i.e. their test predictions use the "  # type: ignore[attr-defined]
            "initial trunk, not an end-to-end trained one.")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _write(text: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gigaslide.atomic import write_text

    write_text(RESULTS, text)


def write_results(rows: list[dict], wall: float, args: argparse.Namespace, extra: list[str]) -> None:
    lines = [
        "# Streaming convolution: ResNet-34 forward+backward, streamed vs dense",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average at the end {os.getloadavg()[0]:.1f}), torch threads {os.environ.get('BENCH_THREADS', '2')}, fp32, "
        "channels_last, random-init timm resnet34 trunk (no global pool / fc), uint8 image normalised per crop. "
        f"Wall time of the whole benchmark: {wall / 60:.1f} min.",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_streaming.py --tiles {args.tiles} --big {args.big} "
        f"--big-tiles {args.big_tiles} --big-modes {args.big_modes} --full-up-to {args.full_up_to}"
        f"{' --dense-4096' if args.dense_4096 else ''}`",
        "",
        "| image | mode | tile | tiles (run) | peak RSS GB | time s | grad rel. error vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = {r["size"]: r for r in rows if r.get("mode") == "dense" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']}² | {r['mode']} | {r['tile']} | | failed: {r['error']} | | |")
            continue
        t = f"{r['seconds']:.0f}"
        if r.get("partial"):
            t = f"~{r['seconds_extrapolated']:.0f} (extrapolated from {r['tiles_run']} tile(s): {r['seconds']:.0f})"
        elif r["mode"] == "stream" and r["size"] in dense:
            t += f" ({r['seconds'] / dense[r['size']]['seconds']:.2f}x dense)"
        ge = f"{r['grad_rel_error']:.1e}" if "grad_rel_error" in r else ""
        tiles = f"{r['tiles']} ({r['tiles_run']})" if r["mode"] == "stream" else "1"
        tile = r["tile"] if r["mode"] == "stream" else "-"
        mode = "stream, low-memory" if r.get("checkpoint_blocks") else r["mode"]
        lines.append(f"| {r['size']}² | {mode} | {tile} | {tiles} | {r['peak_rss_gb']:.2f} | {t} | {ge} |")
    lines += [
        "",
        "Grad rel. error: max over parameter tensors of max|g_stream - g_dense| / max|g_dense|.",
        "Low-memory: `StreamingCNN(checkpoint_blocks=True, trim_memory=True)` (train-streaming's default): activations",
        "recomputed per residual block and for the stem in backward, and freed tile buffers returned to the OS at once",
        "(glibc mallopt) instead of being cached by malloc.",
        "Peak RSS is the whole process: torch + the model (~0.85 GB) and the uint8 image (0.2 GB at 8192², 0.8 GB at 16384²) are in it; the rest grows only with the feature map (512 × (side/32)² floats), its gradient and the loss's saved copy, not with the tile count.",
        "The ResNet-34 receptive field is 899 px, so a 2048 px tile yields ~1150 px of exact output per tile",
        "(the rest is context); compute overhead grows as (tile / (tile - 898))² plus one extra forward.",
    ]
    lines += extra
    _write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        mode, size, tile, max_tiles, grads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
        print(json.dumps(one(mode, size, tile, max_tiles, grads or None)))
    else:
        main()

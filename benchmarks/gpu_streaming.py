"""StreamingCLAM on a GPU: fwd+bwd time and peak memory at gigapixel sizes, and an end-to-end experiment.

    .venv/bin/python benchmarks/gpu_streaming.py --mode full --out gpu_streaming.md   # a lent GPU, <= ~10 min
    .venv/bin/python benchmarks/gpu_streaming.py --mode tiny --out /tmp/tiny.md       # CPU, seconds (tested)

1. **Scale** (``full``): ResNet-34 (random init), max-pool 8, AMP (bf16, else fp16), low-memory streaming
   (checkpointed blocks), uint8 image in CPU memory and crops moved to the GPU: forward + backward time and
   peak GPU memory (``torch.cuda.max_memory_allocated``) at 8192², 16384², 32768². A size whose projected time
   (the last size's × the ratio of pixels) would pass this part's share (``--scale-budget``, default 45 % of
   ``--budget``) is skipped, and out of memory is a row: either way the row says so, and part 2 keeps its time.
2. **End to end**: mosaic slides of PCam train tiles rendered at >= 4096² px (43 x 43 tiles of 96 px at
   0.97 µm/px), a fixed stratified train/test split (70/30, seed 0; a validation split inside train picks
   the StreamingCLAM checkpoint), StreamingCLAM (trunk frozen for the first epoch(s), then end to end) vs the
   two-stage baseline -- ABMIL on tile features of the same *frozen* trunk (its feature map average-pooled over
   224 px tiles) -- paired bootstrap of the AUC difference on the same test slides, seconds per epoch. The
   number of slides is sized from a probe (about a minute) of seconds per slide so that the run fits in
   ``--e2e-budget`` seconds (default: what ``--budget``, 235 s in full mode -- the streaming share of
   ``benchmarks/gpu_check.sh`` -- leaves after part 1; ``--e2e-budget 480`` is the 8-minute experiment).
   Trunk: ``--weights random`` or an SSL export (``RUN/encoder``).

``tiny`` runs the same code on CPU with a tiny trunk, synthetic tiles and small slides: a correctness check,
its numbers mean nothing. Every number in the output is measured by this run. The report is rewritten after each
row, so what was measured survives ``gpu_check.sh``'s time limit; in full mode part 2 is not started when the
probe shows that its smallest experiment cannot finish in the time left (the report says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODES = {
    "tiny": {"encoder": "test_resnet", "sizes": (384, 512), "tile": 320, "pool": 2, "grid": 12, "mpp": 0.97, "image": 512,
             "probe_slides": 2, "min_slides": 8, "max_slides": 8, "epochs": 2, "freeze": 1, "tile_px": 64},
    "full": {"encoder": "resnet34", "sizes": (8192, 16384, 32768), "tile": 3200, "pool": 8, "grid": 43, "mpp": 0.97, "image": 8192,
             "probe_slides": 4, "min_slides": 10, "max_slides": 400, "epochs": 4, "freeze": 1, "tile_px": 224},
}


def _peak_mem(device):  # noqa: ANN001, ANN202
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def _image(side: int, device):  # noqa: ANN001, ANN202
    """A random uint8 image of ``side``²: one random block of at most 4096² repeated (drawing 3·10⁹ random
    numbers for 32768² would cost more than the forward pass; the trunk's time does not depend on the pixels)."""
    import torch

    block = next(b for b in (4096, side) if side % b == 0 and b <= side)
    img = torch.randint(0, 256, (1, 3, block, block), dtype=torch.uint8, generator=torch.Generator().manual_seed(side))
    img = img.repeat(1, 1, side // block, side // block) if block < side else img
    return img.pin_memory() if device.type == "cuda" else img


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def scale(m: dict, device, precision: str, log, budget_s: float | None = None, write=None) -> list[str]:  # noqa: ANN001
    """Forward + backward of the streamed trunk with max-pool at each size: seconds and peak memory.

    A size runs only if its projected time (the last size's time × the ratio of pixels, + 10 %) fits in what is
    left of ``budget_s`` (None: no limit); an out-of-memory error is a row, not the end of the script. Either way
    the larger sizes are not tried, and the row says why. ``write(rows)`` is called after each row."""
    import torch

    from gigaslide.devices import autocast_ctx, choose_precision
    from gigaslide.streaming import StreamingCNN
    from gigaslide.streaming.data import Normalize
    from gigaslide.streaming.head import build_trunk

    t_start = time.perf_counter()
    trunk, spec, _ = build_trunk(m["encoder"], "random")
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    stream = StreamingCNN(trunk, m["tile"], transform=Normalize(spec.mean, spec.std), channels_last=True,
                          checkpoint_blocks=True, pool_kernel=m["pool"])
    prec = choose_precision(device, precision).resolved
    rows = ["## 1. Scale: forward + backward, ResNet-34 + max-pool, streamed" if m["encoder"] == "resnet34"
            else f"## 1. Scale: forward + backward, {m['encoder']} + max-pool, streamed", "",
            f"Tile {m['tile']} px, pool kernel {m['pool']}, precision {prec}, checkpointed blocks, uint8 image in CPU "
            f"memory (random pixels: one block of at most 4096² repeated). Peak memory: "
            f"{'GPU max_memory_allocated' if device.type == 'cuda' else 'process peak RSS (CPU)'}."
            + (f" Sizes whose projected time would pass this part's budget of {budget_s:.0f} s are skipped "
               "(measure them alone with `--skip-e2e --scale-budget SECONDS`)." if budget_s is not None else ""), "",
            "| image | tiles | map to head | fwd+bwd s | peak memory GB | image GB (CPU) |", "|---|---|---|---|---|---|"]
    last: tuple[int, float] | None = None
    stop = ""
    for side in m["sizes"]:
        n_tiles = len(stream.tiles((side, side)))
        skip = stop  # why this size is not run ("": it is)
        if not skip and last is not None and budget_s is not None:
            projected = last[1] * (side / last[0]) ** 2 * 1.1
            left = budget_s - (time.perf_counter() - t_start)
            if projected > left:
                skip = f"skipped: projected {projected:.0f} s > {max(0.0, left):.0f} s left of this part's budget"
                stop = f"not tried: {side}² was skipped"
        if skip:
            rows.append(f"| {side}² | {n_tiles} | - | {skip} | - | - |")
        else:
            img = _image(side, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = loss = None
            try:
                with autocast_ctx(device, prec):
                    out = stream(img)
                    loss = out.float().square().mean()
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                rows.append(f"| {side}² | {n_tiles} | - | out of memory after {time.perf_counter() - t0:.0f} s | "
                            f"{_peak_mem(device):.2f} | {img.numel() / 1e9:.2f} |")
                stop = f"not tried: {side}² ran out of memory"
            if out is not None:
                dt = time.perf_counter() - t0
                last = (side, dt)
                rows.append(f"| {side}² | {n_tiles} | {out.shape[-2]}×{out.shape[-1]} | {dt:.1f} | "
                            f"{_peak_mem(device):.2f} | {img.numel() / 1e9:.2f} |")
            trunk.zero_grad(set_to_none=True)
            del img, out, loss
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(rows[-1])
        if write is not None:
            write(rows)
    return rows


def _tiles_dir(mode: str, work: Path) -> tuple[Path, str]:
    from gigaslide.testing import make_tile_folder, shared_data_dir

    data = shared_data_dir()
    if mode == "full":
        if data is None:
            raise SystemExit("full mode needs ../shared/data/tiles/pcam (PCam train tiles)")
        d = data / "tiles" / "pcam" / "train"
        return d, f"PCam train tiles (96 px; {sum(1 for _ in d.glob('*/*.jpg'))} of them, from {data})"
    return make_tile_folder(work / "tiles", 40, size=32, classes=("0", "1")), "synthetic tiles (32 px, tests only)"


def _slides(tiles: Path, work: Path, n: int, grid: int, seed: int = 0) -> Path:
    from gigaslide.mil.mosaic import MosaicConfig, build_mosaic

    d = work / f"mosaic_g{grid}_n{n}_s{seed}"  # its own folder: build_mosaic resumes what a folder holds
    build_mosaic(tiles, d, MosaicConfig(slides=n, grid=grid, tumor_fraction=(0.1, 0.3), seed=seed), verbose=False)
    return d


def e2e(mode: str, m: dict, device, weights: str, budget_s: float, work: Path, log) -> list[str]:  # noqa: ANN001, C901
    """StreamingCLAM vs ABMIL on the frozen trunk's tile features, one fixed split, paired bootstrap."""
    import numpy as np
    import torch

    from gigaslide import runs
    from gigaslide.devices import autocast_dtype, choose_precision
    from gigaslide.evaluation.metrics import METRICS, paired_difference
    from gigaslide.evaluation.splits import read_labels, validation_split
    from gigaslide.mil.train import TrainConfig as MilConfig
    from gigaslide.mil.train import predict, train_fold as mil_train_fold
    from gigaslide.streaming.data import Normalize, cached_canvas
    from gigaslide.streaming.train import TrainConfig, build_model, evaluate, load_weights, step_loss, train_fold

    t_all = time.perf_counter()
    tiles, tiles_name = _tiles_dir(mode, work)
    cfg = TrainConfig(mpp=m["mpp"], image_size=m["image"], tile_size=m["tile"], encoder=m["encoder"], weights=weights,
                      pool_kernel=m["pool"], epochs=m["epochs"], freeze_epochs=m["freeze"], accumulate=2, patience=99,
                      lr=1e-3, trunk_lr=1e-4, device=str(device))
    prec = choose_precision(device, "auto").resolved
    dtype = autocast_dtype(device, prec)

    def canvases(d: Path, ids: list[str], stride: int) -> list:
        return [cached_canvas(d / "slides" / f"{s}.tiff", d / "canvases", cfg.mpp, cfg.image_size, stride) for s in ids]

    # -- probe: seconds per slide (rendering, one training step, one frozen feature pass)
    t0 = time.perf_counter()
    d = _slides(tiles, work, m["probe_slides"], m["grid"])
    t_render = (time.perf_counter() - t0) / m["probe_slides"]
    table = read_labels(d / "labels.csv")
    model = build_model(cfg, 2, device)
    cs = canvases(d, table.slide_ids, model.stream.stride)
    t0 = time.perf_counter()
    for p in model.trunk_parameters():
        p.requires_grad_(True)
    model.train()
    for c in cs:
        loss, _ = step_loss(model, c, 1, cfg, device, dtype, None)
        loss.backward()
    t_step = (time.perf_counter() - t0) / len(cs)
    t0 = time.perf_counter()
    evaluate(model, cs, [0] * len(cs), cfg, device, dtype)
    t_eval = (time.perf_counter() - t0) / len(cs)
    del model
    # per slide: render + (epochs * train step, +val/test eval) + frozen features; fit the rest of the budget
    per_slide = t_render + cfg.epochs * t_step * 0.7 + (cfg.epochs + 2) * t_eval + t_eval
    left = budget_s - (time.perf_counter() - t_all)
    n = int(max(m["min_slides"], min(m["max_slides"], left / per_slide)))
    n -= n % 2
    log(f"probe: render {t_render:.2f} s, train step {t_step:.2f} s, eval {t_eval:.2f} s per slide -> {n} slides")
    if mode == "full" and left < m["min_slides"] * per_slide:  # would overrun the section's time limit: say so
        return ["", "## 2. End to end: StreamingCLAM vs two-stage ABMIL (fixed split)", "",
                f"Not run: {max(0.0, left):.0f} s of the part's {budget_s:.0f} s were left after the probe (render "
                f"{t_render:.1f} s, train step {t_step:.1f} s, eval {t_eval:.1f} s per slide), and the smallest "
                f"experiment ({m['min_slides']} slides) needs about {m['min_slides'] * per_slide:.0f} s. Run it alone: "
                "`benchmarks/gpu_streaming.py --mode full --skip-scale --e2e-budget 480 --out FILE.md`."]

    # -- the experiment
    d = _slides(tiles, work, n, m["grid"], seed=1)
    table = read_labels(d / "labels.csv")
    y = table.labels.astype(int)
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == k))[: max(1, round(0.3 * (y == k).sum()))]
                                   for k in (0, 1)]))
    train = np.setdiff1d(np.arange(n), test)
    tr_i, va_i = validation_split(train, y, None, fraction=0.2, seed=0)
    model = build_model(cfg, 2, device)
    cs = canvases(d, table.slide_ids, model.stream.stride)
    sizes = [c.shape for c in cs]
    run = runs.open_run(work / "e2e_run", "streaming", {"n": n, "weights": weights, "mode": mode})
    t0 = time.perf_counter()
    state = train_fold(run, 0, model, [(cs[i], int(y[i])) for i in tr_i], [(cs[i], int(y[i])) for i in va_i], cfg,
                       device, dtype, runs.Stopper(), log)
    t_stream = time.perf_counter() - t0
    load_weights(model, run.dir / "fold0" / "best.safetensors")
    _, p_stream = evaluate(model, [cs[i] for i in test], [int(y[i]) for i in test], cfg, device, dtype)
    # two-stage: the same trunk, frozen at its initial weights; ABMIL on its tile features
    t0 = time.perf_counter()
    frozen = build_model(cfg, 2, device).eval()
    k = max(1, m["tile_px"] // frozen.stream.stride)
    frozen.stream.pool_kernel = 1
    bags = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for c in cs:
            frozen.stream.transform = Normalize(frozen.spec.mean, frozen.spec.std)
            fmap = frozen.stream(c.pixels()[None])  # crops go to the trunk's device
            bags.append(torch.nn.functional.avg_pool2d(fmap.float(), k, k, ceil_mode=True)[0].flatten(1).T.cpu())
    mil, _ = mil_train_fold([bags[i] for i in tr_i], y[tr_i], [bags[i] for i in va_i], y[va_i], bags[0].shape[1], 2,
                            MilConfig(model="abmil", epochs=40, patience=8, seed=0, device=str(device)))
    p_abmil, _ = predict(mil, [bags[i] for i in test], torch.device(str(device)))
    t_two = time.perf_counter() - t0
    yt = y[test]
    auc = METRICS["auc"]
    diff = paired_difference(yt, p_stream, p_abmil, "auc", n_bootstrap=1000, seed=0)
    epochs = len(state["history"])
    best = state["selection"]["best_epoch"]
    side_lo, side_hi = min(min(s) for s in sizes), max(max(s) for s in sizes)
    return [
        "", "## 2. End to end: StreamingCLAM vs two-stage ABMIL (fixed split)", "",
        f"{n} mosaic slides of {tiles_name}, {m['grid']}×{m['grid']} tiles, read at {cfg.mpp} µm/px into canvases of "
        f"{side_lo}–{side_hi} px (sized from a probe: render {t_render:.1f} s, train step {t_step:.1f} s, eval "
        f"{t_eval:.1f} s per slide, budget {budget_s:.0f} s). Split: {len(tr_i)} train, {len(va_i)} validation, "
        f"{len(test)} test slides (stratified, seed 0). Trunk {cfg.encoder} ({weights}), pool kernel {cfg.pool_kernel}, "
        f"tile {cfg.tile_size}, precision {prec}; StreamingCLAM: {epochs} epochs ({cfg.freeze_epochs} frozen), "
        f"checkpoint of epoch {best} kept (lowest validation loss once the trunk trains); ABMIL on the frozen trunk's "
        f"feature map average-pooled over {k * frozen.stream.stride} px tiles.", "",
        "| method | test AUC | minutes |", "|---|---|---|",
        f"| StreamingCLAM (end to end) | {auc(yt, p_stream):.3f} | {t_stream / 60:.1f} ({t_stream / max(1, epochs):.0f} s per epoch) |",
        f"| ABMIL on frozen-trunk tile features | {auc(yt, p_abmil):.3f} | {t_two / 60:.1f} |", "",
        f"Paired bootstrap (B = 1000, same {len(test)} test slides): AUC difference StreamingCLAM − ABMIL = "
        f"{diff['diff']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}], p = {diff['p_value']:.3f} -> "
        + ("StreamingCLAM better" if diff["ci_low"] > 0 else "ABMIL better" if diff["ci_high"] < 0
           else "no difference shown at this size") + ".",
        f"Total wall time of part 2: {(time.perf_counter() - t_all) / 60:.1f} min.",
    ]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=tuple(MODES), required=True)
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--weights", default="random", help="trunk weights for part 2: random or an exported encoder folder")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole script (full: 235, the streaming share of benchmarks/gpu_check.sh; "
                         "tiny: 90)")
    ap.add_argument("--e2e-budget", type=float, default=None,
                    help="seconds for part 2 (default: what --budget leaves after part 1, less 20 s; the issue's "
                         "full experiment: 480)")
    ap.add_argument("--scale-budget", type=float, default=None,
                    help="seconds for part 1: a size whose projected time would not fit is skipped (default: 45 %% "
                         "of --budget in full mode, so part 2 keeps its share; no limit in tiny mode)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    from gigaslide.atomic import write_text
    from gigaslide.devices import device_name

    m = MODES[args.mode]
    torch.set_num_threads(int(os.environ.get("GIGASLIDE_THREADS", "2")))
    device = torch.device("cuda" if torch.cuda.is_available() and args.mode == "full" else "cpu")
    if args.mode == "full" and device.type != "cuda":
        raise SystemExit("full mode needs a CUDA GPU (use --mode tiny on CPU)")
    total = args.budget if args.budget is not None else (235.0 if args.mode == "full" else 90.0)
    scale_budget = args.scale_budget
    if scale_budget is None and args.mode == "full":
        scale_budget = total if args.skip_e2e else 0.45 * total
    t0 = time.perf_counter()
    lines = [f"# StreamingCLAM on {'a GPU' if device.type == 'cuda' else 'CPU'} ({args.mode} mode)", "",
             f"Device: {device_name(device)}; torch {torch.__version__}. Command: "
             f"`benchmarks/gpu_streaming.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    if args.mode == "tiny":
        lines += ["**Tiny mode: a correctness run on CPU with a tiny trunk and synthetic slides -- the numbers mean "
                  "nothing about StreamingCLAM.**", ""]
    out = Path(args.out)

    def write(more: list[str]) -> None:  # what is measured so far survives a time limit
        write_text(out, "\n".join(lines + more) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if not args.skip_scale:
            lines += scale(m, device, "auto", print, scale_budget, write)
            write([])
        if not args.skip_e2e:
            budget = args.e2e_budget if args.e2e_budget is not None else total - (time.perf_counter() - t0) - 20.0
            lines += e2e(args.mode, m, device, args.weights, budget, work, print)
    lines += ["", f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min."]
    write([])
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()

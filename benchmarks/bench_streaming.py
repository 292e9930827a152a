"""Streamed vs dense ResNet-34 forward+backward, with and without StreamingCLAM's max-pool: peak RSS, time, gradient error.

Every configuration runs in a fresh subprocess, one at a time, every tile of the plan (nothing is
extrapolated). Peak RSS = that process's VmHWM; the uint8 image is held once and its bytes are
reported next to it, so ``peak RSS - image`` is what streaming itself costs (goal: <= 3 GB at every
size). A watchdog kills a run whose RSS passes ``--max-rss-gb`` (the machine is shared).

* ``stream``: ``StreamingCNN(checkpoint_blocks=True, trim_memory=True, pool_kernel=k)`` (train-streaming's
  low-memory mode); ``k = 8`` pools each tile's output as it is produced (the full-resolution feature map
  is never held whole); ``k = 1`` keeps the full map.
* ``dense``: the whole image in one pass of the plain trunk, with activation checkpointing (stem and each
  residual block, torch.utils.checkpoint) so that it fits where the un-checkpointed pass (11.8 GB at
  4096²) would not; recomputation does not change the gradients. One forward, two backward passes: the
  loss without pooling and the loss after ``max_pool2d(k, ceil_mode=True)``, the references for both
  streamed runs.

Loss: mean of squares of the (pooled) feature map. Grad rel. error: max over parameter tensors of
max|g_stream - g_dense| / max|g_dense|. In stream runs the loss's gradient (2y/n) is written into the map's
own storage, so backward holds one map-sized tensor, as a training step does (the head hands the stream
its bag's gradient, the map is freed); rows measured before this carry ``map copies in backward: ≥ 2`` (the
map, kept alive, its gradient and the autograd temporaries of ``y.square().mean()``).

Run (shared machine: one size at a time):  nice .venv/bin/python benchmarks/bench_streaming.py --sizes 4096
Full table (a quiet machine with >= 24 GB): --sizes 4096,8192,16384,32768 --dense-up-to 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "streaming.md"
#: every measured row, keyed by configuration, with the command that measured it: an invocation replaces its own
#: configurations' rows and keeps the others, so sizes measured one at a time (hours each) make one table
STORE = RESULTS.with_suffix(".json")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


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


def _dense_checkpointed(trunk, img):  # noqa: ANN001, ANN202
    """The plain trunk on the whole image, activations recomputed per stem / residual block in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def stem(u):  # noqa: ANN001, ANN202
        x = _norm(u).contiguous(memory_format=torch.channels_last)
        return trunk.maxpool(trunk.act1(trunk.bn1(trunk.conv1(x))))

    x = checkpoint(stem, img, use_reentrant=False)
    for stage in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4):
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False)
    return x


def one(mode: str, size: int, tile: int, pool: int, grads_out: str | None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from gigaslide.streaming import StreamingCNN

    trunk = _trunk()
    params = [p for _, p in trunk.named_parameters()]
    names = [n for n, _ in trunk.named_parameters()]
    rss0 = _hwm()
    img = _image(size)
    info: dict = {"mode": mode, "size": size, "tile": tile, "pool": pool, "image_gb": img.numel() / 1e9}
    t0 = time.perf_counter()
    saved: dict = {}
    if mode == "dense":
        y = _dense_checkpointed(trunk, img)
        info.update(tiles=1, fmap=list(y.shape[-2:]))
        g1 = torch.autograd.grad(y.square().mean(), params, retain_graph=True)
        g8 = torch.autograd.grad(F.max_pool2d(y, pool, pool, ceil_mode=True).square().mean(), params)
        saved = {**{f"p1/{n}": g for n, g in zip(names, g1)}, **{f"p{pool}/{n}": g for n, g in zip(names, g8)}}
    else:
        stream = StreamingCNN(trunk, tile, transform=_norm, channels_last=True, checkpoint_blocks=True,
                              trim_memory=True, pool_kernel=pool)
        info["tiles"] = len(stream.tiles((size, size)))
        y = stream(img)
        info["fmap"] = list(y.shape[-2:])
        # d mean(y²)/dy = 2y/n, written into the map's own storage: the stream's backward gets one map-sized
        # gradient and the map is not held beside it -- as in a training step, where the head hands the stream
        # the gradient of its bag and the map itself is freed. (Autograd of y.square().mean() holds y, its gradient
        # and the loss's temporaries: several map-sized tensors, a cost of this stand-in loss only.)
        grad = y.detach().mul_(2.0 / y.numel())
        y.backward(grad)
        del y, grad
        info["map_copies"] = 1
        saved = {f"p{pool}/{n}": p.grad for n, p in trunk.named_parameters()}
    info["seconds"] = time.perf_counter() - t0
    info["cpu"] = f"{_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"  # rows may come from other machines
    info["load"] = round(os.getloadavg()[0], 1)  # 1-min load average at the end of the run
    info["peak_rss_gb"] = _hwm() / 1e9
    info["baseline_rss_gb"] = rss0 / 1e9
    if grads_out:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in saved.items()}, grads_out)
    return info


def _hwm(pid: str = "self", key: str = "VmHWM:") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _spawn(mode: str, size: int, tile: int, pool: int, grads: str | None, max_rss_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, str(size), str(tile), str(pool), grads or ""]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:  # watchdog: the machine is shared
        peak = max(peak, _hwm(str(p.pid), "VmRSS:"))
        if peak > max_rss_gb * 1e9:
            p.kill()
            p.wait()
            return {"mode": mode, "size": size, "tile": tile, "pool": pool,
                    "error": f"stopped: RSS passed {max_rss_gb:g} GB (--max-rss-gb)"}
        time.sleep(0.2)
    out, err = p.communicate()
    if p.returncode != 0:
        why = f"killed by signal {-p.returncode}" if p.returncode < 0 else (err.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "size": size, "tile": tile, "pool": pool, "error": why}
    res = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def _grad_error(a_path: str, b_path: str, prefix: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    keys = [k for k in b if k.startswith(prefix)]
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in keys)


def _run(work: Path, mode: str, size: int, tile: int, pool: int, max_rss_gb: float) -> tuple[dict, str]:
    """One configuration, measured once: its row and gradients are kept in ``work`` and reused by later
    invocations (so a shared machine can run the configurations one at a time, in any order)."""
    key = f"{mode}_{size}_{tile if mode == 'stream' else size}_{pool}"
    row_f, grads = work / f"{key}.json", str(work / f"{key}.safetensors")
    if row_f.is_file():  # measured (or failed, e.g. over --max-rss-gb) by an earlier invocation
        print(f"reusing {row_f}", flush=True)
        return {**json.loads(row_f.read_text()), "reused": True}, grads
    row = _spawn(mode, size, tile, pool, grads, max_rss_gb)
    row_f.write_text(json.dumps(row))
    return row, grads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096", help="image sides, each configuration in its own process")
    ap.add_argument("--tile", default="2048", help="streaming tile size (px), or per size: 2048:1536,4096:2048")
    ap.add_argument("--pool", type=int, default=8, help="the max-pool kernel measured next to no pooling")
    ap.add_argument("--runs", default="stream-pool,dense,stream", help="which runs, in this order: stream-pool "
                    "(pool kernel --pool), dense (the reference for both), stream (no pooling)")
    ap.add_argument("--dense-up-to", type=int, default=4096, help="run the dense reference at sizes up to this side")
    ap.add_argument("--stream-up-to", type=int, default=0, help="run the un-pooled stream at sizes up to this side "
                    "(0: every size)")
    ap.add_argument("--max-rss-gb", type=float, default=6.0, help="kill a run whose RSS passes this (shared machine)")
    ap.add_argument("--pending", default="8192,16384,32768", help="sizes named as pending in the results")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gigaslide_bench_streaming"),
                    help="where each run's row and gradients are kept (finished runs are reused)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    rows: list[dict] = []
    sizes = [int(v) for v in args.sizes.split(",") if v]
    pending = [s for s in (int(v) for v in args.pending.split(",") if v) if s not in sizes]
    tiles = {int(k): int(v) for k, v in (t.split(":") for t in args.tile.split(",") if ":" in t)}
    for size in sizes:
        tile = tiles.get(size, int(args.tile) if ":" not in args.tile else 2048)
        got, dense = {}, None
        for what in args.runs.split(","):
            if what == "dense":
                if size <= args.dense_up_to:
                    dense, gd = _run(work, "dense", size, size, args.pool, args.max_rss_gb)
                    rows.append(dense)
            elif what == "stream-pool" or not args.stream_up_to or size <= args.stream_up_to:
                pool = args.pool if what == "stream-pool" else 1
                r, got[pool] = _run(work, "stream", size, tile, pool, args.max_rss_gb)
                rows.append(r)
            write_results(rows, time.time() - t_start, args, pending, partial=True)  # rows so far, if stopped
        for r in rows:
            if (r["size"] == size and r["mode"] == "stream" and "error" not in r and dense and "error" not in dense
                    and Path(got[r["pool"]]).is_file() and Path(gd).is_file()):
                r["grad_rel_error"] = _grad_error(got[r["pool"]], gd, f"p{r['pool']}/")
    write_results(rows, time.time() - t_start, args, pending)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _field() -> int:
    from gigaslide.streaming.geometry import trace

    return int(max(trace(_trunk()).field))


_MODE_ORDER = {"stream-pool": 0, "dense": 1, "stream": 2}


def _key(r: dict) -> str:
    return f"{r['mode']}_{r['size']}_{r['tile'] if r['mode'] == 'stream' else r['size']}_{r['pool']}"


def _command(args: argparse.Namespace) -> str:
    return (f"nice .venv/bin/python benchmarks/bench_streaming.py --sizes {args.sizes} --tile {args.tile} "
            f"--pool {args.pool} --runs {args.runs} --dense-up-to {args.dense_up_to}"
            + (f" --stream-up-to {args.stream_up_to}" if args.stream_up_to else "") + f" --max-rss-gb {args.max_rss_gb:g}")


def merge_rows(stored: list[dict], rows: list[dict], command: str) -> list[dict]:
    """``stored`` with this invocation's ``rows`` (tagged with ``command``) in place of the same configurations,
    ordered by image size, then stream-pool / dense / stream."""
    new = {_key(r): {**r, "command": r.get("command") or command} for r in rows}
    merged = {**{_key(r): r for r in stored}, **new}
    return sorted(merged.values(), key=lambda r: (r["size"], _MODE_ORDER["stream-pool" if r["mode"] == "stream" and
                                                                          r["pool"] > 1 else r["mode"]]))


def map_copies(r: dict) -> str:
    """How many map-sized tensors a stream row's backward held: 1 (the gradient, in the map's storage); rows
    measured before that held at least 2 (the map, kept alive, and its gradient, plus the autograd temporaries
    of the stand-in loss). "-" for the dense reference."""
    if r["mode"] != "stream":
        return "-"
    return str(r["map_copies"]) if "map_copies" in r else "≥ 2 (earlier procedure)"


def machine(r: dict) -> str:
    """A row's CPU and load ("not recorded" for rows measured before rows carried them)."""
    return f"{r['cpu']}, {r['load']:.1f}" if "cpu" in r else "not recorded"


def write_results(rows: list[dict], wall: float, args: argparse.Namespace, pending: list[int], partial: bool = False) -> None:
    from gigaslide.atomic import write_json, write_text

    stored = json.loads(STORE.read_text())["rows"] if STORE.is_file() else []
    rows = merge_rows(stored, rows, _command(args))
    write_json(STORE, {"rows": rows})
    commands = list(dict.fromkeys(r["command"] for r in rows))
    measured = {r["size"] for r in rows if "error" not in r}
    pending = [s for s in pending if s not in measured]

    lines = [
        "# Streaming convolution: ResNet-34 forward+backward, streamed (with / without max-pool) vs dense",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores (1-min load average at the end of this invocation {os.getloadavg()[0]:.1f}), "
        f"torch threads {os.environ.get('BENCH_THREADS', '2')}, fp32, channels_last, "
        "random-init timm resnet34 trunk (no global pool / fc), uint8 image normalised per crop, every tile run. "
        f"Wall time of this invocation: {wall / 60:.1f} min. Times measured under load are upper bounds, and rows "
        "measured on other machines (the CPU column; this VM's CPU varies between sessions) are not comparable in time.",
        *(["", "**Incomplete: the benchmark was still running (or was stopped) when this was written.**"] if partial else []),
        "",
        "Commands (each configuration in its own process, one at a time; a configuration measured by an earlier "
        "invocation with the same --work is reused, and its time is that invocation's; rows of sizes another "
        f"command measured are kept from `{STORE.name}`; the `cmd` column says which command measured a row):",
        "",
        *[f"{i + 1}. Command: `{c}`" for i, c in enumerate(commands)],
        "",
        "| image | mode | pool kernel | tile | tiles | map to head | peak RSS GB | image GB | peak RSS − image GB | time s | "
        "CPU (ISA), load at end | grad rel. error vs dense | map copies in backward | cmd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pool = r["pool"] if r["mode"] == "stream" else f"1 and {r['pool']}"
        r_time = f"{r.get('seconds', 0):.0f}" + (" (earlier invocation)" if r.get("reused") else "")
        if "error" in r:
            lines.append(f"| {r['size']}² | {r['mode']} | {pool} | {r['tile']} | | | failed: {r['error']} | | | | | | | "
                         f"{commands.index(r['command']) + 1} |")
            continue
        ge = f"{r['grad_rel_error']:.1e}" if "grad_rel_error" in r else ""
        mode = "stream, low-memory" if r["mode"] == "stream" else "dense (checkpointed)"
        tile = r["tile"] if r["mode"] == "stream" else "-"
        fmap = "×".join(str(v) for v in r["fmap"]) + (" (before pooling)" if r["mode"] == "dense" else "")
        lines.append(f"| {r['size']}² | {mode} | {pool} | {tile} | {r['tiles']} | {fmap} | {r['peak_rss_gb']:.2f} | "
                     f"{r['image_gb']:.2f} | {r['peak_rss_gb'] - r['image_gb']:.2f} | {r_time} | {machine(r)} | {ge} | "
                     f"{map_copies(r)} | {commands.index(r['command']) + 1} |")
    ok = [r for r in rows if "error" not in r and r["mode"] == "stream"]
    lines += ["", "Verdicts (computed from the rows above):"]
    for r in ok:
        over = r["peak_rss_gb"] - r["image_gb"]
        lines.append(f"* {r['size']}², pool {r['pool']}: peak RSS − image = {over:.2f} GB "
                     f"{'<=' if over <= 3 else '>'} 3 GB goal ({'met' if over <= 3 else 'NOT met'})")
        if "grad_rel_error" in r:
            e = r["grad_rel_error"]
            lines.append(f"* {r['size']}², pool {r['pool']}: gradient error {e:.1e} "
                         f"{'<=' if e <= 1e-4 else '>'} 1e-4 ({'exact to tolerance' if e <= 1e-4 else 'NOT within tolerance'})")
    by = {(r["size"], r["pool"]): r for r in ok}
    for size in sorted({r["size"] for r in ok}):
        a, b = by.get((size, args.pool)), by.get((size, 1))
        if a and b:
            # times comparable only when measured side by side in one invocation
            same = not a.get("reused") and not b.get("reused") and a["command"] == b["command"]
            lines.append(f"* {size}²: pooling {args.pool} changes peak RSS − image by "
                         f"{(a['peak_rss_gb'] - a['image_gb']) - (b['peak_rss_gb'] - b['image_gb']):+.2f} GB"
                         + (f" and time ×{a['seconds'] / b['seconds']:.2f} ({a['tiles']} vs {b['tiles']} tiles)" if same
                            else " (times measured in different invocations under different load: not compared)"))
    if pending:
        lines.append(f"* Not measured: {', '.join(f'{s}²' for s in pending)} (`--sizes {','.join(map(str, pending))}`; "
                     "a stream run's time grows with its tile count, which grows with the image area).")
    base = [r["baseline_rss_gb"] for r in rows if "baseline_rss_gb" in r]
    field = _field()
    lines += [
        "",
        "Peak RSS is the whole process: torch + the model"
        + (f" ({min(base):.2f}–{max(base):.2f} GB in these runs, measured before the image is made)" if base else "")
        + " and the uint8 image are in it; with pooling off the rest grows with the feature map (512 × (side/32)²"
        " floats) and the copies of it that backward holds (the column); with pooling on only the pooled map"
        f" ({args.pool ** 2}× smaller) is held whole. The ResNet-34 receptive field is {field} px (traced from the model);"
        f" with pool kernel {args.pool} each tile's exact outputs end on a pooling-window boundary (multiples of"
        f" {args.pool} × 32 px).",
    ]
    write_text(RESULTS, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        mode, size, tile, pool, grads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
        print(json.dumps(one(mode, size, tile, pool, grads or None)))
    else:
        main()

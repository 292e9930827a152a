"""Tiling + tile reading throughput on the same slide: gigaslide vs a peer from PyPI (histolab).

The peer runs in its own virtual environment (it pins old libraries), given by --peer-python
(default /tmp/peer/bin/python; create it with `python3 -m venv /tmp/peer &&
/tmp/peer/bin/pip install --only-binary :all: histolab openslide-bin`). Both sides: tissue
detection, a grid of 224 px tiles at level 0 keeping tiles with >= 80 % tissue (histolab's
default), and every kept tile read into memory as RGB. Runs alternate; medians of 3.

    .venv/bin/python benchmarks/bench_tiling.py [--peer-python /tmp/peer/bin/python]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_result  # noqa: E402

OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from gigaslide.slides import open_slide
from gigaslide.tiling import segment_tissue, make_grid
with open_slide(sys.argv[1]) as s:
    tissue, _ = segment_tissue(s)
    g = make_grid(s, tissue, target_mpp=s.mpp, tile_size=224, min_tissue=float(sys.argv[2]))
    lvl = s.choose_level(s.mpp)
    for x, y in g.coords:
        s.read_region((int(x), int(y)), (224, 224), s.mpp, level=lvl)
print(json.dumps({"tiles": len(g), "seconds": time.perf_counter() - t0}))
"""

PEER = r"""
import json, sys, time, tempfile, numpy as np
t0 = time.perf_counter()
from histolab.slide import Slide
from histolab.tiler import GridTiler
s = Slide(sys.argv[1], processed_path=tempfile.mkdtemp())
tiler = GridTiler(tile_size=(224, 224), level=0, check_tissue=sys.argv[2] != "0")
n = 0
for tile, coords in tiler._tiles_generator(s):
    np.asarray(tile.image.convert("RGB"))
    n += 1
print(json.dumps({"tiles": n, "seconds": time.perf_counter() - t0}))
"""


def run(py: str, code: str, slide: Path, min_tissue: str) -> dict:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([py, "-c", code, str(slide), min_tissue], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", default="/tmp/peer/bin/python")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from gigaslide.testing import make_slide, shared_data_dir

    work = Path(tempfile.mkdtemp(prefix="gs-tiling-"))
    slides = []
    shared = shared_data_dir()
    if shared:
        slides.append(shared / "slides" / "cmu-1-small-region.svs")
    slides.append(make_slide(work / "generated-8k.tiff", (8192, 8192), mpp=0.5, seed=3, blobs=5))
    peer_version = subprocess.run([args.peer_python, "-c", "import histolab; print(histolab.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    rows = ["# Spine: tiling + tile reading vs a peer", "",
            f"Peer: histolab {peer_version} (PyPI; newest version with wheels for this Python). Same slide, 224 px tiles at level 0, "
            "every kept tile read as RGB; one process each, 1 thread, end-to-end wall time including imports and tissue "
            f"detection; median of {args.repeats} alternating runs. `all tiles`: no tissue filter, both read the identical grid "
            "(equal work: the speed-up is the wall-time ratio). `tissue filter`: each tool's own filter (ours >= 80 % tissue "
            "from the thumbnail mask; histolab's per-tile `has_enough_tissue`), so tile counts differ and tiles/s is compared.", "",
            "| slide | mode | gigaslide tiles | gigaslide s | histolab tiles | histolab s | tiles/s ours | tiles/s peer | speed-up |",
            "|---|---|---|---|---|---|---|---|---|"]
    for slide, mode, mt in [(s, m, t) for s in slides for m, t in (("all tiles", "0"), ("tissue filter", "0.8"))]:
        ours, peer = [], []
        for _ in range(args.repeats):
            ours.append(run(sys.executable, OURS, slide, mt))
            peer.append(run(args.peer_python, PEER, slide, mt))
        o = statistics.median(r["seconds"] for r in ours)
        p = statistics.median(r["seconds"] for r in peer)
        no, np_ = ours[0]["tiles"], peer[0]["tiles"]
        speed = (no / o) / (np_ / p) if np_ else float("inf")
        rows.append(f"| {slide.name} | {mode} | {no} | {o:.2f} | {np_} | {p:.2f} | {no / o:.0f} | {np_ / p:.0f} | **{speed:.1f}×** (wall {p / o:.1f}×) |")
        print(rows[-1], flush=True)
    print(write_result("tiling", "\n".join(rows)).read_text())


if __name__ == "__main__":
    main()

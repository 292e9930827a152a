"""The cost of flushing an atomic write to the disk before its rename (``gigaslide.atomic``), side by side in one run.

Two policies on the same folder, interleaved write by write (so drift of the machine hits both alike), the same
bytes: ``rename only`` (gigaslide before the flush: temp file + ``os.replace``) and ``fsync, then rename`` (now:
the temporary file's data reaches the disk first, so a power cut cannot leave an empty target). Each write is
``atomic.write_bytes`` of a payload of the given size; the rename-only arm is the same call with the flush
replaced by a no-op. ms per write = median over the writes; the verdict lines are computed from the rows.

    .venv/bin/python benchmarks/bench_atomic.py [--writes 200] [--sizes 2000,1000000] [--dir /tmp]
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

from gigaslide import atomic  # noqa: E402


def measure(folder: Path, size: int, writes: int) -> dict[str, float]:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    real = atomic._fsync
    ms: dict[str, list[float]] = {"rename only": [], "fsync, then rename": []}
    try:
        for i in range(writes):
            for arm in ms:
                atomic._fsync = real if arm.startswith("fsync") else (lambda path: None)
                t = time.perf_counter()
                atomic.write_bytes(folder / f"{arm[:5]}-{i % 8}.bin", data)
                ms[arm].append((time.perf_counter() - t) * 1e3)
                assert (folder / f"{arm[:5]}-{i % 8}.bin").read_bytes() == data
    finally:
        atomic._fsync = real
    return {arm: statistics.median(v) for arm, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=200)
    ap.add_argument("--sizes", default="2000,1000000", help="payload bytes, comma-separated")
    ap.add_argument("--dir", default=None, help="folder on the file system to measure (default: the temp folder)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for size in (int(s) for s in args.sizes.split(",")):
            r = measure(Path(d), size, args.writes)
            rows.append((size, r["rename only"], r["fsync, then rename"]))
    fs = Path(args.dir or tempfile.gettempdir())
    lines = ["# Atomic writes: the cost of flushing to the disk before the rename", "",
             f"{load_note()}; folder under `{fs}`; {args.writes} writes per arm and size, the two arms interleaved "
             "write by write (median ms per write).", "",
             "| payload bytes | rename only, ms | fsync, then rename, ms | added by the flush, ms |",
             "|---|---|---|---|"]
    lines += [f"| {size:,} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" for size, a, b in rows]
    lines += [""] + [f"- {size:,} bytes: the flush adds {b - a:.1f} ms per artifact ({b / a:.1f}× the rename-only "
                     "write); gigaslide writes one artifact per slide, checkpoint or report, not per tile."
                     for size, a, b in rows]
    print(write_result("atomic", "\n".join(lines)))


if __name__ == "__main__":
    main()

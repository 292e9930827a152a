"""Reading many feature files' records (``store.load_dir(arrays=False)``: what MIL, slide SSL, the viewer and the
exports do first): CPU per file with each file's HDF5 attrs read through h5py's per-attr path (``attrs[name]``,
gigaslide before) vs :func:`gigaslide.tiling.store.h5_attrs` (now), side by side in one process on the same files.

The files are copies of one real ``gigaslide encode`` output (its file and coords attrs as encode writes them) of a
generated slide. Best of 3 alternating passes, CPU time (``time.process_time``), page cache warm; both paths must
return the same dicts for every file.

    .venv/bin/python benchmarks/bench_feature_load.py [--sizes 100,1000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import write_result  # noqa: E402

from gigaslide.features import store  # noqa: E402
from gigaslide.provenance import decode_attrs  # noqa: E402


def one_feature_file(work: Path) -> Path:
    from gigaslide.cli.main import main
    from gigaslide.testing import make_slide

    slide = make_slide(work / "s.tif", (1024, 768), mpp=0.5)
    assert main(["encode", str(slide), "--out", str(work / "out"), "--encoder", "test_resnet", "--weights", "random",
                 "--mpp", "2.0", "--tile-size", "64"]) == 0
    return work / "out" / "features" / "s.h5"


def per_attr(obj) -> dict:  # noqa: ANN001
    """The per-attr path: h5py's ``attrs[name]`` for every attr (what store read before h5_attrs)."""
    return decode_attrs(obj.attrs)


def timed(folder: Path, reader) -> tuple[float, dict]:  # noqa: ANN001
    store.h5_attrs = reader  # store calls it by this name for the file and the coords attrs
    t = time.process_time()
    files = store.load_dir(folder, arrays=False)
    return time.process_time() - t, {k: (f.attrs, f.coords_attrs) for k, f in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000")
    args = ap.parse_args()
    fast = store.h5_attrs
    rows = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-feature-load-") as tmp:
        work = Path(tmp)
        src = one_feature_file(work)
        import h5py

        with h5py.File(src, "r") as f:
            n_attrs, n_coords = len(f.attrs), len(f["coords"].attrs)
        for n in [int(x) for x in args.sizes.split(",")]:
            d = work / f"n{n}" / "features"
            d.mkdir(parents=True)
            for i in range(n):
                shutil.copyfile(src, d / f"s{i:05d}.h5")
                with h5py.File(d / f"s{i:05d}.h5", "a") as f:
                    f.attrs["slide_id"] = f"s{i:05d}"  # one slide per file, as load_dir requires
            best = {"per-attr": float("inf"), "h5_attrs": float("inf")}
            same = True
            for _ in range(3):
                t_old, old = timed(d.parent, per_attr)
                t_new, new = timed(d.parent, fast)
                best["per-attr"], best["h5_attrs"] = min(best["per-attr"], t_old), min(best["h5_attrs"], t_new)
                same = same and old == new
            store.h5_attrs = fast
            rows.append((n, 1000 * best["per-attr"] / n, 1000 * best["h5_attrs"] / n, same))
    lines = ["# Reading many feature files' records", "",
             f"`store.load_dir(arrays=False)` over N copies of one `encode` output ({n_attrs} file attrs, {n_coords} "
             "coords attrs); CPU ms per file, best of 3 alternating passes in one process.", "",
             "| files | per-attr path (before) ms/file | h5_attrs (now) ms/file | less CPU | same dicts |",
             "|---|---|---|---|---|"]
    for n, old, new, same in rows:
        lines.append(f"| {n} | {old:.2f} | {new:.2f} | {100 * (1 - new / old):.0f} % | {'yes' if same else 'NO'} |")
    n, old, new, _ = rows[-1]
    lines += ["", "Verdicts (computed from the rows above):", "",
              f"- at {n} files h5_attrs reads each file's records in {new:.2f} ms of CPU vs {old:.2f} ms "
              f"({100 * (1 - new / old):.0f} % less); per file the cost is flat from {rows[0][0]} to {n} files "
              f"({rows[0][2]:.2f} vs {new:.2f} ms).",
              f"- both paths return the same dicts for every file: {'yes' if all(r[3] for r in rows) else 'NO'}."]
    print(write_result("feature_load", "\n".join(lines)))


if __name__ == "__main__":
    main()

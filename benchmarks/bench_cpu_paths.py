"""Two CPU paths round 8 made faster, each old vs new side by side in one process on the same inputs, outputs checked
identical:

- nuclei outlines: Douglas-Peucker simplification of every nucleus contour of a mask (``polygons_of``, the whole
  outline step of a nuclei export) through :func:`skimage.measure.approximate_polygon` (before) vs
  ``gigaslide.nuclei.export._approximate_polygon`` (now: the segments of one recursion depth at once);
- thumbnails: ``Slide.thumbnail(1024)`` reducing an opaque RGBA level as RGBA (before) vs as RGB (now).

CPU time (``time.process_time``), median of ``--repeats`` alternating passes.

    .venv/bin/python benchmarks/bench_cpu_paths.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import write_result  # noqa: E402

from gigaslide.nuclei import export as nexport  # noqa: E402
from gigaslide.slides import slide as slide_mod  # noqa: E402
from gigaslide.testing import make_slide, shared_data_dir  # noqa: E402


def nuclei_mask(seed: int = 0, side: int = 1152, n: int = 1400) -> np.ndarray:
    """A region's instance mask of ``n`` nucleus-like ellipses (4-12 px radii, random orientation)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    mask = np.zeros((side, side), np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(12, side - 12, 2)
        a, b = rng.uniform(4, 12, 2)
        t = rng.uniform(0, np.pi)
        y0, y1, x0, x1 = int(cy - 13), int(cy + 13), int(cx - 13), int(cx + 13)
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1 + rng.normal(0, 0.05, u.shape)
        mask[y0:y1, x0:x1][inside] = k
    return mask


def outlines(mask: np.ndarray) -> list:
    """Each nucleus's polygons from its own bounding box (as an export cuts them), in id order."""
    from scipy import ndimage as ndi

    return [nexport.polygons_of(mask[box] == k) for k, box in enumerate(ndi.find_objects(mask), 1) if box is not None]


def time_outlines(mask: np.ndarray, simplify) -> tuple[float, list]:  # noqa: ANN001
    nexport._approximate_polygon = simplify  # _ring calls it by this name
    t = time.process_time()
    out = outlines(mask)
    return time.process_time() - t, out


def same_outlines(a: list, b: list) -> bool:
    return len(a) == len(b) and all(len(p) == len(q) and all(len(r) == len(s) and all(np.array_equal(x, y)
                                                                                        for x, y in zip(r, s))
                                                                for r, s in zip(p, q)) for p, q in zip(a, b))


def time_thumbnail(path: Path, to_rgb_first) -> tuple[float, np.ndarray]:  # noqa: ANN001
    slide_mod._opaque_to_rgb = to_rgb_first
    with slide_mod.Slide(path) as s:
        t = time.process_time()
        img, _ = s.thumbnail(1024)
        return time.process_time() - t, np.asarray(img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from skimage.measure import approximate_polygon

    new_dp, new_rgb = nexport._approximate_polygon, slide_mod._opaque_to_rgb
    rows = []
    mask = nuclei_mask()
    n_nuclei = len(np.unique(mask)) - 1
    old_t, new_t, same = [], [], True
    for _ in range(args.repeats):
        t_old, a = time_outlines(mask, approximate_polygon)
        t_new, b = time_outlines(mask, new_dp)
        old_t.append(t_old)
        new_t.append(t_new)
        same = same and same_outlines(a, b)
    nexport._approximate_polygon = new_dp
    rows.append((f"outlines of a 1152 px region, {n_nuclei} nuclei (`polygons_of` of each nucleus's box)",
                 statistics.median(old_t), statistics.median(new_t), same))
    with tempfile.TemporaryDirectory(prefix="gs-bench-cpu-paths-") as tmp:
        slides = [("generated 6144x4096 pyramidal TIFF", make_slide(Path(tmp) / "g.tif", (6144, 4096)))]
        data = shared_data_dir()
        if data is not None and (data / "slides" / "cmu-1-small-region.svs").is_file():
            slides.append(("cmu-1-small-region.svs", data / "slides" / "cmu-1-small-region.svs"))
        for name, path in slides:
            old_t, new_t, same = [], [], True
            for _ in range(args.repeats):
                t_old, a = time_thumbnail(path, lambda img: img)
                t_new, b = time_thumbnail(path, new_rgb)
                old_t.append(t_old)
                new_t.append(t_new)
                same = same and np.array_equal(a, b)
            rows.append((f"`Slide.thumbnail(1024)` of {name}", statistics.median(old_t), statistics.median(new_t),
                         same))
    slide_mod._opaque_to_rgb = new_rgb
    lines = ["# CPU paths made faster in review round 8", "",
             f"Old and new side by side in one process, same inputs; CPU s, median of {args.repeats} alternating "
             "passes.", "",
             "| what | before (s) | now (s) | less CPU | same output |", "|---|---|---|---|---|"]
    for what, old, new, same in rows:
        lines.append(f"| {what} | {old:.3f} | {new:.3f} | {100 * (1 - new / old):.0f} % | {'yes' if same else 'NO'} |")
    lines += ["", "Verdicts (computed from the rows above):", ""]
    lines += [f"- {what}: {100 * (1 - new / old):.0f} % less CPU, output "
              f"{'identical' if same else 'DIFFERENT'}." for what, old, new, same in rows]
    print(write_result("cpu_paths", "\n".join(lines)))


if __name__ == "__main__":
    main()

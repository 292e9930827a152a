"""benchmarks/bench_dinov2.py: the "foundation" source holds every real non-PCam source it names, at each
resolution asked for, and a half-cut folder is never taken for a finished one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dinov2  # noqa: E402


def test_foundation_tiles_hold_every_named_source_at_each_resolution(shared_data: Path, tmp_path: Path) -> None:
    out = bench_dinov2.foundation_tiles(tmp_path / "found", (0.97, 0.5))
    counts = bench_dinov2.source_counts(out)
    # MoNuSeg (10 images of 1000 px at 0.2527 µm/px) and CMU-1 give tiles at both resolutions; the colorectal
    # samples (150-224 px at ~0.5 µm/px) hold whole 96-px tiles at 0.5 µm/px
    for source in ("MoNuSeg at 0.97 µm/px", "MoNuSeg at 0.5 µm/px", "CMU-1 at 0.97 µm/px", "CMU-1 at 0.5 µm/px",
                   "colorectal samples at 0.5 µm/px"):
        assert counts.get(source, 0) > 0, (source, counts)
    # a MoNuSeg image is 253 µm wide: 261 px at 0.97 µm/px -> at most 3 x 3 tiles of 96 px at stride 72
    assert counts["MoNuSeg at 0.97 µm/px"] <= 9 * len(list((shared_data / "nuclei" / "monuseg2018-test" / "images").glob("*.png")))
    assert counts["MoNuSeg at 0.5 µm/px"] > 3 * counts["MoNuSeg at 0.97 µm/px"]  # ~ (0.97 / 0.5)² as many
    tiles = sorted(out.glob("*.png"))
    assert sum(counts.values()) == len(tiles)
    first = np.asarray(Image.open(tiles[0]))
    assert first.shape == (96, 96, 3) and (first.mean(-1) < 210).mean() >= 0.5  # stained tissue, not glass
    assert not (tmp_path / "found.partial").exists()


def test_a_half_cut_foundation_folder_is_cut_again(shared_data: Path, tmp_path: Path) -> None:
    partial = tmp_path / "found.partial"
    partial.mkdir()
    for i in range(30):  # more files than the reuse check asks for, in the folder of an interrupted cut
        Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(partial / f"0.97_stale_{i}.png")
    out = bench_dinov2.foundation_tiles(tmp_path / "found", (0.97,))
    assert out == tmp_path / "found" and not partial.exists()
    assert not list(out.glob("*stale*"))  # the interrupted cut's files are gone
    assert bench_dinov2.source_counts(out)["MoNuSeg at 0.97 µm/px"] > 0

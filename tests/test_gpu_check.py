"""benchmarks/gpu_check.sh (every GPU check in one script) runs in its tiny CPU mode, so it cannot rot.

The tiny mode runs the GPU sections' real code paths on CPU with tiny models and synthetic slides;
the assertions check that each section's report is computed from its own rows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_mode_runs_every_section(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "GIGASLIDE_THREADS": "1", "TMPDIR": str(scratch)}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=300)
    tmp_path = tmp_path / "out"
    # the sections' scratch files (generated slides, tile folders, runs) are removed when the check ends
    assert list(scratch.iterdir()) == []
    report = (tmp_path / "gpu_check.md").read_text()
    assert p.returncode == 0, report + p.stderr[-2000:]
    assert "# GPU check (tiny mode)" in report
    for name in ("encode", "streaming", "dinov2", "tile_ssl"):
        assert f"- section {name}: ok" in report
    dv = (tmp_path / "gpu_dinov2.md").read_text()
    rows = re.findall(r"^\| (native|lightning) \| (auto|fp32) \((\w+)\) \| (\d+) \| ([0-9.]+) \|", dv, re.M)
    assert [(r[0], r[1], r[3]) for r in rows] == [("native", "auto", "3"), ("native", "fp32", "3"), ("lightning", "auto", "3")]
    assert all(float(r[4]) > 0 for r in rows)
    # both engines run the same recipe on the same data and seed: the same losses (CPU, fp32)
    diff = float(re.search(r"difference ([+-][0-9.e+-]+)\)", dv).group(1))
    assert abs(diff) < 1e-4
    enc = (tmp_path / "gpu_encode.md").read_text()
    rows = {r[0]: r[1:] for r in re.findall(r"^\| (test_resnet|test_vit) \| (\d+) \| (\d+) \| [\d.]+ \| (\d+) \| "
                                           r"[\d.]+ \| ([^|]+) \|$", enc, re.M)}
    assert set(rows) == {"test_resnet", "test_vit"} and all(int(v) > 0 for r in rows.values() for v in r[:3])
    assert all(r[3].strip() == "direct, decoded on cpu" for r in rows.values())  # the device path really ran
    # stored JPEG tiles of the generated (YCbCr) slide decoded by the batch decoder (here on CPU) as by imagecodecs
    jpeg = re.findall(r"^\| (gen\d+\.tiff) \| YCbCr \| (\d+) \| 256×256 \| (\d+) \| (\d+) \| [\d.]+ \| (\d+) \|$",
                      enc, re.M)
    assert len(jpeg) == 1 and jpeg[0][1] == "16" and int(jpeg[0][2]) > 0 and int(jpeg[0][3]) > 0
    assert int(jpeg[0][4]) <= 2
    readers = re.findall(r"^\| (\d+) \| (\d+) \|$", enc, re.M)
    assert [r for r, _ in readers] == ["1", "2"] and all(int(v) > 0 for _, v in readers)
    text = (tmp_path / "gpu_streaming.md").read_text()
    assert "## 1. Scale" in text and "## 2. End to end" in text and "Tiny mode" in text
    sizes = {m[0]: m for m in re.findall(r"^\| (\d+)² \| (\d+) \| (\d+)×(\d+) \|", text, flags=re.M)}
    assert set(sizes) == {"384", "512"} and sizes["512"][2:] == ("8", "8")  # 512 px / (stride 32 x pool 2)
    aucs = [float(v) for v in re.findall(r"^\| (?:StreamingCLAM|ABMIL)[^|]*\| ([0-9.]+) \|", text, flags=re.M)]
    diff = float(re.search(r"StreamingCLAM − ABMIL = ([+-][0-9.]+)", text).group(1))
    assert len(aucs) == 2 and diff == pytest.approx(aucs[0] - aucs[1], abs=2e-3)
    n = int(re.search(r"^(\d+) mosaic slides", text, flags=re.M).group(1))
    split = re.search(r"Split: (\d+) train, (\d+) validation, (\d+) test", text)
    assert n == 8 and sum(int(v) for v in split.groups()) == n
    ssl = (tmp_path / "gpu_tile_ssl.md").read_text()
    assert "## Tile SSL on the device" in ssl and "Tiny mode" in ssl
    acc = r"([01]\.\d{3}) \[([01]\.\d{3}), ([01]\.\d{3})\]"
    rows = re.findall(rf"^\| (random init|mocov2, 3s) \| ([^|]+) \| ([^|]+) \| [^|]+ \| [^|]+ \| {acc} \| ([^|]+) \|",
                      ssl, re.M)
    assert [r[0] for r in rows] == ["random init", "mocov2, 3s"]
    steps = re.fullmatch(r"(\d+) / (\d+)", rows[1][1].strip())
    assert steps and int(steps.group(1)) > 0 and float(rows[1][2]) > 0  # it really trained, at a measured rate
    (base, lo0, hi0), (ssl_acc, lo1, hi1) = [tuple(float(v) for v in r[3:6]) for r in rows]
    assert lo0 <= base <= hi0 and lo1 <= ssl_acc <= hi1
    delta = re.fullmatch(r"([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\], p=([0-9.e-]+)", rows[1][6].strip())
    assert rows[0][6].strip() == "-" and delta, rows[1][6]
    d, d_lo, d_hi = (float(v) for v in delta.groups()[:3])
    # the paired Δ is the SSL row's balanced accuracy minus random init's, on the same valid tiles
    assert d == pytest.approx(ssl_acc - base, abs=1.6e-3) and d_lo <= d <= d_hi
    line = re.search(r"Δ linear bal\. acc\. = ([0-9.]+) − ([0-9.]+) = ([+-][0-9.]+)", ssl)
    a1, a0, dd = (float(v) for v in line.groups())
    assert (a1, a0) == pytest.approx((ssl_acc, base), abs=6e-4) and dd == pytest.approx(a1 - a0, abs=2e-4)
    # the verdict follows from Δ and the CIs (the goal: Δ ≥ +0.05 and the SSL row's CI above random init's)
    met = d >= 0.05 and lo1 > hi0
    assert re.search(r"\*\*Verdict:\*\* MoCo v2 after 3s .* (meets|does not meet) the issue's", ssl).group(1) == (
        "meets" if met else "does not meet")


def test_gpu_check_stops_at_once_naming_what_the_environment_lacks(tmp_path):
    # a Python without its site-packages (as a GPU image without gigaslide's dependencies): the script puts
    # src/ on the path itself, then stops before any section, naming the missing modules
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", str(tmp_path / "out")],
                       env={**env, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=120)
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert p.returncode == 1
    missing = re.search(r"- environment: missing (.*?) --", report).group(1).split()
    assert "torch" in missing and "h5py" in missing and "gigaslide" not in missing
    assert "gpu_prepare.sh" in report and "section" not in report


def test_gpu_prepare_selects_the_first_tiles_of_each_class(tmp_path):
    data = tmp_path / "data"
    (data / "MANIFEST.md").parent.mkdir()
    (data / "MANIFEST.md").write_text("# data\n")
    for c in ("0", "1"):
        (data / "tiles" / "pcam" / "train" / c).mkdir(parents=True)
        for i in (5, 1, 9, 3):
            (data / "tiles" / "pcam" / "train" / c / f"p{i}.jpg").write_bytes(b"x" * i)
        (data / "tiles" / "pcam" / "valid" / c).mkdir(parents=True)  # the tile_ssl section's test tiles
        for i in (7, 2, 8):
            (data / "tiles" / "pcam" / "valid" / c / f"v{i}.jpg").write_bytes(b"v" * i)
    (data / "slides").mkdir()
    (data / "slides" / "cmu-1-small-region.svs").write_bytes(b"svs")  # the encode section's Aperio JPEG slide
    (data / "slides" / "other.svs").write_bytes(b"not carried")
    out = tmp_path / "gpu"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_prepare.sh"), "--no-wheels", "--tiles-per-class", "2",
                        "--valid-per-class", "1", "--out", str(out)],
                       env={**os.environ, "GIGASLIDE_SHARED_DATA": str(data)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for c in ("0", "1"):
        got = sorted(f.name for f in (out / "data" / "tiles" / "pcam" / "train" / c).iterdir())
        assert got == ["p1.jpg", "p3.jpg"]
        assert (out / "data" / "tiles" / "pcam" / "train" / c / "p3.jpg").read_bytes() == b"xxx"
        assert [f.name for f in (out / "data" / "tiles" / "pcam" / "valid" / c).iterdir()] == ["v2.jpg"]
    assert (out / "data" / "MANIFEST.md").read_text() == "# data\n"
    assert "6 tiles (2 of them PCam valid)" in p.stdout
    assert [f.name for f in (out / "data" / "slides").iterdir()] == ["cmu-1-small-region.svs"]
    assert (out / "data" / "slides" / "cmu-1-small-region.svs").read_bytes() == b"svs"

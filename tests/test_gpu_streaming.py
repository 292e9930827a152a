"""benchmarks/gpu_streaming.py's part 1 keeps within its time share and survives running out of memory, so a lent
GPU's scarce minutes are not lost to one size that does not fit (tiny trunk on CPU)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_streaming  # noqa: E402

TINY = {**gpu_streaming.MODES["tiny"], "sizes": (384, 512, 640)}
CPU = torch.device("cpu")


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """image side -> [tiles, map to head, fwd+bwd s, peak memory GB, image GB]"""
    return {m.group(1): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if (m := re.match(r"^\| (\d+)² \|", line))}


def test_random_image_repeats_one_block_only_above_4096():
    small = gpu_streaming._image(256, CPU)  # noqa: SLF001
    assert small.shape == (1, 3, 256, 256) and small.dtype == torch.uint8
    assert len(small.unique()) > 200  # random pixels, not a constant
    big = gpu_streaming._image(8192, CPU)  # noqa: SLF001
    assert big.shape == (1, 3, 8192, 8192)
    assert torch.equal(big[..., :4096, :4096], big[..., 4096:, 4096:])
    assert not torch.equal(big[..., :4096, :4096], big[..., :4096, 1:4097])


def test_scale_skips_the_sizes_whose_projected_time_does_not_fit():
    written: list[list[str]] = []
    lines = gpu_streaming.scale(TINY, CPU, "fp32", lambda _: None, budget_s=0.0,
                                write=lambda r: written.append(list(r)))
    rows = _rows(lines)
    assert list(rows) == ["384", "512", "640"]
    assert float(rows["384"][2]) > 0  # the first size always runs: nothing to project from
    assert rows["512"][2].startswith("skipped: projected") and rows["512"][1] == "-"
    assert rows["640"][2] == "not tried: 512² was skipped"
    assert len(written) == 3 and written[-1] == lines  # the report was rewritten after every row
    # with no limit every size runs
    assert all(r[2].replace(".", "").isdigit() for r in _rows(gpu_streaming.scale(TINY, CPU, "fp32", print)).values())


def test_scale_records_out_of_memory_as_a_row_and_stops_growing(monkeypatch):
    from gigaslide.streaming import StreamingCNN

    forward = StreamingCNN.forward

    def oom_above_400(self, x, *a, **kw):  # noqa: ANN001, ANN202
        if x.shape[-1] > 400:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return forward(self, x, *a, **kw)

    monkeypatch.setattr(StreamingCNN, "forward", oom_above_400)
    rows = _rows(gpu_streaming.scale(TINY, CPU, "fp32", lambda _: None))
    assert float(rows["384"][2]) > 0 and rows["384"][1] == "6×6"  # 384 px / (stride 32 x pool 2)
    assert rows["512"][2].startswith("out of memory")
    assert rows["640"][2] == "not tried: 512² ran out of memory"


def test_scale_lets_other_errors_through(monkeypatch):
    from gigaslide.streaming import StreamingCNN

    def broken(self, x, *a, **kw):  # noqa: ANN001, ANN202
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(StreamingCNN, "forward", broken)
    with pytest.raises(RuntimeError, match="same device"):  # a bug is not reported as a measurement
        gpu_streaming.scale(TINY, CPU, "fp32", lambda _: None)


def test_full_mode_does_not_start_an_experiment_that_cannot_finish(monkeypatch, tmp_path):
    # full mode's rule on the tiny trunk and synthetic tiles: with 1 s for part 2 the probe shows that the smallest
    # experiment cannot finish, so the part says so (with the command to run it alone) instead of overrunning
    real = gpu_streaming._tiles_dir  # noqa: SLF001
    monkeypatch.setattr(gpu_streaming, "_tiles_dir", lambda mode, work: real("tiny", work))
    lines = gpu_streaming.e2e("full", gpu_streaming.MODES["tiny"], CPU, "random", 1.0, tmp_path, lambda _: None)
    text = "\n".join(lines)
    assert "## 2. End to end" in text and "Not run:" in text and "--skip-scale --e2e-budget 480" in text
    need = float(re.search(r"needs about (\d+) s", text).group(1))
    per_slide = re.search(r"render ([\d.]+) s, train step ([\d.]+) s, eval ([\d.]+) s", text)
    assert need > 0 and per_slide is not None and "test AUC" not in text

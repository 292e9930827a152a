"""Same command, same seed -> identical outputs, stage by stage (CPU, tiny sizes).

Compared are the bytes of every array a run writes (HDF5 datasets, safetensors tensors, .npy
arrays) and its prediction tables, never whole files (those carry timestamps and host names).

What is and is not deterministic:
- CPU (these tests): tiling, feature extraction (fp32; bf16 autocast is deterministic too, but a
  different number), MIL / slide-SSL / tile-SSL / streaming training with a fixed ``--seed``, one
  process, the same torch thread count. A different thread count may change float sums in the
  last bits (oneDNN / OpenMP reductions are split by thread).
- CUDA: not bit-exact by default. cuDNN picks convolution algorithms by benchmarking and several
  backward kernels (scatter/index_add, atomics in conv weight gradients, ``torch.nn.functional.
  interpolate`` backward) accumulate in a nondeterministic order; autocast fp16/bf16 widens the
  gap. Features from ``encode`` (inference only) usually agree to ~1e-6 relative, trained weights
  drift apart over steps. ``torch.use_deterministic_algorithms(True)`` with
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` makes most of it reproducible at a speed cost (ops without a
  deterministic kernel then raise). DataLoader worker counts do not change results here (each
  item's randomness is seeded from the item, not the worker), but DDP with another world size does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.testing import make_slide, make_tile_folder, output_arrays


def twice(argv_for, tmp_path: Path, *, min_arrays: int = 1, skip=None) -> dict[str, bytes]:  # noqa: ANN001
    """Run ``argv_for(out)`` into two fresh folders; the arrays (but those ``skip(key)`` names) must be byte-identical."""
    torch.set_num_threads(1)
    runs = []
    for k in ("a", "b"):
        out = tmp_path / k
        assert main(argv_for(out)) == 0
        runs.append({key: v for key, v in output_arrays(out).items() if skip is None or not skip(key)})
    assert len(runs[0]) >= min_arrays and sorted(runs[0]) == sorted(runs[1])
    diff = [k for k in runs[0] if runs[0][k] != runs[1][k]]
    assert not diff, f"differ between two identical runs: {diff[:5]}"
    return runs[0]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("det")
    return [make_slide(d / f"s{i}.tiff", (1024, 768), seed=i) for i in range(4)]


ENC = ["--encoder", "test_resnet", "--weights", "random", "--mpp", "2.0", "--tile-size", "32", "--workers", "0",
       "--precision", "fp32"]


def test_tile(slides, tmp_path):
    got = twice(lambda o: ["tile", *map(str, slides[:2]), "--out", str(o), "--mpp", "1.0", "--tile-size", "64",
                           "--overlap", "16"], tmp_path, min_arrays=6)
    assert any(k.endswith(":padding") for k in got)


def test_encode(slides, tmp_path):
    got = twice(lambda o: ["encode", *map(str, slides[:2]), "--out", str(o), *ENC], tmp_path, min_arrays=4)
    assert any("features/s0.h5:features" == k for k in got)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Eight slides' feature files (class 1 shifted), as `gigaslide encode` writes them."""
    from gigaslide.features import store

    out = tmp_path_factory.mktemp("feat")
    rng = np.random.default_rng(0)
    rows = ["slide_id,label"]
    for i in range(8):
        n = int(rng.integers(5, 30))
        feats = rng.normal(i % 2, 1.0, (n, 16)).astype(np.float32)
        coords = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
        store.save(out / "features" / f"s{i}.h5", feats, coords, attrs={"slide_id": f"s{i}", "encoder": "test", "mpp": 1.0,
                   "tile_size": 64}, coords_attrs={"patch_size_level0": 64.0})
        rows.append(f"s{i},{i % 2}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out


def test_train_mil(features, tmp_path):
    twice(lambda o: ["train-mil", "--features", str(features / "features"), "--labels", str(features / "labels.csv"),
                     "--out", str(o), "--model", "abmil", "--folds", "2", "--epochs", "2", "--hidden", "8",
                     "--bootstrap", "0", "--seed", "3"], tmp_path, min_arrays=2)


def test_pretrain_tile_ssl(tmp_path):
    """The exported encoder is identical. (Not the checkpoint: lightly's MemoryBankModule registers
    ``bank_ptr`` with ``torch.empty``, so that unused buffer holds whatever memory it got.)"""
    tiles = make_tile_folder(tmp_path / "tiles", 6, size=32, noise=20.0)
    got = twice(lambda o: ["pretrain", "--data", str(tiles), "--out", str(o), "--method", "simclr", "--backbone",
                           "test_resnet", "--tile-size", "32", "--steps", "2", "--batch-size", "4", "--workers", "0",
                           "--seed", "1", "--method-args", '{"hidden_dim": 16, "out_dim": 8}'], tmp_path, min_arrays=2,
                skip=lambda k: k.startswith("checkpoint/"))
    assert any(k.startswith("encoder/") for k in got)


def test_augment_cache_and_pretrain_slides(slides, tmp_path):
    cache = ["augment-cache", *map(str, slides), "--encoder", "test_resnet", "--weights", "random", "--views", "3",
             "--tiles-per-view", "6", "--mpp", "2.0", "--tile-size", "32", "--seed", "2"]
    twice(lambda o: [*cache, "--out", str(o)], tmp_path / "cache", min_arrays=4)
    c = tmp_path / "cache" / "a"
    twice(lambda o: ["pretrain-slides", "--method", "gigassl", "--cache", str(c), "--out", str(o), "--epochs", "2",
                     "--out-dim", "16", "--width", "16", "--blocks", "1", "--norm", "layer", "--tiles-per-step", "4",
                     "--seed", "2"], tmp_path / "gssl", min_arrays=2)


def test_train_streaming(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(4):
        make_slide(d / f"s{i}.tif", (1024, 768), mpp=0.5, seed=i)
    (d / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(4)))
    twice(lambda o: ["train-streaming", "--slides", str(d), "--labels", str(d / "labels.csv"), "--out", str(o),
                     "--mpp", "1.5", "--image-size", "320", "--tile-size", "256", "--encoder", "test_resnet",
                     "--weights", "random", "--pool-kernel", "2", "--folds", "2", "--epochs", "2", "--freeze-epochs", "1",
                     "--accumulate", "1", "--precision", "fp32", "--seed", "0", "--checkpoint-blocks", "false"],
          tmp_path / "runs", min_arrays=2)

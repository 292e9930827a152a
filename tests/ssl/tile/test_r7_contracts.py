"""Review round 7: the caller's global RNG streams survive a tile-SSL call, absurd numbers in a config are one line,
exported encoders name the weights and data they came from, and an --init whose header claims absurd shapes is
refused before it is read."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.provenance import file_sha256, read_provenance
from gigaslide.ssl.tile.engine import PretrainConfig, pretrain
from gigaslide.testing import make_tile_folder

SMALL = {"hidden_dim": 32, "out_dim": 16}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tile_folder(tmp_path_factory.mktemp("tiles") / "t", size=32, flat=16)


def _cfg(tiles: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(tiles), out=str(out), method="simclr", backbone="test_resnet", tile_size=32, batch_size=4,
                method_args=SMALL, steps=1, log_every=1, data_kind="tiles", monitor_size=8, precision="fp32", workers=0)
    base.update(kw)
    return PretrainConfig(**base)


def _streams() -> tuple:
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _seed_caller() -> None:
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)


def _assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]), "torch's global RNG was changed"
    assert np.array_equal(a[1], b[1]), "numpy's global RNG was changed"
    assert a[2] == b[2], "python's random was changed"


def test_pretrain_gives_the_callers_random_streams_back(tiles, tmp_path):
    """build_model's torch.manual_seed(cfg.seed) reset the caller's torch stream to seed 0 (the next torch.rand of a
    notebook repeated the numbers after every call); a resumed run restored its checkpoint's streams into the caller."""
    _seed_caller()
    before = _streams()
    pretrain(_cfg(tiles, tmp_path / "run", steps=2, stop_after_steps=1))
    _assert_same(before, _streams())
    pretrain(_cfg(tiles, tmp_path / "run", steps=2))  # resumed: restores the checkpoint's RNG states inside
    _assert_same(before, _streams())
    expected = torch.rand(3)
    _seed_caller()
    assert torch.equal(torch.rand(3), expected)


def test_pretrain_result_does_not_depend_on_the_callers_random_state(tiles, tmp_path):
    """The run draws on its own streams seeded with --seed: the same weights whatever the caller drew before."""
    from safetensors.torch import load_file

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    pretrain(_cfg(tiles, tmp_path / "a", steps=2))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    pretrain(_cfg(tiles, tmp_path / "b", steps=2))
    a, b = (load_file(str(tmp_path / r / "encoder" / "weights.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_and_embed_give_the_callers_random_streams_back(tmp_path):
    from gigaslide.ssl.tile.embed import embed_folder
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train = make_tile_folder(tmp_path / "train", 6, seed=0)
    test = make_tile_folder(tmp_path / "test", 4, seed=1)
    _seed_caller()
    before = _streams()
    embed_folder(train, "test_resnet", tmp_path / "f.h5", weights="random", batch_size=4)
    _assert_same(before, _streams())
    finetune_tiles(train, test, "test_resnet", tmp_path / "ft", weights="random",
                   cfg=FinetuneConfig(epochs=1, batch_size=4, n_bootstrap=10, workers=0))
    _assert_same(before, _streams())


@pytest.mark.parametrize(("kw", "words"), [
    ({"lr": float("nan")}, "--lr nan is not a finite number"),
    ({"lr": -1.0}, "--lr -1.0 must be above 0"),
    ({"weight_decay": -0.5}, "--weight-decay -0.5 must be at least 0"),
    ({"layer_decay": float("nan")}, "--layer-decay nan"),
    ({"warmup_frac": 5.0}, "--warmup-frac 5.0 must be at least 0 and at most 1"),
    ({"drop_path": 2.0, "backbone": "test_vit"}, "--drop-path 2.0"),
    ({"steps": None, "budget_s": 1e308}, "--budget (seconds) 1e+308"),
    ({"min_tissue": float("nan")}, "--min-tissue nan"),
    ({"mpp": [float("nan")]}, "--mpp nan"),
    ({"mpp": [1e308]}, "--mpp 1e+308"),
    ({"seed": 2**70}, "--seed 1180591620717411303424"),
    ({"seed": -1}, "--seed -1"),
    ({"method": "dino", "method_args": {}, "local_size": 10**9}, "--local-size 1000000000 must be between 8"),
])
def test_absurd_numbers_in_a_config_are_one_line_before_any_work(tiles, tmp_path, kw, words):
    """From a config file or the Python API these were a bare ValueError / OverflowError / RuntimeError deep in the
    optimiser, the step plan or a crop (`--budget 1e308`: int(inf); `--local-size 1e9`: a 10^18-pixel crop), or
    trained without a word (`layer_decay: .nan`, `mpp: .nan`)."""
    with pytest.raises(GigaslideError, match="^" + words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        pretrain(_cfg(tiles, tmp_path / "run", **kw))
    assert not (tmp_path / "run").exists()


def test_the_export_names_the_init_weights_and_the_data_it_learned_from(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "a"))
    init = tmp_path / "a" / "encoder"
    pretrain(_cfg(tiles, tmp_path / "b", init=str(init), steps=2, stop_after_steps=1))
    pretrain(_cfg(tiles, tmp_path / "b", init=str(init), steps=2))  # resumed: from the checkpoint's record
    prov = read_provenance(tmp_path / "b" / "encoder")
    assert prov.get("init") == str(init) and prov.get("steps") == 2
    assert prov.get("init_sha256") == file_sha256(init / "weights.safetensors")
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert prov.get("data") == str(tiles.resolve()) and prov.get("data_kind") == "image_folder"
    assert prov.get("data_sha256") == rec["inputs"]["data"]["listing_sha256"] and prov.get("data_files") == 16
    assert read_provenance(tmp_path / "a" / "encoder").get("init_sha256") is None  # no --init: none claimed


def test_the_finetuned_encoder_names_its_base_weights_and_training_tiles(tmp_path):
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train = make_tile_folder(tmp_path / "train", 6, seed=0)
    test = make_tile_folder(tmp_path / "test", 4, seed=1)
    rep = finetune_tiles(train, test, "test_resnet", tmp_path / "ft", weights="random",
                         cfg=FinetuneConfig(epochs=1, batch_size=4, n_bootstrap=10, workers=0, seed=3))
    prov = read_provenance(tmp_path / "ft" / "fraction_100pct" / "encoder")
    assert prov.kind == "encoder" and prov.seed == 3 and prov.encoder == "test_resnet_finetuned"
    assert prov.get("base_encoder") == "test_resnet" and prov.get("base_weights") == "random-seed3"
    assert prov.get("train_tiles") == rep["protocols"]["finetune_100%"]["train_fingerprint"]
    assert prov.get("epochs_run") == 1 and prov.get("n_train") + prov.get("n_val") == 12


def _bomb(path: Path, n: int) -> Path:
    """A safetensors file whose header claims an [n, n] float32 tensor over a sparse file (no real bytes)."""
    hdr = json.dumps({"conv1.0.weight": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, n * n * 4]}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        f.truncate(8 + len(hdr) + n * n * 4)
    return path


def test_an_init_claiming_absurd_tensor_shapes_is_refused_from_its_header(tiles, tmp_path, monkeypatch):
    """A 40 GB (sparse) safetensors --init was read whole: `std::bad_alloc` aborted the process (no message) or the
    machine swapped. Now its header is enough: one line, nothing read, no run folder."""
    from gigaslide.ssl.tile import init as init_mod

    bomb = _bomb(tmp_path / "bomb.safetensors", 100_000)

    def never(path):  # noqa: ANN001, ANN202
        raise AssertionError(f"the weights were read: {path}")

    monkeypatch.setattr(init_mod, "_read_state_dict", never)
    with pytest.raises(GigaslideError, match=r"--init holds 10,000,000,000 weights .*\[100000, 100000\].*test_resnet"):
        pretrain(_cfg(tiles, tmp_path / "run", init=str(bomb)))
    assert not (tmp_path / "run").exists()


def test_an_init_of_the_right_size_is_still_read(tiles, tmp_path):
    pretrain(_cfg(tiles, tmp_path / "a"))
    s = pretrain(_cfg(tiles, tmp_path / "b", init=str(tmp_path / "a" / "encoder" / "weights.safetensors")))
    assert s["init"].endswith("weights.safetensors")


def test_finetune_says_when_the_tiles_are_resized_to_another_size_than_their_own(tmp_path, caplog):
    """Fine-tuning resized every tile to the encoder's input size without a word: 32 px tiles into test_resnet's
    64 px, 96 px PCam tiles into a 224-px export -- the encoder sees another magnification than its own."""
    import logging

    from gigaslide.encoders import ENCODERS
    from gigaslide.ssl.tile.finetune import warn_resized

    spec = ENCODERS.get("test_resnet")
    small = make_tile_folder(tmp_path / "small", 1, size=32) / "normal" / "000.png"
    same = make_tile_folder(tmp_path / "same", 1, size=spec.input_size) / "normal" / "000.png"
    with caplog.at_level(logging.WARNING, logger="gigaslide.ssl.tile"):
        assert warn_resized(same, spec) == spec.input_size
        assert not caplog.records
        assert warn_resized(small, spec) == 32
    assert len(caplog.records) == 1
    assert "tiles are 32 px (000.png) but encoder test_resnet takes 64 px: each tile is resized by 2.00x" in caplog.text


def test_finetune_of_a_re_exported_encoder_is_not_answered_from_the_old_weights(tmp_path):
    """The key of a fraction's result named the encoder by its path and `--weights default`: after RUN/encoder was
    re-exported (a continued pre-training), a re-run reused the old weights' result and checkpoint and reported
    them under the new weights' sha256."""
    from gigaslide.encoders import build_encoder
    from gigaslide.encoders.model import export_encoder
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train = make_tile_folder(tmp_path / "train", 6, seed=0)
    test = make_tile_folder(tmp_path / "test", 4, seed=1)
    folder = tmp_path / "enc"
    cfg = FinetuneConfig(epochs=1, batch_size=4, n_bootstrap=10, workers=0)

    def export(seed: int) -> None:
        enc = build_encoder("test_resnet", "random", seed=seed)
        export_encoder(folder, enc.trunk, enc.spec)

    export(0)
    first = finetune_tiles(train, test, str(folder), tmp_path / "ft", cfg=cfg)
    again = finetune_tiles(train, test, str(folder), tmp_path / "ft", cfg=cfg)  # same weights: reused
    assert np.array_equal(first["test_probs"]["finetune_100%"], again["test_probs"]["finetune_100%"])
    export(1)
    new = finetune_tiles(train, test, str(folder), tmp_path / "ft", cfg=cfg)
    assert new["train"]["encoder_weights"] != first["train"]["encoder_weights"]
    assert not np.array_equal(first["test_probs"]["finetune_100%"], new["test_probs"]["finetune_100%"])
    fresh = finetune_tiles(train, test, str(folder), tmp_path / "fresh", cfg=cfg)  # what the new weights give
    assert np.array_equal(fresh["test_probs"]["finetune_100%"], new["test_probs"]["finetune_100%"])


def test_the_python_api_takes_pathlib_paths_for_data_out_and_init(tiles, tmp_path):
    """`PretrainConfig(init=Path(...))` was an AttributeError ('PosixPath' object has no attribute 'startswith')."""
    pretrain(_cfg(tiles, tmp_path / "a"))
    s = pretrain(PretrainConfig(**{**_cfg(tiles, tmp_path / "b").__dict__, "data": Path(tiles), "out": tmp_path / "b",
                                   "init": tmp_path / "a" / "encoder"}))
    assert s["init"] == str(tmp_path / "a" / "encoder") and s["steps"] == 1
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["config"]["init"] == str(tmp_path / "a" / "encoder") and rec["config"]["out"] == str(tmp_path / "b")
    prov = read_provenance(tmp_path / "b" / "encoder")
    assert prov.get("init_sha256") == file_sha256(tmp_path / "a" / "encoder" / "weights.safetensors")


def test_an_init_export_written_by_a_newer_gigaslide_is_refused(tiles, tmp_path):
    """An export whose provenance says format_version 99 was loaded as --init as if it were this version's layout."""
    pretrain(_cfg(tiles, tmp_path / "a"))
    spec = tmp_path / "a" / "encoder" / "encoder.json"
    d = json.loads(spec.read_text())
    d["provenance"]["format_version"] = 99
    spec.write_text(json.dumps(d))
    for init in (tmp_path / "a" / "encoder", tmp_path / "a"):
        with pytest.raises(GigaslideError, match="written in format version 99"):
            pretrain(_cfg(tiles, tmp_path / "b", init=str(init)))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("kw", "words"), [
    ({"weight_decay": float("nan")}, "weight_decay nan must be a number >= 0"),
    ({"val_fraction": float("nan")}, "val_fraction nan must lie between 0 and 1"),
    ({"val_fraction": 2.0}, "val_fraction 2.0 must lie between 0 and 1"),
    ({"head_lr": -1.0}, "--head-lr -1.0 must be a positive number"),
    ({"lr": float("nan")}, "--lr nan must be a positive number"),
    ({"batch_size": 0}, "--batch-size 0 must be a whole number of at least 2"),
    ({"epochs": 0}, "--epochs 0 must be a whole number of at least 1"),
    ({"patience": 0}, "patience 0 must be a whole number of at least 1"),
    ({"seed": -1}, "--seed -1 must be a whole number of at least 0"),
    ({"max_train": -3}, "--max-train -3 must be a whole number of at least 2"),
    ({"workers": -1}, "--workers -1 must be a whole number of at least 0"),
])
def test_finetune_settings_no_run_can_use_are_one_line_before_any_work(tmp_path, kw, words):
    """From the Python API these were a bare ValueError / ZeroDivisionError, a FileNotFoundError for a best model
    never written (0 epochs, patience 0), or trained without a word (a negative head lr, a validation share of 2)."""
    from gigaslide.ssl.tile.finetune import FinetuneConfig, finetune_tiles

    train = make_tile_folder(tmp_path / "train", 3, seed=0)
    test = make_tile_folder(tmp_path / "test", 2, seed=1)
    cfg = FinetuneConfig(**{"epochs": 1, "batch_size": 4, "n_bootstrap": 5, "workers": 0, **kw})
    with pytest.raises(GigaslideError, match="^" + words):
        finetune_tiles(train, test, "test_resnet", tmp_path / "ft", weights="random", cfg=cfg)
    assert not (tmp_path / "ft").exists()

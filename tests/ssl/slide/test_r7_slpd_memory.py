"""Round 7: SLPD trains on memory-mapped tile features, not on the whole cohort held in memory.

SLPD read every slide's features into memory before training (peak anonymous memory +95 MB at 100 slides of 39 MB of
features, +218 MB at 400 slides of 157 MB); it now scans the folder one slide at a time and trains from one
memory-mapped copy per dtype in ``RUN/.features-mmap`` (+55 / +62 MB; pages of a file, given back under memory
pressure), with the same weights to the bit."""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from gigaslide.ssl.slide import slpd
from gigaslide.ssl.slide.slpd import SPILL, pretrain_slpd

KW = dict(region_size=256, prototypes=1, dim=16, heads=2, depth=1, head_dim=16, batch_size=8, warmup=1, epochs=2,
          device="cpu")


def _weights(run):  # noqa: ANN001, ANN202
    return load_file(str(run / "model.safetensors"))


def _no_room(monkeypatch):  # noqa: ANN001, ANN202
    """statvfs says the run's disk is full: the features are held in memory (the code before the memory map)."""
    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(slpd.os, "statvfs", lambda p: Full())


def test_training_reads_memory_mapped_features_and_removes_them(tmp_path, make_fake_cache, monkeypatch):
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    seen = []
    real = slpd._pack_items

    def spy(slides, items, grid):  # noqa: ANN001, ANN202
        seen.extend({type(f) for _, f, _ in slides})
        assert all(isinstance(f, np.memmap) and os.path.dirname(f.filename) == str(tmp_path / "run" / SPILL)
                   for _, f, _ in slides)
        return real(slides, items, grid)

    monkeypatch.setattr(slpd, "_pack_items", spy)
    res = pretrain_slpd(feats, tmp_path / "run", log=lambda *a: None, **KW)
    assert res["finished"] and seen and set(seen) == {np.memmap}
    assert not (tmp_path / "run" / SPILL).exists()  # the copy is gone once the run is done


def test_the_memory_mapped_run_is_bit_identical_to_the_in_memory_one(tmp_path, make_fake_cache, monkeypatch):
    feats = make_fake_cache(tmp_path / "f", n_slides=5, n_tiles=36)
    mapped = pretrain_slpd(feats, tmp_path / "mapped", log=lambda *a: None, **KW)
    said = []
    _no_room(monkeypatch)
    held = pretrain_slpd(feats, tmp_path / "held", log=said.append, **KW)
    assert any("held in memory" in s for s in said)
    a, b = _weights(tmp_path / "mapped"), _weights(tmp_path / "held")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(mapped["history"]) == strip(held["history"])


def test_float16_and_float32_slides_in_one_folder_train_as_held_in_memory(tmp_path, make_fake_cache, monkeypatch):
    """One mapped file per stored dtype; each slide keeps its dtype (float16 is not widened, nor float32 narrowed)."""
    from gigaslide.features import store

    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    for p in sorted((feats / "features").glob("*.h5"))[::2]:
        ff = store.load(p)
        keep = ("encoder", "encoder_weights_sha256", "mpp", "tile_size", "slide_id")
        store.save(p, ff.features.astype(np.float16), ff.coords, attrs={k: ff.attrs[k] for k in keep},
                   coords_attrs=ff.coords_attrs)
    dtypes = []
    real = slpd._pack_items
    monkeypatch.setattr(slpd, "_pack_items", lambda s, i, g: dtypes.extend(f.dtype for _, f, _ in s) or real(s, i, g))
    pretrain_slpd(feats, tmp_path / "mapped", log=lambda *a: None, **KW)
    assert set(dtypes) == {np.dtype(np.float16), np.dtype(np.float32)}
    _no_room(monkeypatch)
    pretrain_slpd(feats, tmp_path / "held", log=lambda *a: None, **KW)
    a, b = _weights(tmp_path / "mapped"), _weights(tmp_path / "held")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_killed_runs_copy_is_no_result_and_is_removed(tmp_path, make_fake_cache):
    """A run killed in its first epoch leaves RUN/.features-mmap: it neither blocks a run of other options on the same
    --out (a folder with no results is replaced) nor stays."""
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    run = tmp_path / "run"
    pretrain_slpd(feats, run, log=lambda *a: None, stop_after=0, **KW)  # run.json written, nothing trained
    (run / SPILL).mkdir()
    (run / SPILL / "float32.bin").write_bytes(b"\0" * 64)  # what kill -9 mid-epoch leaves
    res = pretrain_slpd(feats, run, log=lambda *a: None, **{**KW, "lr": 1e-3})
    assert res["finished"] and not (run / SPILL).exists()


@pytest.mark.parametrize("broken", ["statvfs", "write"])
def test_no_room_for_the_copy_falls_back_to_memory_in_one_line(tmp_path, make_fake_cache, monkeypatch, broken):
    feats = make_fake_cache(tmp_path / "f", n_slides=3, n_tiles=36)
    if broken == "statvfs":
        _no_room(monkeypatch)
    else:
        def full(folder, slides):  # noqa: ANN001, ANN202
            folder.mkdir()
            (folder / "float32.bin").write_bytes(b"\0" * 64)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(slpd, "_map", full)
    said = []
    res = pretrain_slpd(feats, tmp_path / "run", log=said.append, **KW)
    assert res["finished"] and len([s for s in said if "held in memory" in s]) == 1
    assert not (tmp_path / "run" / SPILL).exists()

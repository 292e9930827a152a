"""Bags: slides' features held in memory only up to a budget, read from their files beyond it."""

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.mil.bags import Bags, budget_note, resolve_budget
from gigaslide.mil.train import feature_stats


def _files(tmp_path, sizes=(5, 7, 3, 9), d=4, dtype=np.float32):
    r = np.random.default_rng(1)
    arrays = []
    for i, n in enumerate(sizes):
        x = r.normal(size=(n, d)).astype(dtype)
        store.save(tmp_path / f"s{i}.h5", x, r.integers(0, 500, (n, 2)), attrs={"encoder": "toy", "slide_id": f"s{i}"})
        arrays.append(x)
    files = store.load_dir(tmp_path, arrays=False)
    return [files[f"s{i}"] for i in range(len(sizes))], arrays


def test_a_lazy_load_reads_no_features_until_a_bag_is_used(tmp_path):
    files, arrays = _files(tmp_path)
    f = files[1]
    assert isinstance(f.features, store.LazyFeatures)
    assert (len(f), f.dim, f.features.nbytes) == (7, 4, 7 * 4 * 4)
    np.testing.assert_array_equal(f.coords, store.load(tmp_path / "s1.h5").coords)  # coords are read at once
    np.testing.assert_array_equal(np.asarray(f.features), arrays[1])


def test_bags_beyond_the_budget_are_read_at_every_use_and_give_the_same_tensors(tmp_path):
    files, arrays = _files(tmp_path)
    per = [a.nbytes for a in arrays]  # 80, 112, 48, 144 bytes
    bags = Bags(files, budget_bytes=per[0] + per[1])
    for _ in range(3):  # three epochs over every bag
        for i in range(4):
            assert bags[i].dtype == torch.float32
            np.testing.assert_array_equal(bags[i].numpy(), arrays[i])
    st = bags.stats()
    # s0 and s1 fill the budget and are read once; s2 (it would fit alone) and s3 are read at every use (6 each)
    assert (st["kept_bags"], st["kept_bytes"], st["reads"]) == (2, per[0] + per[1], 1 + 1 + 6 + 6)
    unlimited = Bags(files, budget_bytes=1 << 40)
    for _ in range(3):
        for b in unlimited:
            pass
    assert unlimited.stats()["reads"] == 4


def test_a_float16_file_is_kept_in_float16_and_given_as_float32(tmp_path):
    files, arrays = _files(tmp_path, sizes=(6,), dtype=np.float16)
    bags = Bags(files, budget_bytes=6 * 4 * 2)  # fits only in its stored dtype
    t = bags[0]
    assert t.dtype == torch.float32 and bags.stats()["kept_bytes"] == 48
    np.testing.assert_array_equal(t.numpy(), arrays[0].astype(np.float32))


def test_a_subset_keeps_the_order_given_and_one_pass_stats_match_the_concatenation(tmp_path):
    files, arrays = _files(tmp_path)
    sub = Bags(files, budget_bytes=0).take(np.array([3, 0, 2]))
    assert [len(b) for b in sub] == [9, 5, 3] and len(sub) == 3
    mean, std = feature_stats(sub)
    cat = np.concatenate([arrays[3], arrays[0], arrays[2]]).astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), cat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), cat.std(0), rtol=1e-5)


def test_a_file_replaced_while_the_job_runs_is_refused_by_name(tmp_path):
    files, _ = _files(tmp_path)
    store.save(tmp_path / "s2.h5", np.zeros((4, 4), np.float32), attrs={"encoder": "toy", "slide_id": "s2"})
    with pytest.raises(GigaslideError, match=r"s2\.h5: features changed on disk"):
        Bags(files, budget_bytes=0)[2]


def test_budget_values(monkeypatch):
    assert resolve_budget(1.5) == 1_500_000_000 and resolve_budget("0") == 0
    monkeypatch.setattr("gigaslide.mil.bags.available_memory", lambda: 8_000_000_000)
    assert resolve_budget("auto") == 4_000_000_000 == resolve_budget(None)
    assert resolve_budget("inf") == 1 << 62 == resolve_budget(float("inf"))  # no limit (was an OverflowError)
    for bad in ("lots", -1, "nan"):
        with pytest.raises(GigaslideError, match="bag memory budget"):
            resolve_budget(bad)


def test_the_log_line_says_whether_every_bag_fits(tmp_path):
    files, arrays = _files(tmp_path)
    total = sum(a.nbytes for a in arrays)
    assert "all kept in memory" in budget_note(Bags(files, total))
    assert "read from disk at every use" in budget_note(Bags(files, total - 1))


def test_free_heap_pages_are_handed_back_only_when_the_process_is_over_start_kept_and_slack(tmp_path, monkeypatch):
    files, arrays = _files(tmp_path)
    rss = {"now": 1_000}
    calls = []
    monkeypatch.setattr("gigaslide.mil.bags.rss_bytes", lambda: rss["now"])
    monkeypatch.setattr("gigaslide.mil.bags.malloc_trim", lambda: calls.append(1) or True)
    bags = Bags(files, budget_bytes=arrays[0].nbytes)  # s0 is kept
    assert bags.slack_bytes == 512 << 20  # tiny bags: the floor
    bags[0]
    bound = 1_000 + arrays[0].nbytes + bags.slack_bytes
    rss["now"] = bound  # at the bound: nothing to do
    bags[1]
    assert calls == []
    rss["now"] = bound + 1
    bags[2]
    assert len(calls) == 1 and bags.stats()["trims"] == 1


def _flip_a_feature_byte(path):
    """Damage the features' first chunk on disk (the header stays readable: caught only when the bag is read)."""
    import h5py

    with h5py.File(path, "r") as f:
        off = f["features"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[off + 10] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_verify_reads_every_bag_once_and_names_every_damaged_or_nan_one_in_one_line(tmp_path):
    files, arrays = _files(tmp_path)
    bags = Bags(files, budget_bytes=1 << 40)
    bags.verify()
    assert bags.stats()["reads"] == 4 and bags.stats()["kept_bags"] == 4  # kept on the way: no read is wasted
    _flip_a_feature_byte(tmp_path / "s1.h5")
    with pytest.raises(GigaslideError, match=r"s1\.h5: cannot read HDF5") as one:
        Bags(files, budget_bytes=0).verify()
    assert "\n" not in str(one.value)
    x = arrays[3].copy()
    x[4, 2] = np.inf
    x[6, 0] = np.nan
    store.save(tmp_path / "s3.h5", x, np.zeros((9, 2)), attrs={"encoder": "toy", "slide_id": "s3"})
    with pytest.raises(GigaslideError, match=r"2 feature files cannot be used: s1\.h5: cannot read HDF5 .*; "
                                             r"s3\.h5: 2 tile\(s\) have NaN/inf features"):
        Bags(files, budget_bytes=0).verify(rows=4)  # the NaN and the inf lie in different row blocks

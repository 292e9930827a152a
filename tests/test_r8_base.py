"""Review round 8 (would the tests catch a wrong implementation?): gaps mutation testing found in the base layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gigaslide import runs


def test_a_tie_keeps_the_first_best_epoch_and_counts_as_no_improvement() -> None:
    """Early stopping: a later epoch that only ties the best is not selected and uses up patience (the checkpoint
    of the first epoch to reach the best value is the one kept)."""
    for mode, values in (("max", [0.8, 0.8, 0.8]), ("min", [0.3, 0.3, 0.3])):
        sel = runs.Selection(mode, patience=2)
        assert [sel.update(v, e) for e, v in enumerate(values)] == [True, False, False]
        assert sel.best_epoch == 0 and sel.bad_epochs == 2 and sel.stop
    lex = runs.Selection("max")  # tuples: the tie-break key decides, an exact tie again keeps the first
    assert lex.update((0.9, -0.5), 0) and lex.update((0.9, -0.4), 1) and not lex.update((0.9, -0.4), 2)
    assert lex.best_epoch == 1 and lex.best == [0.9, -0.4]


@pytest.mark.parametrize(("text", "seconds"), [("1d", 86400.0), ("1d2h", 93600.0), ("45s", 45.0), ("0.5h", 1800.0),
                                               ("2H 30M", 9000.0)])
def test_parse_duration_every_unit(text: str, seconds: float) -> None:
    assert runs.parse_duration(text) == seconds


@pytest.mark.parametrize("size", [64 * 1024 + 1, 150 * 1024, 3 * 64 * 1024 + 7])
def test_a_folder_fingerprint_sees_a_change_in_the_last_bytes_of_any_file(tmp_path: Path, size: int) -> None:
    """The folder hash reads each file's first and last 64 KiB: a file between two and three chunks long must be
    hashed by its real tail (re-encoded features often differ only near the end of the file)."""
    d = tmp_path / "inputs"
    d.mkdir()
    f = d / "slide.h5"
    data = bytearray(size)
    f.write_bytes(bytes(data))
    before = runs.fingerprint(d)["listing_sha256"]
    data[-1] = 1
    f.write_bytes(bytes(data))
    assert runs.fingerprint(d)["listing_sha256"] != before
    data[-1], data[0] = 0, 1
    f.write_bytes(bytes(data))
    assert runs.fingerprint(d)["listing_sha256"] != before


class _Growing(torch.nn.Module):
    """A module whose non-persistent buffer changes shape while it trains (a queue filled lazily)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("queue", torch.zeros(0, 2), persistent=False)


def test_a_non_persistent_buffer_that_changed_shape_is_restored_with_its_shape(tmp_path: Path) -> None:
    trained = _Growing()
    trained.queue = torch.arange(10.0).reshape(5, 2)
    runs.save_checkpoint(tmp_path, {"model": runs.module_state(trained)})
    fresh = _Growing()
    runs.load_module_state(fresh, runs.load_checkpoint(tmp_path)["model"], tmp_path)
    assert torch.equal(fresh.queue, torch.arange(10.0).reshape(5, 2))
    assert dict(fresh.named_buffers())["queue"] is fresh.queue  # still a registered buffer (moves with .to())
    assert torch.equal(fresh.lin.weight, trained.lin.weight)


def _rec(**kw: object) -> "Provenance":
    from gigaslide.provenance import Provenance

    base = {"kind": "features", "encoder": "resnet50", "encoder_weights_sha256": "ab" * 32, "mpp": 0.5,
            "tile_size": 224}
    return Provenance.from_dict({**base, **kw})


@pytest.mark.parametrize(("key", "other"), [("mpp", 0.504), ("mpp", 1.0), ("tile_size", 256), ("encoder", "uni"),
                                            ("encoder_weights_sha256", "cd" * 32), ("encoder_weights_sha256", None),
                                            ("mpp", None)])
def test_check_same_refuses_artifacts_that_differ_in_one_compat_key_naming_both(key: str, other: object) -> None:
    from gigaslide.errors import GigaslideError
    from gigaslide.provenance import check_same

    odd = ("c.h5", _rec(**{key: other}))
    for recs in ([("a.h5", _rec()), ("b.h5", _rec()), odd], [("a.h5", _rec()), odd, ("b.h5", _rec())]):
        with pytest.raises(GigaslideError, match=rf"a\.h5 and c\.h5 differ in {key} "):
            check_same(recs, where="feats")


def test_check_same_lets_through_what_only_float_noise_separates() -> None:
    from gigaslide.provenance import check_same

    check_same([("a.h5", _rec(mpp=0.5)), ("b.h5", _rec(mpp=0.5 * (1 + 1e-9))), ("c.h5", _rec(extra_key=1))])
    check_same([("a.h5", _rec(encoder_weights_sha256=None)), ("b.h5", _rec(encoder_weights_sha256=None))])


def test_a_legacy_zero_mpp_reads_as_unknown_not_as_zero() -> None:
    from gigaslide.provenance import Provenance

    assert Provenance.from_dict({"kind": "features", "mpp": 0}).mpp is None
    assert Provenance.from_dict({"kind": "features", "mpp": -1.0}).mpp is None
    assert Provenance.from_dict({"kind": "features", "mpp": "0.25"}).mpp == 0.25


@pytest.mark.parametrize("cached", [False, True])
def test_cleaning_one_targets_temporaries_leaves_those_of_a_target_whose_name_it_prefixes(tmp_path: Path,
                                                                                        cached: bool) -> None:
    """``s.h5`` and ``s.h5ad`` (or ``a`` and ``ab``) in one folder: a job cleaning up after ``s.h5`` must not delete
    the temporary file another live job is writing ``s.h5ad`` into."""
    from gigaslide import atomic

    mine = tmp_path / ".tmp-s.h5.k2j3x.h5"
    other = tmp_path / ".tmp-s.h5ad.q9w8e"
    for f in (mine, other):
        f.write_bytes(b"x")
    atomic._tmp_listings.pop(tmp_path, None)
    assert atomic.clean_stale_tmp_for(tmp_path / "s.h5", cached=cached) == 1
    assert not mine.exists() and other.exists()


def _probe_with_bf16_cosines(cosines: list[float]):
    """A probe whose rows, computed under CPU bf16 autocast, have exactly these cosines to its fp32 rows."""
    import math

    rows_fp32 = torch.zeros(len(cosines), 2, dtype=torch.float64)
    rows_fp32[:, 0] = 1.0
    rows_bf16 = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines], dtype=torch.float64)
    return lambda: rows_bf16 if torch.is_autocast_enabled("cpu") else rows_fp32


@pytest.mark.parametrize(("cosines", "want"), [([1.0, 0.9995], "bf16"), ([1.0, 0.995], "fp32"),
                                               ([1.0, 1.0, 1.0, 0.998], "fp32")])
def test_auto_on_cpu_takes_bf16_only_when_its_worst_row_agrees_to_the_threshold(monkeypatch, cosines, want) -> None:
    """The check is the *minimum* cosine over the probe's rows against BF16_MIN_COSINE (0.999): one tile's embedding
    spoilt by bf16 keeps the whole run in fp32 although the mean is above the threshold."""
    from gigaslide import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    got = devices.choose_precision(torch.device("cpu"), "auto", probe=_probe_with_bf16_cosines(cosines))
    assert got.resolved == want
    assert got.bf16_cosine == pytest.approx(min(cosines), abs=1e-6)


def test_a_stride_equal_to_the_input_size_keeps_bf16() -> None:
    """Only a stride *larger* than the map is hazardous (checked on the kernel: stride 2 on 2x2, 3 on 3x3 give weight
    gradients within bf16 rounding of fp32), so those convolutions keep bf16."""
    from gigaslide import devices

    conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    devices.guard_bf16_convs(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(2, 3, 2, 2)).dtype == torch.bfloat16
        assert conv(torch.randn(2, 3, 2, 1)).dtype == torch.float32


def test_releasing_a_lock_someone_took_over_leaves_their_lock(tmp_path: Path) -> None:
    """A holder whose lock was judged stale and taken over (e.g. its heartbeat stopped on another host) must not
    delete the new holder's lock file when it finally releases: two processes would then work on one item."""
    import json

    from gigaslide.locks import ItemLock

    mine = ItemLock(tmp_path, "slide-1")
    assert mine.acquire()
    theirs = {"pid": 999999, "host": "other-node", "start": None, "time": 0.0}
    mine.path.write_text(json.dumps(theirs))
    mine.release()
    assert mine.path.is_file() and json.loads(mine.path.read_text()) == theirs
    assert not ItemLock(tmp_path, "slide-1", stale_after=1e9).acquire()


def test_a_lock_freed_between_two_looks_is_a_plain_acquire_not_a_takeover(tmp_path: Path, monkeypatch) -> None:
    """``took_over`` (which makes the caller clean up a dead holder's temporaries) only when a holder's record was
    found: a lock released between the first create and the look under the guard was simply free."""
    from gigaslide.locks import ItemLock

    lock = ItemLock(tmp_path, "slide-1")
    real = ItemLock._create
    calls = []

    def first_fails(self: ItemLock) -> bool:
        calls.append(1)
        return False if len(calls) == 1 else real(self)

    monkeypatch.setattr(ItemLock, "_create", first_fails)
    assert lock.acquire() and lock.held and not lock.took_over


@pytest.mark.parametrize("tight", ["parent", "child"])
def test_the_tightest_of_nested_cgroup_limits_is_the_room_left(tmp_path: Path, monkeypatch, tight: str) -> None:
    """A job step inside a job inside a user slice (cgroup v2): each level has its own limit and usage; the process is
    killed when any of them is reached, so the room is the smallest limit-less-usage along the path, wherever it is."""
    from gigaslide import memory

    gb = 1 << 30
    parent_room, child_room = (1 * gb, 3 * gb) if tight == "parent" else (3 * gb, 1 * gb)
    files = {"user/memory.max": f"{8 * gb}\n", "user/memory.current": f"{8 * gb - parent_room}\n",
             "user/memory.stat": "inactive_file 0\n",
             "user/job/memory.max": f"{4 * gb}\n", "user/job/memory.current": f"{4 * gb - child_room}\n",
             "user/job/memory.stat": "inactive_file 0\n"}
    (tmp_path / "meminfo").write_text(f"MemAvailable: {20 * gb // 1024} kB\n")
    (tmp_path / "cgroup").write_text("0::/user/job\n")
    for rel, text in files.items():
        f = tmp_path / "sys" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(memory, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(tmp_path / "sys"))
    assert memory.available_memory() == 1 * gb


def test_gated_attention_is_the_papers_formula() -> None:
    """Ilse et al. (2018), eq. 9: a_k = w^T (tanh(V h_k) * sigm(U h_k)), written out with plain matrix products."""
    from gigaslide.layers import GatedAttention

    torch.manual_seed(0)
    att = GatedAttention(dim=6, attn_dim=4, n_heads=2).eval()
    h = torch.randn(5, 6)
    V, bV = att.V[0].weight, att.V[0].bias
    U, bU = att.U[0].weight, att.U[0].bias
    w, bw = att.w.weight, att.w.bias
    want = (torch.tanh(h @ V.T + bV) * torch.sigmoid(h @ U.T + bU)) @ w.T + bw
    torch.testing.assert_close(att(h), want)
    torch.testing.assert_close(att(h[None])[0], want)  # batched [B, N, dim] too

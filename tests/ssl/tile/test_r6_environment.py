"""Round 6, the user's environment and counts at scale for tile SSL: a small /dev/shm (docker's 64 MB)."""

from __future__ import annotations

import logging

import pytest

from gigaslide.ssl.tile import data as tdata
from gigaslide.ssl.tile.augment import MultiView, view_recipes


class _Source:
    def __len__(self) -> int:
        return 256

    def load(self, idx, g):  # noqa: ANN001, ANN201
        raise AssertionError("the loader's plan must not read tiles")


def _loader(free_mb: float | None, monkeypatch, workers: int = 2):  # noqa: ANN001, ANN202
    import gigaslide.slides.pool as pool

    free = None if free_mb is None else int(free_mb * 2**20)
    monkeypatch.setattr(pool, "shm_free_bytes", lambda path=pool.SHM_DIR: free)
    recipes = view_recipes("two", "pathology", 152, 0)  # SimCLR's two 152 px crops of 224 px tiles
    ds = tdata.ViewDataset(_Source(), MultiView(recipes), 224)
    sampler = tdata.StepSampler(len(ds), 64, seed=0, num_steps=1)
    return tdata.make_loader(ds, sampler, workers)


def test_batch_bytes_are_the_views_float32_pixels():
    recipes = view_recipes("two", "pathology", 152, 0)
    ds = tdata.ViewDataset(_Source(), MultiView(recipes), 224)
    assert tdata.batch_nbytes(ds, 64) == 64 * 2 * 3 * 152 * 152 * 4  # 35.5 MB


def test_a_docker_sized_dev_shm_reads_in_this_process_instead_of_hanging(monkeypatch, caplog):
    """Two workers read 4 batches ahead each: 9 x 35.5 MB in /dev/shm. Under docker's 64 MB a worker failed to
    allocate its batch in torch's queue thread and the run hung for ever (measured: killed by `timeout 300` at step
    0); now the batches are read in the main process, with a warning naming /dev/shm and the fix."""
    with caplog.at_level(logging.WARNING, logger=tdata.log.name):
        loader = _loader(64, monkeypatch)
    assert loader.num_workers == 0
    assert "/dev/shm has 64 MB free" in caplog.text and "--shm-size" in caplog.text


def test_some_room_reads_fewer_batches_ahead(monkeypatch, caplog):
    # 300 MB free, 10 % kept for others: 7 batches of 35.5 MB fit, one of them in use: 6 ahead = 2 workers x 3
    with caplog.at_level(logging.WARNING, logger=tdata.log.name):
        loader = _loader(300, monkeypatch)
    assert (loader.num_workers, loader.prefetch_factor) == (2, 3)
    assert "6 batches are read ahead by 2 data-loader workers instead of 8 by 2" in caplog.text


@pytest.mark.parametrize("free_mb", [None, 2048])
def test_enough_or_unknown_shared_memory_keeps_the_workers(monkeypatch, free_mb):
    loader = _loader(free_mb, monkeypatch)
    assert (loader.num_workers, loader.prefetch_factor) == (2, tdata.PREFETCH)


# ------------------------------------------------------------------ counts at scale: the step sampler
def _reference_batch(n: int, batch: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """Each step's batch as the sampler defines it: epoch orders from (seed, epoch), seeds from (seed, step, j)."""
    import numpy as np

    lo = step * batch * world + rank * batch
    out = []
    for j in range(lo, lo + batch):
        epoch, pos = divmod(j, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append((int(perm[pos]), int(np.random.SeedSequence([seed, step, j]).generate_state(1)[0])))
    return out


@pytest.mark.parametrize(("n", "rank", "world"), [(10, 0, 1), (7, 1, 2), (1000, 0, 1)])
def test_the_sampler_draws_each_epochs_order_once_and_its_batches_are_unchanged(monkeypatch, n, rank, world):
    """The epoch's permutation was drawn again for every step: O(n) a step, 94 ms for a million tiles and 1.7 s for
    ten million (many slides x tissue tiles x magnifications), more than a GPU step. Now once per epoch; every batch
    is still the function of (seed, step) it was (resume and ranks unchanged)."""
    import numpy as np

    sampler = tdata.StepSampler(n, 4, seed=3, start_step=5, num_steps=60, rank=rank, world_size=world)
    draws = []
    real = np.random.default_rng

    def counting(seed=None):  # noqa: ANN001, ANN202
        draws.append(seed)
        return real(seed)

    monkeypatch.setattr(np.random, "default_rng", counting)
    got = list(sampler)
    monkeypatch.setattr(np.random, "default_rng", real)
    assert got == [_reference_batch(n, 4, 3, step, rank, world) for step in range(5, 65)]
    firsts = [step * 4 * world + rank * 4 for step in range(5, 65)]
    epochs = {j // n for lo in firsts for j in range(lo, lo + 4)}
    assert len(draws) == len(epochs)  # was: one draw per step and epoch it touched (60+)


# ------------------------------------------------------------------ half-set launcher variables (--devices N)
@pytest.mark.parametrize(("name", "value"), [("LOCAL_RANK", ""), ("WORLD_SIZE", "two"), ("RANK", "-1")])
def test_a_rank_variable_that_is_no_whole_number_is_one_line_before_the_run_folder(tmp_path, monkeypatch, capsys,
                                                                                 name, value):
    """``LOCAL_RANK=`` (a job script's empty export) failed with a ValueError traceback from torchmetrics' import
    (or from this engine's own int())."""
    from gigaslide.cli.main import main
    from gigaslide.testing import make_tile_folder

    tiles = make_tile_folder(tmp_path / "t", size=32, flat=4)
    monkeypatch.setenv(name, value)
    rc = main(["pretrain", "--data", str(tiles), "--out", str(tmp_path / "run"), "--method", "simclr",
               "--backbone", "test_resnet", "--tile-size", "32", "--batch-size", "4", "--steps", "1",
               "--devices", "2", "--method-args", '{"hidden_dim": 8, "out_dim": 8}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"error: environment variable {name}={value!r} is not a whole number (torchrun sets "
                                   f"it) -- fix: unset {name} (the engine starts its own processes for --devices), or "
                                   "launch with torchrun")
    assert not (tmp_path / "run").exists()

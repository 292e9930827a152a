"""Half-set or odd torchrun / SLURM variables: one line naming the variable, never a traceback (review round 6, E)."""

from __future__ import annotations

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.features.parallel import RankInfo, rank_info


@pytest.mark.parametrize("env,names", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc'"),  # was a ValueError traceback
    ({"RANK": "0", "WORLD_SIZE": ""}, "WORLD_SIZE=''"),
    ({"SLURM_PROCID": "", "SLURM_NTASKS": "4"}, "SLURM_PROCID=''"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "x"}, "SLURM_LOCALID='x'"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "rank 3 of 2"),  # was accepted: a rank no share belongs to, exit status 0
    ({"RANK": "0", "WORLD_SIZE": "0"}, "rank 0 of 0"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "rank -1 of 2"),
])
def test_bad_rank_variables_are_one_line_errors(env, names):
    with pytest.raises(GigaslideError) as e:
        rank_info(env)
    assert names in e.value.one_line() and "fix: unset" in e.value.one_line()


@pytest.mark.parametrize("env,want", [
    ({"WORLD_SIZE": "2"}, RankInfo()),  # WORLD_SIZE without RANK: not launched by torchrun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, RankInfo()),  # an interactive srun shell: one process
    ({"SLURM_NTASKS": "4"}, RankInfo()),  # salloc -n 4, run directly: no task id
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, RankInfo(2, 4, 0, 2, "torchrun")),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x2)"},
     RankInfo(3, 4, 1, 2, "slurm")),
])
def test_half_set_variables_run_as_the_launcher_meant(env, want):
    assert rank_info(env) == want

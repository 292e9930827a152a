"""Round 8: a rank equal to the world size is outside it (ranks are 0 .. world - 1)."""

from __future__ import annotations

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.features.parallel import rank_info


def test_the_last_rank_is_world_minus_one_and_rank_world_is_refused():
    assert rank_info({"RANK": "1", "WORLD_SIZE": "2"}).rank == 1
    with pytest.raises(GigaslideError, match="a rank must lie in 0 .. world - 1"):
        rank_info({"RANK": "2", "WORLD_SIZE": "2"})  # would take no LPT share: its slides left to the others' end
    with pytest.raises(GigaslideError, match="a rank must lie in 0 .. world - 1"):
        rank_info({"SLURM_PROCID": "3", "SLURM_NTASKS": "3"})

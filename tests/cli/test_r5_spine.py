"""The batch error of ``tile`` / ``encode`` counts what finished (review round 5)."""

from __future__ import annotations

import pytest

from gigaslide.cli.spine import _raise_if_failed
from gigaslide.errors import GigaslideError


@pytest.mark.parametrize("failures,n,left,says", [
    ({"a": "x", "b": "y"}, 2, 0, "2 of 2 slides failed (none finished)"),  # said "(the others finished)": none did
    ({"a": "x"}, 3, 0, "1 of 3 slides failed (the others finished)"),
    ({"a": "x"}, 3, 1, "1 of 3 slides failed (1 left to another process, 1 finished)"),
    ({"a": "x"}, 2, 1, "1 of 2 slides failed (1 left to another process, none finished)"),
])
def test_batch_error_counts_what_finished(tmp_path, failures, n, left, says):
    with pytest.raises(GigaslideError) as e:
        _raise_if_failed(failures, n, tmp_path / "manifest.json", left)
    assert says in e.value.one_line()

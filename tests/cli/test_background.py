"""``--background``: every command that reads slides takes it, and the warnings that name it name one it takes."""

from __future__ import annotations

import re

import pytest

from gigaslide.cli.main import parse
from gigaslide.tiling.stain import FLUORESCENCE, StainInfo

#: Every command that reads slides (and so may print a StainWarning), with its required arguments.
SLIDE_COMMANDS = {
    "tile": ["tile", "s.svs", "--out", "o"],
    "encode": ["encode", "s.svs", "--out", "o"],
    "augment-cache": ["augment-cache", "s.svs", "--out", "o"],
    "nuclei": ["nuclei", "s.svs", "--model", "m", "--out", "o"],
    "train-streaming": ["train-streaming", "--slides", "d", "--labels", "l.csv", "--out", "o"],
    "heatmap-streaming": ["heatmap-streaming", "s.svs", "--run", "r", "--out", "o.png"],
    "pretrain": ["pretrain", "--data", "d", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(SLIDE_COMMANDS))
def test_the_stain_warnings_option_exists_for_every_command_that_prints_it(command: str) -> None:
    """The fluorescence StainWarning told augment-cache users to pass ``--background dark``, which augment-cache (like
    nuclei, the streaming commands and pretrain) did not take."""
    flags = re.findall(r"(--[a-z-]+) (\w+)", StainInfo("dark", FLUORESCENCE).warning or "")
    assert flags  # it names the option that forces the background
    for flag, value in flags:
        kwargs = parse([*SLIDE_COMMANDS[command], flag, value])[1]
        assert kwargs[flag[2:].replace("-", "_")] == value

"""Round 8 (lens U): viewer.js's pyramid layout and scale bar, run in node with the fake page of test_viewer_js.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from gigaslide.viewer.app import OVERLAY_TILE, STATIC
from gigaslide.viewer.deepzoom import Geometry

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
HARNESS = Path(__file__).with_name("fake_page.js")


def _run(scenario: str, arg: object) -> dict:
    out = subprocess.run([NODE, str(HARNESS), str(STATIC / "viewer.js"), scenario, json.dumps(arg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tile_sources_are_the_servers_pyramids():
    """OpenSeadragon places tile (level, col, row) from the source's tileSize, tileOverlap and maxLevel (its full
    resolution level): those must be the server's deep-zoom layout (254 px tiles, 1 px overlap) for the slide and
    the overlay layout (256 px tiles, no overlap) for every layer, both with the top level = level_count - 1 of the
    slide's size -- or the layers drift off the slide by up to a tile."""
    g = Geometry(1000, 700)
    info = {"key": "s", "width": 1000, "height": 700, "tile_size": g.tile_size, "overlap": g.overlap,
            "levels": g.level_count, "overlay_tile_size": OVERLAY_TILE}
    got = _run("sources", info)
    assert got["slide"] == {"width": 1000, "height": 700, "tileSize": 254, "tileOverlap": 1, "minLevel": 0,
                            "maxLevel": 10}
    assert got["overlay"] == {"width": 1000, "height": 700, "tileSize": 256, "tileOverlap": 0, "minLevel": 0,
                              "maxLevel": 10}


def test_scale_bar_length_and_label():
    """The bar is the largest 1 / 2 / 5 x 10^k µm not longer than 120 screen px, drawn that many µm long (hand
    computed: 0.5 µm/px at 2 screen px a px = 0.25 µm a screen px: 20 µm = 80 px; 0.25 µm/px at 1/64: 16 µm a
    screen px, 1 mm = 62.5 px; 0.5 µm/px at 1/100: 50 µm a screen px, 5 mm = 100 px; 0.5 at 8: 0.0625, 5 µm = 80 px)."""
    got = _run("scalebar", [[0.5, 2], [0.25, 1 / 64], [0.5, 0.01], [0.5, 8]])
    assert got["bars"] == [["80px", "20 µm"], ["63px", "1 mm"], ["100px", "5 mm"], ["80px", "5 µm"]]

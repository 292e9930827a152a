"""viewer.js's logic in node, without a browser: a fake OpenSeadragon / DOM / fetch (fake_page.js) runs the page's
own code, so the tile URLs it builds and the order in which it applies slow answers are checked where no Chromium is.
Skipped when node is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gigaslide.viewer.app import STATIC

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")
HARNESS = Path(__file__).with_name("fake_page.js")


def _run(scenario: str) -> dict:
    out = subprocess.run([NODE, str(HARNESS), str(STATIC / "viewer.js"), scenario], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tile_urls_carry_the_servers_version():
    """A browser keeps tiles for 10 minutes; the server's version in their URLs keeps a viewer restarted on the same
    port with other runs from showing the earlier one's attention under the new run's name."""
    got = _run("urls")
    v = got["version"]
    assert got["slide"] == f"api/slides/s%200/dz/10/1_2.jpeg?v={v}"
    parts = urlsplit(got["overlay"])
    assert parts.path == "api/slides/s%200/overlay/run0-attention/10/3_1.png"
    assert parse_qs(parts.query) == {"threshold": ["0.5"], "cmap": ["jet"], "v": [v], "fold": ["fold1"]}


def test_a_slow_slide_does_not_land_on_the_slide_opened_after_it():
    """With slide A's attention layer on, the user opens B (its details are slow) and then C: B's details arrive last.
    The page showed C's pyramid with B's attention overlay drawn over it, and took B for the current slide (tile
    clicks asked B for C's coordinates)."""
    got = _run("race")
    assert got["slide"] == "C" and got["ready"]
    assert got["shown"] == ["api/slides/C/dz/10/0_0.jpeg?v=v1"]  # C alone: no overlay of B (nor of A)
    assert got["status"].startswith("C: 512×768 px")

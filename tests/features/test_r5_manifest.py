"""A manifest rewrite killed midway left ``.tmp-manifest.json.*`` behind for good: the next job removes it (review
round 5; seen after ``kill -9`` of ``gigaslide tile``)."""

from __future__ import annotations

import json

from gigaslide.features.manifest import Manifest


def test_killed_rewrite_temporary_is_removed(tmp_path):
    path = tmp_path / "tile_manifest.json"
    Manifest(path, {"command": "tile"}).save()
    left = tmp_path / ".tmp-tile_manifest.json.hj8m6h2z"  # as a run killed inside atomic.write_json leaves it
    left.write_text('{"slides": {"a"')
    other = tmp_path / ".tmp-manifest.json.abcdefgh"  # another manifest's: not this one's to remove
    other.write_text("{}")
    m = Manifest(path, {"command": "tile"})
    m.set("a", "done", tiles=3)
    m.flush()
    assert not left.exists() and other.exists()
    assert json.loads(path.read_text())["slides"]["a"]["tiles"] == 3

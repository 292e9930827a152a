"""Review round 8 (mutation testing): which files of a folder are slides."""

from __future__ import annotations

from gigaslide.slides import find_slides


def test_hidden_files_and_other_extensions_are_not_slides(tmp_path):
    """macOS leaves ``._x.svs`` (AppleDouble metadata, not an image) beside each file copied to a share; a folder of
    slides lists the slide files only, sorted, extensions matched in any case; a plain image is not searched for."""
    for name in ["b.svs", "._b.svs", ".hidden.tiff", "a.NDPI", "c.ome.tif", "notes.txt", "x.png", "d.mrxs"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_slides([tmp_path])] == ["a.NDPI", "b.svs", "c.ome.tif", "d.mrxs"]
    assert [p.name for p in find_slides([tmp_path / "x.png"])] == ["x.png"]  # named directly: taken

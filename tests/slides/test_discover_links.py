"""Slide and tile folders reached through symlinked sub-folders are listed (Path.rglob skipped them silently)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gigaslide.slides import find_slides
from gigaslide.testing import make_slide
from gigaslide.tiling.folders import labelled_images

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")


def test_find_slides_follows_symlinked_subfolder(tmp_path):
    store = tmp_path / "storage" / "cohort_b"
    store.mkdir(parents=True)
    make_slide(store / "b1.tiff", (300, 300))
    batch = tmp_path / "batch"
    (batch / "cohort_a").mkdir(parents=True)
    make_slide(batch / "cohort_a" / "a1.tiff", (300, 300))
    os.symlink(store, batch / "cohort_b")  # a cohort linked in from other storage
    os.symlink(batch, batch / "cohort_a" / "loop")  # a link back up: must not recurse forever
    found = find_slides([batch])
    assert [p.relative_to(batch).as_posix() for p in found] == ["cohort_a/a1.tiff", "cohort_b/b1.tiff"]


def test_find_slides_same_file_through_link_listed_once_in_sorted_order(tmp_path):
    real = tmp_path / "in" / "z_real"
    real.mkdir(parents=True)
    make_slide(real / "s.tiff", (300, 300))
    os.symlink(real, tmp_path / "in" / "a_link")
    found = find_slides([tmp_path / "in"])
    assert [p.relative_to(tmp_path / "in").as_posix() for p in found] == ["a_link/s.tiff"]  # first in sorted order


def test_labelled_images_follows_symlinked_class_folder(tmp_path):
    px = np.full((8, 8, 3), 200, np.uint8)
    (tmp_path / "data" / "normal").mkdir(parents=True)
    Image.fromarray(px).save(tmp_path / "data" / "normal" / "n0.png")
    (tmp_path / "elsewhere" / "tumor").mkdir(parents=True)
    Image.fromarray(px).save(tmp_path / "elsewhere" / "tumor" / "t0.png")
    os.symlink(tmp_path / "elsewhere" / "tumor", tmp_path / "data" / "tumor")
    files, labels, classes = labelled_images(tmp_path / "data")
    assert classes == ["normal", "tumor"]
    assert [f.name for f in files] == ["n0.png", "t0.png"] and labels.tolist() == [0, 1]

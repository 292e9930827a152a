import numpy as np
import pytest
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.tiling.folders import labelled_images, list_images, read_image, subsample


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_labels_follow_sorted_class_folders(tmp_path):
    for c, n in (("tumor", 3), ("normal", 2)):
        for i in range(n):
            _png(tmp_path / c / f"{i}.png", 10 * i)
    files, labels, classes = labelled_images(tmp_path)
    assert classes == ["normal", "tumor"] and labels.tolist() == [0, 0, 1, 1, 1]
    assert read_image(files[0]).shape == (8, 8, 3)


def test_flat_folder_has_no_labels_and_loose_files_are_refused(tmp_path):
    _png(tmp_path / "a.png", 0)
    assert labelled_images(tmp_path)[1] is None
    _png(tmp_path / "cls" / "b.png", 0)
    with pytest.raises(GigaslideError, match="beside the class sub-folders"):
        labelled_images(tmp_path)


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(GigaslideError, match="not found"):
        list_images(tmp_path / "nope")
    with pytest.raises(GigaslideError, match="no images"):
        list_images(tmp_path)


def test_subsample_caps_per_class_and_in_all_deterministically():
    files = [f"f{i}" for i in range(30)]
    labels = np.array([0] * 20 + [1] * 10)
    f1, l1 = subsample(files, labels, max_per_class=5, seed=3)
    assert np.bincount(l1).tolist() == [5, 5] and f1 == sorted(f1, key=lambda s: int(s[1:]))
    assert subsample(files, labels, max_per_class=5, seed=3)[0] == f1
    assert subsample(files, labels, max_per_class=5, seed=4)[0] != f1
    f2, l2 = subsample(files, labels, limit=7, seed=0)
    assert len(f2) == 7 and len(l2) == 7
    assert subsample(files, None, limit=100)[0] == files

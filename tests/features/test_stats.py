import numpy as np
import pytest

from gigaslide.features import stats, store
from gigaslide.features.stats import feature_stats


def test_matches_the_concatenated_cohort_and_ignores_how_it_is_split(monkeypatch):
    rng = np.random.default_rng(0)
    # offset 1000 with unit spread: a naive float32 sum of squares loses the spread entirely
    slides = [(1000 + rng.normal(size=(n, 5))).astype(np.float32) for n in (7, 0, 30, 1)]
    allf = np.concatenate(slides).astype(np.float64)
    mean, std = feature_stats(slides)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, allf.mean(0), rtol=1e-7)
    np.testing.assert_allclose(std, allf.std(0), rtol=1e-5)
    monkeypatch.setattr(stats, "ROWS", 4)  # chunks that cut through slides give the same numbers
    m2, s2 = feature_stats(slides)
    np.testing.assert_allclose(m2, mean, rtol=1e-7)
    np.testing.assert_allclose(s2, std, rtol=1e-6)


def test_constant_dimension_is_floored_and_float16_and_lazy_files_are_read(tmp_path):
    f = np.zeros((10, 3), np.float16)
    f[:, 1] = np.arange(10)
    f[:, 2] = 2.5
    store.save(tmp_path / "a.h5", f)
    lazy = store.load(tmp_path / "a.h5", arrays=False).features
    mean, std = feature_stats([lazy])
    np.testing.assert_allclose(mean, [0.0, 4.5, 2.5])
    np.testing.assert_allclose(std, [stats.STD_FLOOR, np.arange(10).std(), stats.STD_FLOOR], rtol=1e-6)


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no rows"):
        feature_stats([np.zeros((0, 4), np.float32)])

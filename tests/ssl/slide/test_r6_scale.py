"""Round 6, counts at scale: the slide-SSL commands on cohorts of 1,000s of slides."""
import numpy as np
import pytest

from gigaslide.ssl.slide import prototypes
from gigaslide.ssl.slide.prototypes import nearest_slides, set_distance


def _reference(protos):  # noqa: ANN001, ANN202
    """The definition: each slide's partner is the other slide (with prototypes) at the smallest set distance."""
    n = len(protos)
    out = np.full(n, -1, np.int64)
    for i in range(n):
        d = [set_distance(protos[i], protos[j]) if j != i and protos[i] is not None and protos[j] is not None
             else np.inf for j in range(n)]
        if np.isfinite(d).any():
            out[i] = int(np.argmin(d))
    return out


@pytest.mark.parametrize("n,k", [(40, 4), (25, 2), (12, 1), (9, 5), (2, 4), (1, 3)])
def test_nearest_slides_matches_the_pairwise_definition(n, k):
    rng = np.random.default_rng(n * 10 + k)
    protos = [rng.normal(size=(k, 12)) if rng.random() > 0.2 else None for _ in range(n)]
    protos[0] = None if n > 2 else protos[0]
    np.testing.assert_array_equal(nearest_slides(protos), _reference(protos))


def test_nearest_slides_keeps_unequal_sets_on_the_exact_matching():
    rng = np.random.default_rng(1)
    protos = [rng.normal(size=(k, 6)) for k in (2, 3, 4, 3, 2, 4)]
    np.testing.assert_array_equal(nearest_slides(protos), _reference(protos))


def test_nearest_slides_is_not_one_assignment_per_pair_of_slides(monkeypatch):
    """SLPD matched each epoch's slides with one scipy linear_sum_assignment per pair of slides, in a Python loop: 49 s
    per epoch at 1,000 slides (k = 4, 192-d; ~80 min at 10,000; an n x n float64 matrix of 800 MB besides). Sets of
    one size are matched for all pairs at once now (1.6 s at 1,000 slides on the same machine)."""
    calls = []
    real = prototypes.set_distance
    monkeypatch.setattr(prototypes, "set_distance", lambda a, b: calls.append(1) or real(a, b))
    rng = np.random.default_rng(0)
    protos = [rng.normal(size=(4, 8)) for _ in range(60)]
    want = _reference(protos)
    calls.clear()
    np.testing.assert_array_equal(nearest_slides(protos), want)
    assert calls == []


def test_slide_prototypes_scan_the_thread_pools_once_not_per_slide(monkeypatch):
    """Each slide's k-means entered threadpoolctl's threadpool_limits, which scans the process's libraries every time
    (21 ms per slide: 21 s of every SLPD epoch at 1,000 slides; prototype_targets 55 s -> 11.5 s with both fixes)."""
    import threadpoolctl

    prototypes._threadpools.cache_clear()
    made = []
    real = threadpoolctl.ThreadpoolController.__init__

    def init(self):  # noqa: ANN001, ANN202
        made.append(1)
        real(self)

    monkeypatch.setattr(threadpoolctl.ThreadpoolController, "__init__", init)
    rng = np.random.default_rng(0)
    prototypes.slide_prototypes(rng.normal(size=(12, 6)), 3, seed=0)  # one-time set-up (ours, scikit-learn's)
    before = len(made)
    fits = [prototypes.slide_prototypes(rng.normal(size=(12, 6)), 3, seed=0) for _ in range(20)]
    assert all(f is not None and f[0].shape == (3, 6) and len(f[1]) == 12 for f in fits)
    assert len(made) == before  # was one more per slide
    with prototypes._threadpools().limit(limits=1):  # the limit still holds inside
        assert all(p["num_threads"] == 1 for p in threadpoolctl.threadpool_info())

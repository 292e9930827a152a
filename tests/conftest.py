"""Fixtures shared by every stage's tests: real data location, synthetic slides, a quiet torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gigaslide.testing import make_slide, shared_data_dir

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is fastest; restored after tests that change it."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not present")
    return d


@pytest.fixture(scope="session")
def real_slides(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048x1536 pyramidal TIFF at 0.5 µm/px with three tissue blobs."""
    return make_slide(tmp_path_factory.mktemp("slides") / "synth.tiff", (2048, 1536), mpp=0.5, seed=0)


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ARG001
    """Every test that reads ../shared/data (through the shared_data fixture, at any depth) is marked realdata."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.realdata)


def _tiny_project():  # noqa: ANN202
    """tests/viewer/tiny_project.py, loaded once (shared by the viewer and export tests)."""
    import importlib.util
    import sys

    name = "gigaslide_tiny_project"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "viewer" / "tiny_project.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Six generated slides encoded with a tiny random ResNet + a 2-fold ABMIL run on them (viewer and export tests)."""
    return _tiny_project().build_once(tmp_path_factory)


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    return _tiny_project().copy(tiny, tmp_path / "copy")

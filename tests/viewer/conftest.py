import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("gigaslide_tiny_project", Path(__file__).parent / "tiny_project.py")
tiny_project = sys.modules.setdefault("gigaslide_tiny_project", importlib.util.module_from_spec(_spec))
if not hasattr(tiny_project, "build"):
    _spec.loader.exec_module(tiny_project)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Six generated slides encoded with a tiny random ResNet + a 2-fold ABMIL run on them."""
    return tiny_project.build_once(tmp_path_factory)


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    return tiny_project.copy(tiny, tmp_path / "copy")

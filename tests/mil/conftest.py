import pytest


@pytest.fixture
def cli():
    """``gigaslide.cli.main.main``: runs a command line, returns the exit code (2 = GigaslideError)."""
    from gigaslide.cli.main import main

    return main

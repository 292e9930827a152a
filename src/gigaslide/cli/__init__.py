"""Stage 9 — cli: the ``gigaslide`` command (see :mod:`gigaslide.cli.main`)."""

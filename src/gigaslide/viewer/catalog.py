"""The slides of encode output folders, listed without opening any of their files.

:func:`gigaslide.export.catalog.scan` reads the HDF5 attributes of every slide's features and patches file
(about 2 ms a file): with thousands of slides, seconds before the viewer's first page. Here a folder is
listed from ``manifest.json`` and its folders' file names alone (:func:`gigaslide.export.catalog.list_slides`);
a slide's attributes (the slide path its features record, its level-0 mpp) are read when the slide is first used
(:meth:`Catalog.complete`, :func:`gigaslide.export.catalog.complete_entry`), and a completed entry equals the one
``scan`` makes (tests/viewer/test_api.py checks that).
"""

from __future__ import annotations

import os

from gigaslide.export.catalog import SlideEntry, complete_entry, list_slides


class Catalog:
    """Slides of several output folders keyed as :func:`~gigaslide.export.catalog.scan` keys them (``id``, or
    ``id@k`` when folders share an id), with the same ``problems``; entries are completed on first use."""

    def __init__(self, out_dirs: list[str | os.PathLike]):
        self.entries: dict[str, SlideEntry]
        self.problems: list[str]
        self.entries, self.problems = list_slides(list(out_dirs))

    def complete(self, key: str) -> SlideEntry:
        """Entry ``key`` with what its features / patches files record (slide path, level-0 mpp, attributes):
        the fields :func:`~gigaslide.export.catalog.scan` reads from them, read the same way."""
        return complete_entry(self.entries[key])

"""Provenance carried by every artifact that crosses a stage boundary.

Each file written between stages (tile coords, feature files, embeddings, runs) stores these keys
as attributes so any stage can be re-run alone and a mismatch is caught before it corrupts a run.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from gigaslide import __version__

#: Bumped whenever an on-disk layout changes incompatibly.
FORMAT_VERSION = 1


def provenance(**fields: Any) -> dict[str, Any]:
    """Standard attributes plus ``fields`` (None values dropped, so HDF5 can store them)."""
    out: dict[str, Any] = {
        "gigaslide_version": __version__,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.update({k: v for k, v in fields.items() if v is not None})
    return out


def decode_attrs(attrs: Any) -> dict[str, Any]:
    """HDF5 attrs -> plain Python (bytes -> str, numpy scalars -> Python)."""
    import numpy as np

    out: dict[str, Any] = {}
    for k, v in dict(attrs).items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out

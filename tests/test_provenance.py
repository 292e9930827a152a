"""The base layer's provenance helpers: the one content hash every stage records."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gigaslide import provenance, runs
from gigaslide.encoders import model as encoder_model
from gigaslide.errors import GigaslideError
from gigaslide.tiling import annotations, job


def test_file_sha256_is_the_content_hash_and_is_read_once_per_version(tmp_path: Path) -> None:
    f = tmp_path / "a.geojson"
    f.write_bytes(b"first")
    st = f.stat()
    assert provenance.file_sha256(f) == hashlib.sha256(b"first").hexdigest()
    # unchanged: the cached digest (the file is not read again) ...
    misses = provenance._sha256_cached.cache_info().misses
    assert provenance.file_sha256(f) == hashlib.sha256(b"first").hexdigest()
    assert provenance._sha256_cached.cache_info().misses == misses
    # ... new content of the same size with the old mtime put back (cp -p, rsync -t) is a new version, read again
    f.write_bytes(b"other")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert provenance.file_sha256(f) == hashlib.sha256(b"other").hexdigest()


def test_one_hash_function_for_runs_encoders_and_tissue_annotations() -> None:
    assert runs.file_sha256 is provenance.file_sha256
    assert encoder_model.file_sha256 is provenance.file_sha256
    assert annotations.file_sha256 is provenance.file_sha256 and job.file_sha256 is provenance.file_sha256


def test_file_sha256_of_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(GigaslideError, match="cannot read"):
        provenance.file_sha256(tmp_path / "missing.h5")


@pytest.mark.parametrize(("key", "value"), [("tile_size", "abc"), ("seed", 2.5), ("format_version", [1])])
def test_a_record_field_of_the_wrong_type_is_one_line_naming_the_file(tmp_path, key, value):
    """Runs, exports and CSV sidecars read through read_provenance raised a bare ValueError / TypeError."""
    import json

    f = tmp_path / "encoder.json"
    f.write_text(json.dumps({"kind": "encoder", "tile_size": 224, key: value}))
    with pytest.raises(GigaslideError, match=rf"encoder.json: provenance field {key} = .* is not a whole number"):
        provenance.read_provenance(f)
    f.write_text(json.dumps({"kind": "encoder", "tile_size": 224.0, "seed": "7"}))
    rec = provenance.read_provenance(f)
    assert (rec.tile_size, rec.seed) == (224, 7)  # whole numbers however spelled

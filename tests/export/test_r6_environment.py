"""Round 6: the exports in the user's environment (a full disk mid-write) and with degenerate numbers."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def _limited(limit: int):  # noqa: ANN202
    def pre() -> None:  # in the child: files larger than ``limit`` bytes cannot be written (EFBIG, as a full disk)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_anndata_export_onto_a_disk_that_fills_up_is_one_line_and_leaves_nothing(tiny, tmp_path):
    """HDF5 writing the .h5ad itself reported the failed write as a RuntimeError from h5py's close (a traceback),
    printed dozens of "Exception ignored" tracebacks, and the interpreter died of a segmentation fault at exit."""
    out = tmp_path / "exp" / "f.h5ad"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gigaslide", "export", "anndata", str(tiny.out), "--runs", str(tiny.run),
                        "--out", str(out)], capture_output=True, text=True, env=env, preexec_fn=_limited(60_000),
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: cannot write (File too large)"), r.stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no half-written .h5ad, no temporary file, no lock
    # with room, the same command writes it
    r = subprocess.run([sys.executable, "-m", "gigaslide", "export", "anndata", str(tiny.out), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]


def test_anndata_export_says_which_slides_have_nan_features(tiny_copy, tmp_path):
    """NaN / inf features went into X without a word (scanpy's PCA then fails far from the cause)."""
    import h5py
    import numpy as np

    from gigaslide.export import export_anndata

    with h5py.File(tiny_copy.out / "features" / "s2.h5", "r+") as f:
        x = f["features"][:]
        x[[0, 3], 1] = [np.nan, np.inf]
        f["features"][...] = x
    _, adata, problems = export_anndata([tiny_copy.out], tmp_path / "f.h5ad")
    notes = [p for p in problems if "NaN/inf" in p]
    path = tiny_copy.out / "features" / "s2.h5"
    assert notes == [f"s2: 2 of {len(x)} tile(s) have NaN/inf features ({path}) -- kept "
                     "in X; drop them with adata[np.isfinite(adata.X).all(1)] or re-encode the slide (fp32)"]
    rows = np.flatnonzero(~np.isfinite(adata.X).all(1))
    assert list(adata.obs["slide_id"].iloc[rows]) == ["s2", "s2"] and list(adata.obs["tile"].iloc[rows]) == [0, 3]


def test_exports_of_a_cohort_with_a_file_name_that_is_not_utf8(tiny_copy, tmp_path):
    """HDF5 stores text only: the AnnData export failed with a UnicodeEncodeError traceback on the note about the slide
    encode had refused (its manifest entry), and on the slide id of a features file named in Latin-1."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[1] / "viewer"))
    from test_r6_environment import _latin1_names  # noqa: E402 - the viewer tests' cohort

    from gigaslide.export import export_anndata, export_qupath

    shown = _latin1_names(tiny_copy.out)
    path, adata, problems = export_anndata([tiny_copy.out], tmp_path / "f.h5ad")
    assert any(p.startswith("caf\\xe9: no features/caf\\xe9.h5") for p in problems), problems
    import anndata as ad

    back = ad.read_h5ad(path)
    assert set(back.obs["slide_id"]) == {"s0", "s1", "s2", "s3", "s4", "s5", shown}
    assert np.array_equal(back.X[(back.obs["slide_id"] == shown).to_numpy()],
                          back.X[(back.obs["slide_id"] == "s1").to_numpy()])
    files, _ = export_qupath([tiny_copy.out], tmp_path / "gj")
    assert tmp_path / "gj" / f"{shown}.geojson" in files

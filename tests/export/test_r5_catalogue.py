"""Folders, ids and --out paths the exports met in review round 5 (lenses B and C)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.features import store


def _features(out: Path, sid: str, n_tiles: int, seed: int) -> np.ndarray:
    f = np.random.default_rng(seed).standard_normal((n_tiles, 8)).astype(np.float32)
    coords = np.stack([np.arange(n_tiles) * 64, np.zeros(n_tiles, np.int64)], 1)
    store.save(out / "features" / f"{sid}.h5", f, coords, coords_attrs={"patch_size_level0": 64},
               attrs={"encoder": "toy", "mpp": 1.0, "tile_size": 64, "slide_id": sid})
    return f


def test_a_slide_called_id_at_k_is_not_replaced_by_a_clash_of_id(tmp_path):
    """Folder 0 holds slides ``a`` and ``a@1``, folder 1 a slide ``a``: its clash key ``a@1`` replaced folder 0's own
    ``a@1``, whose tiles were left out of both exports without a note (8 of 12 tiles exported)."""
    import anndata as ad

    from gigaslide.export import export_anndata, export_qupath, list_slides

    d0, d1 = tmp_path / "d0", tmp_path / "d1"
    a0, a_at1, a1 = _features(d0, "a", 3, 0), _features(d0, "a@1", 4, 1), _features(d1, "a", 5, 2)
    entries, _ = list_slides([d0, d1])
    assert {k: (e.slide_id, e.out_dir) for k, e in entries.items()} == {
        "a": ("a", d0), "a@1": ("a@1", d0), "a@1.2": ("a", d1)}
    _, adata, _ = export_anndata([d0, d1], tmp_path / "x.h5ad")
    a = ad.read_h5ad(tmp_path / "x.h5ad")
    assert a.n_obs == 12
    for key, f in (("a", a0), ("a@1", a_at1), ("a@1.2", a1)):
        np.testing.assert_array_equal(a.X[(a.obs["slide_id"] == key).to_numpy()], f)
    files, _ = export_qupath([d0, d1], tmp_path / "gj")
    assert {p.name: len(json.loads(p.read_text())["features"]) for p in files} == {
        "a.geojson": 3, "a@1.geojson": 4, "a@1.2.geojson": 5}


def test_one_folder_given_twice_is_exported_once(tmp_path, monkeypatch):
    """The same OUT_DIR by a relative, an absolute and a symlinked path: every tile was exported three times (as
    slides ``c``, ``c@1``, ``c@2``); it is listed once, with a note naming the repeats."""
    from gigaslide.export import export_anndata, export_qupath

    out = tmp_path / "out"
    f = _features(out, "c", 6, 0)
    (tmp_path / "link").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    given = ["out", str(out), "link", "./out/"]
    _, a, problems = export_anndata(given, tmp_path / "x.h5ad")
    assert a.n_obs == 6 and list(a.obs["slide_id"].cat.categories) == ["c"]
    np.testing.assert_array_equal(a.X, f)
    assert [p for p in problems if "the same folder" in p] == [
        f"{g}: the same folder as out -- listed once" for g in given[1:]]
    files, _ = export_qupath(given, tmp_path / "gj")
    assert [p.name for p in files] == ["c.geojson"]


def test_h5ad_out_that_is_a_folder_is_one_line_before_any_work(tmp_path, capsys):
    """``--out results/`` (an existing folder, or a name ending in /) failed after the whole export with a traceback
    (IsADirectoryError from the rename)."""
    from gigaslide.cli.main import main
    from gigaslide.export import export_anndata

    out = tmp_path / "out"
    _features(out, "c", 4, 0)
    (tmp_path / "results").mkdir()
    assert main(["export", "anndata", str(out), "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'results'}: is a folder") and "Traceback" not in err
    assert f"--out {tmp_path / 'results' / 'features.h5ad'}" in err and len(err.strip().splitlines()) == 1
    assert list((tmp_path / "results").iterdir()) == []
    with pytest.raises(GigaslideError, match="is a folder"):
        export_anndata([out], f"{tmp_path / 'new'}{os.sep}")
    assert not (tmp_path / "new").exists()


def test_nothing_to_export_says_every_slide_was_left_out_and_why(tmp_path):
    """An OUT_DIR whose every slide failed to encode said "no encoded slides -- fix: run gigaslide encode", as if it
    had never been run (the notes saying why each was left out are not printed when the export stops)."""
    from gigaslide.export import export_anndata, export_qupath

    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    (out / "features" / "bad.h5").write_bytes(b"not an hdf5 file")
    (out / "manifest.json").write_text(json.dumps({"slides": {
        "blank": {"status": "failed", "path": str(tmp_path / "blank.tiff"), "error": "no tissue tiles found"}}}))
    for export, target in ((export_anndata, tmp_path / "x.h5ad"), (export_qupath, tmp_path / "gj")):
        with pytest.raises(GigaslideError) as e:
            export([out], target)
        line = e.value.one_line()
        assert "all 2 slide(s) left out, e.g. bad: " in line and "re-run `gigaslide encode` for them" in line
        assert "\n" not in line
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GigaslideError, match=r"no encoded slides to export -- fix: run `gigaslide encode SLIDES"):
        export_anndata([empty], tmp_path / "y.h5ad")


def test_a_geojson_of_a_slide_left_out_now_is_named_as_from_an_earlier_export(tmp_path):
    """A slide exported once, then left out of a re-export (its features damaged): its old GeoJSON stayed among the
    new ones with nothing saying it was not this export's; a note now names it."""
    from gigaslide.export import export_qupath

    out = tmp_path / "out"
    for i, sid in enumerate(("a", "b", "c")):
        _features(out, sid, 4, i)
    gj = tmp_path / "gj"
    export_qupath([out], gj)
    (out / "features" / "b.h5").write_bytes(b"damaged")
    files, problems = export_qupath([out], gj)
    assert [f.name for f in files] == ["a.geojson", "c.geojson"]
    assert [p for p in problems if "earlier export" in p] == [
        f"{gj / 'b.geojson'}: from an earlier export, not rewritten (b was left out now) -- delete it, "
        "or re-run once the slide is fixed"]


def test_a_streaming_run_whose_only_grid_is_a_killed_temporary_says_it_has_no_grids(tmp_path):
    import json

    from gigaslide.export.runs import load_run

    (tmp_path / "heatmaps" / "fold0").mkdir(parents=True)
    (tmp_path / "run.json").write_text(json.dumps({"run_kind": "streaming"}))
    (tmp_path / "heatmaps" / "fold0" / ".tmp-s0.npz.abc123.npz").write_bytes(b"")
    run = load_run(tmp_path)
    assert run.kind == "streaming"
    assert any("without attention grids" in p for p in run.problems)

"""Round 7: the exports as a notebook user calls them (lens N) and with hostile slide ids (lens M)."""

from __future__ import annotations

import os

import torch

from gigaslide.export import TileScorer, build_anndata, export_qupath, load_runs


def test_exports_leave_the_callers_torch_random_stream_as_it_was(tiny, tmp_path):
    """Each fold's model was built (its initial weights drawn from torch's global generator) before its weights were
    loaded: an export between the user's ``torch.manual_seed(0)`` and their own draws changed those draws."""
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    export_qupath([tiny.out], tmp_path / "geo", [tiny.run], tile_probability=False)
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(0)
    build_anndata([str(tiny.out)], [str(tiny.run)])
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(0)
    run = load_runs([tiny.run])[0]
    TileScorer().model(run.path / run.folds[1])
    assert torch.equal(torch.rand(4), want)


def test_a_slide_id_too_long_for_a_file_name_is_left_out_not_the_export(tiny_copy, tmp_path):
    """A features file of a 250-byte id (a peer's file name; its own name still fits): the export stopped with an
    OSError traceback (File name too long, for ``.tmp-<id>.geojson.<random>``) and wrote none of the other slides."""
    out = tiny_copy.out
    long = "L" * 250
    for sub in ("features", "patches"):
        os.rename(out / sub / "s0.h5", out / sub / f"{long}.h5")
    files, problems = export_qupath([out], tmp_path / "geo", [tiny_copy.run], tile_probability=False)
    assert sorted(f.name for f in files) == [f"s{i}.geojson" for i in range(1, 6)]
    said = [p for p in problems if p.startswith(f"{long}: the name {long}.geojson")]
    assert len(said) == 1 and said[0].endswith("-- left out"), problems
    left = sorted(os.listdir(tmp_path / "geo"))
    assert left == ["provenance.json", *[f"s{i}.geojson" for i in range(1, 6)]]  # no temporary file left

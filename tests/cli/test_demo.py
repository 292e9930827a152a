"""The demo re-runs over an earlier demo's output: a mosaic of other settings is rebuilt (with its features), the same
mosaic is kept (it resumes)."""

from __future__ import annotations


from gigaslide.cli.demo import _replace_other_mosaic
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, parse_range
from gigaslide.testing import make_tile_folder


def _tiles(tmp_path):
    return make_tile_folder(tmp_path / "tiles", 3, size=16, classes=("0", "1"), noise=0)


def test_mosaic_of_other_settings_is_rebuilt_same_is_kept(tmp_path):
    mos, feats = tmp_path / "mosaic", tmp_path / "mosaic_features"
    build_mosaic(_tiles(tmp_path), mos, MosaicConfig(slides=4, grid=14, tumor_fraction=parse_range("0.15-0.3"), seed=0),
                 verbose=False)
    feats.mkdir()
    (feats / "old.h5").write_bytes(b"x")
    _replace_other_mosaic(mos, feats, 4)  # the demo's own settings: resumed, nothing removed
    assert (mos / "slides" / "mosaic_0003.tiff").is_file() and (feats / "old.h5").is_file()
    _replace_other_mosaic(mos, feats, 6)  # --mosaic-slides changed: both folders go
    assert not mos.exists() and not feats.exists()


def test_demo_report_names_files_that_exist_and_prints_its_table_header(tmp_path, monkeypatch, capsys):
    """Every output REPORT.md names is there, relative to REPORT.md's folder (they were named relative to spine/); the
    printed table has its header row (it started at the separator); real weights are not called random."""
    import re

    import gigaslide.testing as T
    from gigaslide.cli.demo import demo
    from gigaslide.encoders import build_encoder, export_encoder

    monkeypatch.setattr(T, "shared_data_dir", lambda: None)  # generated slides
    demo(out=str(tmp_path / "demo"), encoder="test_resnet", weights="random", mpp=4.0, tile_size=64, mosaic_slides=0)
    printed = capsys.readouterr().out
    assert "| slide | status | tiles | outputs / reason |\n|---|" in printed
    report = (tmp_path / "demo" / "REPORT.md").read_text()
    named = re.findall(r"[\w./-]+\.(?:h5|png|geojson)", report)
    assert len(named) == 3 * 4, report
    for rel in named:
        assert (tmp_path / "demo" / rel).is_file(), rel
    assert "random network" in report
    enc = build_encoder("test_resnet", "random", seed=3)
    export_encoder(tmp_path / "enc", enc.trunk, enc.spec)
    demo(out=str(tmp_path / "demo2"), encoder=str(tmp_path / "enc"), weights="default", mpp=4.0, tile_size=64,
         mosaic_slides=0)
    assert "random network" not in (tmp_path / "demo2" / "REPORT.md").read_text()


def test_the_report_says_when_giga_ssl_did_not_learn(tmp_path):
    """The demo showed the probe of a run whose loss stayed at ln(24) (view retrieval at chance) as Giga-SSL's result,
    and run.json said learned: true from a 1e-4 cosine-gap tie-break; the report now says it did not learn."""
    import json

    from gigaslide.cli.demo import _gigassl_lines

    gssl, lin = tmp_path / "gssl", tmp_path / "lin"
    gssl.mkdir()
    lin.mkdir()
    hist = [{"retrieval_top1": 1 / 24, "cosine_gap": -1e-4}, {"retrieval_top1": 1 / 24, "cosine_gap": 0.0}]
    rec = {"summary": {"learned": False, "exported_epoch": 2}, "history": hist,
           "untrained_monitor": {"retrieval_top1": 1 / 24, "cosine_gap": -1e-4},
           "raw_monitor": {"retrieval_top1": 1 / 24}}
    (gssl / "run.json").write_text(json.dumps(rec))
    (lin / "evaluation.json").write_text(json.dumps({"metrics": {"auc": {"value": 0.9, "ci_low": 0.75, "ci_high": 1}}}))
    lines = _gigassl_lines(gssl, lin, lambda d, t: f"TABLE {t}", 24, "random")
    text = "\n".join(lines)
    assert "did **not learn**" in text and "top-1 0.042 vs 0.042 untrained, chance 0.042" in text
    assert text.index("not learn") < text.index("TABLE Giga-SSL + linear")  # said before the table it qualifies
    rec["summary"]["learned"] = True
    (gssl / "run.json").write_text(json.dumps(rec))
    assert "not learn" not in "\n".join(_gigassl_lines(gssl, lin, lambda d, t: "TABLE", 24, "random"))

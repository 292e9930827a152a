"""The nuclei commands' options (gigaslide.cli.nuclei): what their help says they take, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from gigaslide.cli.main import main, parse


def test_nuclei_takes_a_slide_mpp_csv_like_every_other_command() -> None:
    assert parse(["nuclei", "s", "--model", "m", "--out", "o", "--slide-mpp", "mpp.csv"])[1]["slide_mpp"] == "mpp.csv"
    assert parse(["nuclei", "s", "--model", "m", "--out", "o", "--slide-mpp", "0.25"])[1]["slide_mpp"] == 0.25



@pytest.mark.parametrize("command", ["nuclei", "nuclei-train", "nuclei-eval"])
def test_an_unknown_precision_is_one_line_before_any_work(command: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``nuclei --precision fp17`` recorded a failure for every slide (and wrote OUT/nuclei/manifest.json); the
    training and scoring commands opened the images and the model first."""
    out = tmp_path / "out"
    args = {"nuclei": ["nuclei", str(tmp_path / "slides"), "--model", str(tmp_path / "run")],
            "nuclei-train": ["nuclei-train", "--images", str(tmp_path / "im"), "--annotations", str(tmp_path / "an")],
            "nuclei-eval": ["nuclei-eval", "--model", str(tmp_path / "run"), "--images", str(tmp_path / "im"),
                            "--annotations", str(tmp_path / "an")]}[command]
    assert main([*args, "--out", str(out), "--precision", "fp17"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--precision 'fp17' is not one of auto, fp32, bf16, fp16" in lines[0] and "fix:" in lines[0]
    assert not out.exists()


def test_nuclei_passes_a_forced_background_to_the_slides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``nuclei`` had no ``--background`` (the StainWarning it prints names it): a mis-detected slide could not be
    forced. It reaches the slide parameters (tissue detection and what outside the slide reads as); default auto."""
    import types

    import gigaslide.nuclei.infer as infer
    import gigaslide.nuclei.slide as nslide
    from gigaslide.testing import make_slide

    slide = make_slide(tmp_path / "s.tiff", (256, 256), mpp=0.25)
    got: list[str] = []

    def fake(paths, model, out, params, **kw):  # noqa: ANN001, ANN003, ANN202
        got.append(params.background)
        return nslide.NucleiResult(done=["s"])

    monkeypatch.setattr(infer, "read_spec", lambda model: (types.SimpleNamespace(mpp=0.25), None))
    monkeypatch.setattr(nslide, "segment_slides", fake)
    for extra, want in (([], "auto"), (["--background", "dark"], "dark"), (["--background", "bright"], "bright")):
        assert main(["nuclei", str(slide), "--model", "m", "--out", str(tmp_path / "o"), *extra]) == 0
        assert got[-1] == want


def test_an_unknown_background_is_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["nuclei", str(tmp_path / "slides"), "--model", str(tmp_path / "run"), "--out", str(out),
                 "--background", "grey"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--background 'grey' is not one of auto, bright, dark" in lines[0] and "fix:" in lines[0]
    assert not out.exists()


def test_nuclei_passes_every_slide_option_to_the_segmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option given on the command line reaches :func:`segment_slides` unchanged (none falls back to its
    default), and an ``--mpp`` other than the model's is refused before any slide is read."""
    import types

    import gigaslide.nuclei.infer as infer
    import gigaslide.nuclei.slide as nslide
    from gigaslide.testing import make_slide

    slide = make_slide(tmp_path / "s.tiff", (256, 256), mpp=0.25)
    got: list[tuple] = []

    def fake(paths, model, out, params, **kw):  # noqa: ANN001, ANN003, ANN202
        got.append((params, kw))
        return nslide.NucleiResult(done=["s"])

    monkeypatch.setattr(infer, "read_spec", lambda model: (types.SimpleNamespace(mpp=0.25), None))
    monkeypatch.setattr(nslide, "segment_slides", fake)
    assert main(["nuclei", str(slide), "--model", "m", "--out", str(tmp_path / "o"), "--region", "300",
                 "--margin", "40", "--tissue-only", "false", "--tile-mpp", "1.0", "--tile-size", "128",
                 "--precision", "fp32", "--slide-mpp", "0.26", "--device", "cpu", "--mpp", "0.25"]) == 0
    params, kw = got[-1]
    got_params = (params.region, params.margin, params.tissue_only, params.tile_mpp, params.tile_size, params.precision)
    assert got_params == (300, 40, False, 1.0, 128, "fp32")
    assert kw["slide_mpp"] == 0.26 and kw["device"] == "cpu"
    assert main(["nuclei", str(slide), "--model", "m", "--out", str(tmp_path / "o"), "--mpp", "0.5"]) == 2
    assert len(got) == 1

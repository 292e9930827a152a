"""The spine's commands, and every bad input of the spine issue: one clear line, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest

from gigaslide.cli.main import main
from gigaslide.testing import make_slide

ENC = ["--encoder", "test_resnet", "--weights", "random", "--mpp", "1.0", "--tile-size", "64", "--workers", "0"]


def _one_line_error(capsys, *must: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for m in must:
        assert m in lines[0], lines[0]
    assert "fix:" in lines[0]
    return lines[0]


def test_help_has_example_for_every_command(capsys):
    from gigaslide.cli.main import _collect

    def walk(cmds, prefix):  # noqa: ANN001, ANN202
        for name, c in cmds.items():
            if isinstance(c, dict):
                yield from walk(c, [*prefix, name])
            else:
                yield [*prefix, name]

    for path in walk(_collect(), []):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "Example" in out and "gigaslide " + " ".join(path) in out, path


@pytest.mark.realdata
def test_info_and_encoders(capsys, real_slides):
    assert main(["info", str(real_slides / "cmu-1-small-region.svs")]) == 0
    out = capsys.readouterr().out
    assert "0.4990" in out and "aperio" in out and "label" in out
    assert main(["encoders"]) == 0
    assert "vit_small_dinov2" in capsys.readouterr().out


def test_encoders_says_which_hub_weights_are_in_the_local_cache(tmp_path, monkeypatch, capsys):
    snap = tmp_path / "models--paige-ai--Virchow2" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"")  # only its presence is checked here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("GIGASLIDE_WEIGHTS", raising=False)
    assert main(["encoders"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["name"][8] == "cached"  # name arch dim input mean / std mpp cached weights
    assert rows["virchow2"][8] == "yes" and rows["virchow"][8] == "no" and rows["uni2_h"][8] == "no"
    assert rows["test_resnet"][8] == "-"  # no hub weights at all


def test_output_into_a_closed_pipe_stops_quietly(monkeypatch, capsys):
    """`gigaslide encoders | head -1`: the reader closes the pipe; no traceback, the shell's 128 + SIGPIPE status."""
    import builtins

    real = builtins.print

    def closed(*args, **kw):
        if kw.get("file") is None:
            raise BrokenPipeError(32, "Broken pipe")
        return real(*args, **kw)

    monkeypatch.setattr(builtins, "print", closed)
    assert main(["encoders"]) == 141
    assert capsys.readouterr().err == ""


def test_encode_end_to_end_with_dashes_and_config(tmp_path, synthetic_slide, capsys):
    assert main(["encode", str(synthetic_slide), "--out", str(tmp_path / "o"), *ENC]) == 0
    assert (tmp_path / "o" / "features" / "synth.h5").is_file()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("encoder: test_resnet\nweights: random\nmpp: 1.0\ntile_size: 64\nworkers: 0\n")
    assert main(["encode", str(synthetic_slide), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 finished" in out
    # nothing encoded this time: no precision is named (it said fp32 of a run whose files are bf16 / auto)
    assert "(0 tiles;" in out and "fp32" not in out


def test_config_keys_may_be_spelled_with_dashes_as_help_shows_them(tmp_path):
    from gigaslide.cli.main import parse
    from gigaslide.errors import GigaslideError

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tile-size: 96\nmin-tissue: 0.5\nmpp: 1.0\n")
    _, kwargs = parse(["tile", "a.svs", "--out", "o", "--config", str(cfg)])
    assert (kwargs["tile_size"], kwargs["min_tissue"], kwargs["mpp"]) == (96, 0.5, 1.0)
    _, kwargs = parse(["tile", "a.svs", "--out", "o", "--config={tile-size: 80}"])
    assert kwargs["tile_size"] == 80
    cfg.write_text("tile-size: 96\ntile_size: 64\n")
    with pytest.raises(GigaslideError, match="twice"):
        parse(["tile", "a.svs", "--out", "o", "--config", str(cfg)])


@pytest.mark.parametrize("case", ["unopenable", "unreadable", "missing", "empty_dir", "no_mpp", "mpp_too_fine",
                                  "tile_too_big", "blank", "truncated", "unwritable"])
@pytest.mark.realdata
def test_bad_input(case, tmp_path, real_slides, capsys):
    out = tmp_path / "out"
    args = ENC
    if case == "unopenable":
        src, must = real_slides / "corrupt" / "unopenable.tiff", ["unopenable.tiff"]
    elif case == "unreadable":
        src, must = real_slides / "corrupt" / "unreadable.svs", ["unreadable.svs", "damaged"]
    elif case == "missing":
        src, must = tmp_path / "nope.svs", ["nope.svs", "not found"]
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        src, must = tmp_path / "empty", ["no slide files"]
    elif case == "no_mpp":
        src, must = real_slides / "tcga-cr-7395-01a-01-ts1.svs", ["tcga-cr-7395-01a-01-ts1.svs", "--slide-mpp"]
    elif case == "mpp_too_fine":
        src, must = real_slides / "cmu-1-small-region.svs", ["cmu-1-small-region.svs", "finer than the scan"]
        args = [*ENC, "--mpp", "0.25"]
    elif case == "tile_too_big":
        src, must = real_slides / "cmu-1-small-region.svs", ["cmu-1-small-region.svs", "more than the slide"]
        args = [*ENC, "--tile-size", "5000"]
    elif case == "blank":
        src, must = make_slide(tmp_path / "blank.tiff", (800, 800), blank=True), ["blank.tiff", "no tissue"]
    elif case == "truncated":
        data = (real_slides / "cmu-1-small-region.svs").read_bytes()
        src = tmp_path / "trunc.svs"
        src.write_bytes(data[: len(data) // 2])
        must = ["trunc.svs"]
    else:  # unwritable: the output path sits under a regular file
        (tmp_path / "file").write_text("x")
        src, must, out = real_slides / "cmu-1-small-region.svs", ["cannot create output directory"], tmp_path / "file" / "o"
    code = main(["encode", str(src), "--out", str(out), *args])
    assert code == 2
    _one_line_error(capsys, *must)
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.h5"))  # nothing (half-)written anywhere


@pytest.mark.parametrize("case,expect", [("no_mpp", "--slide-mpp"), ("mpp_too_fine", "finer than the scan"),
                                         ("tile_too_big", "more than the slide"), ("blank", "no tissue")])
@pytest.mark.realdata
def test_per_slide_errors_name_slide_and_fix(case, expect, tmp_path, real_slides, capsys):
    """In a batch the per-slide reason goes to stderr (and the manifest); it names the slide and the fix."""
    tile_args = ["--mpp", "1.0", "--tile-size", "64"]
    if case == "no_mpp":
        src = real_slides / "tcga-cr-7395-01a-01-ts1.svs"
    elif case == "mpp_too_fine":
        src, tile_args = real_slides / "cmu-1-small-region.svs", ["--mpp", "0.25"]
    elif case == "tile_too_big":
        src, tile_args = real_slides / "cmu-1-small-region.svs", ["--tile-size", "5000"]
    else:
        src = make_slide(tmp_path / "blank.tiff", (800, 800), blank=True)
    assert main(["tile", str(src), "--out", str(tmp_path / "o"), *tile_args]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("failed:"))
    assert src.name in line and expect in line and "fix:" in line


@pytest.mark.realdata
def test_no_mpp_slide_works_with_override(tmp_path, real_slides, capsys):
    src = tmp_path / "tcga.svs"
    shutil.copy(real_slides / "tcga-cr-7395-01a-01-ts1.svs", src)
    assert main(["tile", str(src), "--out", str(tmp_path / "o"), "--slide-mpp", "0.25", "--mpp", "1.0"]) == 0
    assert (tmp_path / "o" / "patches" / "tcga.h5").is_file()


def test_tissue_annotation_options_are_checked_before_any_slide_is_read(tmp_path, synthetic_slide, capsys):
    out = str(tmp_path / "o")
    assert main(["tile", str(synthetic_slide), "--out", out, "--tissue-from", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "--tissue-from is not a folder", "nope")
    assert main(["encode", str(synthetic_slide), "--out", out, *ENC, "--tissue-classes", "Tumor"]) == 2
    _one_line_error(capsys, "needs --tissue-from")
    assert main(["tile", str(synthetic_slide), "--out", out, "--tissue-detect", "true"]) == 2
    _one_line_error(capsys, "--tissue-detect detects tissue inside annotations, which needs --tissue-from")
    (tmp_path / "ann").mkdir()  # a folder without this slide's file: the slide fails, named, with the fix
    assert main(["tile", str(synthetic_slide), "--out", out, "--tissue-from", str(tmp_path / "ann")]) == 2
    line = _one_line_error(capsys, "no tissue annotation for slide")
    assert ".geojson" in line
    assert not (tmp_path / "o" / "patches").exists() or not any((tmp_path / "o" / "patches").iterdir())


def test_tile_fails_the_second_of_two_slides_with_one_id_and_goes_on(tmp_path, capsys):
    from gigaslide.tiling import load_grid

    make_slide(tmp_path / "dup" / "a" / "s1.tiff", (1024, 768), seed=1)
    make_slide(tmp_path / "dup" / "b" / "s1.tiff", (768, 768), seed=2)  # another slide, the same file name
    make_slide(tmp_path / "dup" / "c" / "s2.tiff", (768, 768), seed=3)
    out = tmp_path / "o"
    argv = ["tile", str(tmp_path / "dup"), "--out", str(out), "--mpp", "1.0", "--tile-size", "64", "--workers", "1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    failed = [ln for ln in captured.err.splitlines() if ln.startswith("failed:")]
    a, b = tmp_path / "dup" / "a" / "s1.tiff", tmp_path / "dup" / "b" / "s1.tiff"
    assert failed == [f"failed: {b}: slide id 's1' also used by {a} -- fix: rename one of the slides; "
                      "ids come from file names"]
    assert f"tiled 2/3 slides -> {out}" in captured.out
    assert "1 of 3 slides failed" in captured.err
    assert load_grid(out / "patches" / "s1.h5").slide_dimensions == (1024, 768)  # the first slide's, untouched
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["s1.h5", "s2.h5"]
    slides = json.loads((out / "tile_manifest.json").read_text())["slides"]
    assert slides["s1"] == {**slides["s1"], "status": "done", "path": str(a)} and slides["s2"]["status"] == "done"
    # the failure the error line points to is in the manifest too (it was overwritten by the first slide's 'done')
    assert slides[str(b)] == {**slides[str(b)], "status": "failed", "path": str(b)}


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_slide_mpp_that_is_not_positive_gets_a_working_example(value, synthetic_slide, tmp_path, capsys):
    assert main(["tile", str(synthetic_slide), "--out", str(tmp_path / "o"), "--slide-mpp", value]) == 2
    line = _one_line_error(capsys, "--slide-mpp", "must be positive")
    assert line.endswith("fix: use e.g. --slide-mpp 0.25")


def test_info_names_no_vendor_the_reader_does_not_know(synthetic_slide, monkeypatch, capsys):
    import tiffslide

    import gigaslide.slides.slide as slide_mod

    assert main(["info", str(synthetic_slide)]) == 0  # OpenSlide names the format
    assert "reader      openslide (generic-tiff)" in capsys.readouterr().out.splitlines()
    monkeypatch.setattr(slide_mod, "open_backend", lambda p: (tiffslide.TiffSlide(str(p)), "tiffslide"))
    assert main(["info", str(synthetic_slide)]) == 0  # tiffslide has no vendor for a generic TIFF
    out = capsys.readouterr().out
    assert "reader      tiffslide" in out.splitlines() and "None" not in out


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_thread_count_is_one_line(value, monkeypatch, capsys):
    monkeypatch.setenv("GIGASLIDE_THREADS", value)
    assert main(["encoders"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GIGASLIDE_THREADS" in err and "positive integer" in err


def test_a_list_option_given_twice_keeps_every_value():
    from gigaslide.cli.main import parse

    _, kwargs = parse(["view", "o1", "--runs", "A", "--runs", "B", "--runs=C"])
    assert kwargs["runs"] == ["A", "B", "C"]
    _, kwargs = parse(["encode", "a.svs", "--out", "x", "--mpp", "1", "--mpp", "2"])  # a scalar: the last one wins
    assert kwargs["mpp"] == 2.0


@pytest.mark.parametrize("argv,named", [(["encode"], "SLIDES, --out"), (["encode", "a.svs"], "required: --out"),
                                        (["info"], "required: SLIDE"),
                                        (["evaluate", "tiles"], "--train, --test, --out")])
def test_missing_arguments_are_named_as_help_shows_them(argv, named, capsys):
    """jsonargparse names them by its keys (encode.slides, encode.out; evaluate.tiles.train), which no user types."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "encode.out" not in err and "tiles.train" not in err


def test_a_negative_tile_worker_count_is_refused(capsys):
    """--tile-workers -2 was taken (and ran as one process) instead of named."""
    assert main(["encode", "a.svs", "--out", "o", "--tile-workers", "-2"]) == 2
    assert "--tile-workers -2 must not be negative" in capsys.readouterr().err


def _vertices(out) -> int:  # noqa: ANN001
    g = json.loads((out / "tissue" / "synth.geojson").read_text())
    return sum(len(r) for f in g["features"] for r in f["geometry"]["coordinates"])


def test_outline_tolerance_option_of_tile_and_encode(tmp_path, synthetic_slide, capsys):
    """--outline-tolerance reaches the tissue GeoJSON of `tile` and `encode` (0, the default: the exact outline);
    a negative one is one line naming the option, before any slide is opened (nothing written)."""
    tile = ["tile", str(synthetic_slide), "--mpp", "1.0", "--tile-size", "128", "--workers", "1"]
    assert main([*tile, "--out", str(tmp_path / "exact")]) == 0
    assert main([*tile, "--out", str(tmp_path / "coarse"), "--outline-tolerance", "64"]) == 0
    assert main(["encode", str(synthetic_slide), "--out", str(tmp_path / "enc"), *ENC,
                 "--outline-tolerance", "64"]) == 0
    exact = _vertices(tmp_path / "exact")
    assert _vertices(tmp_path / "coarse") < exact / 2
    assert _vertices(tmp_path / "enc") < exact / 2
    capsys.readouterr()
    for cmd in (tile, ["encode", str(synthetic_slide), *ENC]):
        out = tmp_path / f"neg_{cmd[0]}"
        assert main([*cmd, "--out", str(out), "--outline-tolerance", "-1"]) != 0
        _one_line_error(capsys, "--outline-tolerance", "at least 0")
        assert not (out / "tissue").exists()


def test_encode_takes_the_encoders_own_field_of_view_by_default(tmp_path, synthetic_slide, capsys):
    """An SSL export trained on 32 px tiles at 1 µm/px, encoded as the README shows it (no --mpp / --tile-size): the
    tiles were 224 px at 0.5 µm/px resized to 32 -- 3.5x the field of view the encoder learned. They are the
    encoder's own now, and the command says so; options given still win."""
    import dataclasses

    import h5py

    from gigaslide.encoders import build_encoder, export_encoder

    enc = build_encoder("test_resnet", "random")
    export_encoder(tmp_path / "enc", enc.trunk, dataclasses.replace(enc.spec, name="mine", input_size=32,
                                                                    native_mpp=1.0))
    base = ["encode", str(synthetic_slide), "--encoder", str(tmp_path / "enc"), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "tiles of 32 px at 1.0 µm/px (the encoder's own" in capsys.readouterr().err
    with h5py.File(tmp_path / "a" / "features" / f"{synthetic_slide.stem}.h5") as f:
        assert f.attrs["tile_size"] == 32 and f.attrs["mpp"] == 1.0
    assert main([*base, "--out", str(tmp_path / "b"), "--tile-size", "48"]) == 0
    assert "tiles of 48 px at 1.0 µm/px" in capsys.readouterr().err
    with h5py.File(tmp_path / "b" / "features" / f"{synthetic_slide.stem}.h5") as f:
        assert f.attrs["tile_size"] == 48 and f.attrs["mpp"] == 1.0

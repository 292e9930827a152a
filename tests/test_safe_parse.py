"""Untrusted inputs: XML bombs / XXE, YAML object tags and alias bombs, slide ids that are paths."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from gigaslide.cli.main import main
from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import check_slide_id, is_safe_slide_id, load_yaml, parse_xml

LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Annotations><Annotation Name="&lol9;"/></Annotations>
"""


def _xxe(target) -> str:  # noqa: ANN001
    return f"""<?xml version="1.0"?>
<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file://{target}"> ]>
<Annotations><Annotation Name="&xxe;"/></Annotations>
"""


ASAP = """<?xml version="1.0"?>
<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions><Region Id="1"><Vertices>
<Vertex X="10" Y="20"/><Vertex X="30.5" Y="20"/><Vertex X="30" Y="40"/></Vertices></Region></Regions></Annotation></Annotations>
"""


def test_parse_xml_reads_plain_annotations(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(ASAP)
    root = parse_xml(p).getroot()
    xy = [(float(v.get("X")), float(v.get("Y"))) for v in root.iter("Vertex")]
    assert xy == [(10, 20), (30.5, 20), (30, 40)] and root.get("MicronsPerPixel") == "0.25"


@pytest.mark.parametrize("kind", ["laughs", "xxe", "truncated"])
def test_parse_xml_refuses_bombs_and_external_entities(kind, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    p = tmp_path / "evil.xml"
    p.write_text({"laughs": LAUGHS, "xxe": _xxe(secret), "truncated": ASAP[:90]}[kind])
    t = time.perf_counter()
    with pytest.raises(GigaslideError) as e:
        parse_xml(p)
    assert time.perf_counter() - t < 2  # refused, not expanded
    msg = e.value.one_line()
    assert "evil.xml" in msg and "fix:" in msg and "TOP-SECRET" not in msg
    assert ("entities" in msg) if kind != "truncated" else ("not well-formed" in msg)


def test_load_yaml_refuses_object_tags_and_alias_bombs(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("mpp: 0.5\ntile_size: 224\nlist: &a [1, 2]\nagain: *a\n")
    assert load_yaml(ok) == {"mpp": 0.5, "tile_size": 224, "list": [1, 2], "again": [1, 2]}
    tag = tmp_path / "tag.yaml"
    flag = tmp_path / "PWNED"
    tag.write_text(f'mpp: !!python/object/apply:os.system ["touch {flag}"]\n')
    with pytest.raises(GigaslideError, match="tag.yaml.*no !!python tags"):
        load_yaml(tag)
    assert not flag.exists()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_yaml_bomb())
    with pytest.raises(GigaslideError, match="aliases expand"):
        load_yaml(bomb)


def _yaml_bomb() -> str:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join([*lines, "mpp: 0.5", "slide_mpp: *a8"]) + "\n"  # 9^9 nodes once expanded


@pytest.mark.parametrize("kind", ["tag", "bomb"])
def test_cli_config_is_loaded_safely(kind, tmp_path, capsys):
    """--config goes through the safe check: no code runs, an alias bomb is refused at once (jsonargparse alone hangs)."""
    flag = tmp_path / "PWNED"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(_yaml_bomb() if kind == "bomb" else f'mpp: !!python/object/apply:os.system ["touch {flag}"]\n')
    t = time.perf_counter()
    assert main(["tile", str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert time.perf_counter() - t < 10
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "run.yaml" in err and "Traceback" not in err
    assert not flag.exists() and not (tmp_path / "o").exists()


def _pipe_with(text: str) -> str:
    """A pipe holding ``text`` (as ``--config <(...)`` passes one: /dev/fd/N), its write end closed."""
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    return f"/dev/fd/{r}"


def test_cli_config_from_a_pipe_is_checked_once_and_still_read(tmp_path, capsys):
    """``--config <(...)`` is a pipe: it bypassed the file check (an alias bomb hung), and a pipe read to check it
    would be empty for jsonargparse: read once, checked, handed on as text (dashed keys too)."""
    t = time.perf_counter()
    argv = ["tile", str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), "--config", _pipe_with(_yaml_bomb())]
    assert main(argv) == 2
    assert time.perf_counter() - t < 10
    err = capsys.readouterr().err
    assert "aliases expand" in err and len(err.strip().splitlines()) == 1
    from gigaslide.cli.main import parse

    cmd, kw = parse(["train-mil", "--config", _pipe_with("features: f\nlabels: l.csv\nout: o\nmax-tiles: 7\n")])
    assert (cmd.func.__name__, kw["features"], kw["labels"], kw["max_tiles"]) == ("train_mil", "f", "l.csv", 7)


def test_config_files_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    import gigaslide.safe_parse as sp

    monkeypatch.setattr(sp, "MAX_CONFIG_BYTES", 64)
    big = tmp_path / "big.yaml"
    big.write_text("mpp: 0.5\n" * 10)  # 90 bytes
    with pytest.raises(GigaslideError, match="big.yaml: YAML refused: larger than"):
        sp.check_config_arg(str(big))
    big.write_text("mpp: 0.5\n" * 7)  # 63 bytes: read
    assert sp.check_config_arg(str(big)) == ({"mpp": 0.5}, big)


@pytest.mark.parametrize("sid", ["../../etc/x", "/abs/path", "a/b", "a\\b", "..", ".", "", "x\x00y", "tab\tid", " pad",
                                 ".tmp-x",
                                 "x" * 201])
def test_unsafe_slide_ids_are_refused(sid):
    assert not is_safe_slide_id(sid)
    with pytest.raises(GigaslideError, match="unsafe slide_id"):
        check_slide_id(sid)


@pytest.mark.parametrize("sid", ["TCGA-AA-1234-01Z", "slide_1.v2", "a..b", "üñí (1)", "x" * 200])
def test_safe_slide_ids_pass(sid):
    assert check_slide_id(sid) == sid


def test_labels_csv_with_path_ids_is_refused(tmp_path):
    from gigaslide.evaluation.splits import read_labels

    p = tmp_path / "labels.csv"
    p.write_text("slide_id,label\nok_1,0\n../../etc/x,1\nok_2,1\n")
    with pytest.raises(GigaslideError) as e:
        read_labels(p)
    assert "labels.csv" in e.value.one_line() and "../../etc/x" in e.value.one_line()
    p.write_text("slide_id,label\nok_1,0\nok_2,1\n")
    assert read_labels(p).slide_ids == ["ok_1", "ok_2"]


def test_ids_from_metadata_never_become_paths(tmp_path, synthetic_slide):
    from pathlib import Path

    from gigaslide.features import store
    from gigaslide.slides import open_slide, slide_id_from_path

    f = store.save(tmp_path / "real_name.h5", np.zeros((2, 4), np.float32), attrs={"slide_id": "../../escape"})
    assert store.load(f).slide_id == "real_name"  # another tool's unsafe attr: the file's own name is used
    with pytest.raises(GigaslideError, match="unsafe slide_id"):
        open_slide(synthetic_slide, slide_id="../x")
    assert slide_id_from_path(Path("d/..svs")) == "..svs" and slide_id_from_path(Path("d/a.svs")) == "a"


def test_slide_id_length_is_counted_in_file_name_bytes(tmp_path):
    """Ids become file names, limited to 255 *bytes*: 150 'é' are 300 bytes, which no file system takes (it passed as
    150 characters, and the write failed later with "File name too long")."""
    for ok in ("x" * 200, "é" * 100, "ü" * 99 + "x"):
        assert check_slide_id(ok) == ok
        (tmp_path / (ok + ".features.h5")).write_bytes(b"")  # the longest accepted ids are usable file names
    for bad in ("é" * 150, "é" * 100 + "x", "\ud800"):
        assert not is_safe_slide_id(bad)
        with pytest.raises(GigaslideError, match="longer than 200 bytes"):
            check_slide_id(bad)
    with pytest.raises(OSError, match="too long"):
        (tmp_path / ("é" * 150 + ".h5")).write_bytes(b"")


@pytest.mark.parametrize("text", ["[" * 5000, "{a: " * 5000, "".join("  " * i + f"k{i}:\n" for i in range(3000))])
def test_deeply_nested_yaml_is_a_one_line_error_not_a_recursion_error(tmp_path, text):
    from gigaslide.safe_parse import check_config_arg, load_yaml_text

    with pytest.raises(GigaslideError, match="nested too deeply"):
        load_yaml_text(text, where="cfg.yaml")
    f = tmp_path / "deep.yaml"
    f.write_text(text)
    with pytest.raises(GigaslideError, match="deep.yaml.*nested too deeply"):
        check_config_arg(str(f))
    assert load_yaml_text("[" * 20 + "]" * 20) == [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]  # ordinary nesting is fine


def test_a_non_ascii_id_under_an_ascii_locale_names_the_locale_not_the_id(tmp_path):
    """Under an ASCII file-system encoding (LC_ALL=C without UTF-8 coercion) 'José' was called unsafe with the fix
    'rename it to letters, digits ...'; the cause is the locale."""
    import subprocess
    import sys

    code = ("from gigaslide.safe_parse import check_slide_id\nfrom gigaslide.errors import GigaslideError\n"
            "import sys\nprint(sys.getfilesystemencoding())\n"
            "try:\n    check_slide_id('Jos\\u00e9_01')\nexcept GigaslideError as e:\n    print(ascii(e.one_line()))\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    enc, line = p.stdout.splitlines()[:2]
    if enc == "utf-8":
        pytest.skip("this Python uses UTF-8 file names under the C locale")
    assert "cannot be a file name under this locale" in line and "PYTHONUTF8=1" in line and "unsafe" not in line

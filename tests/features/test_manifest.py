"""The run manifest: O(1) journal appends, throttled rewrites, nothing lost when a job dies before its flush."""

from __future__ import annotations

import json

import pytest

from gigaslide.export.catalog import scan_out_dir
from gigaslide.features import manifest as mf
from gigaslide.features.manifest import Manifest, journal_path, read_slides


def _on_disk(path):
    return json.loads(path.read_text())["slides"]


@pytest.fixture
def never_due(monkeypatch):
    """Rewrites only when flushed: what a job looks like between two throttled rewrites."""
    monkeypatch.setattr(mf, "REWRITE_SHARE", 0.0)


def test_entries_of_a_job_killed_before_its_flush_are_read_back_from_the_journal(tmp_path, never_due):
    path = tmp_path / "manifest.json"
    m = Manifest(path, {"command": "encode"})
    m.set("a", "done", tiles=3)
    m.set("b", "failed", error="b.svs: cannot open")
    m.set("a", "done", tiles=4)  # a later line wins
    # no flush: the process dies here
    assert not path.exists()
    assert read_slides(path)["a"]["tiles"] == 4 and read_slides(path)["b"]["status"] == "failed"
    again = Manifest(path, {"command": "encode"})  # the resumed job starts from every recorded slide
    assert set(again.data["slides"]) == {"a", "b"}
    again.flush()  # nothing pending in the new process: the killed one's lines stay in the journal, still read
    assert read_slides(path)["a"]["tiles"] == 4
    again.set("c", "done", tiles=1)
    again.flush()
    assert not journal_path(path).exists()
    on_disk = _on_disk(path)
    assert set(on_disk) == {"a", "b", "c"} and on_disk["a"]["tiles"] == 4


def test_the_viewer_catalog_sees_a_killed_jobs_journal(tmp_path, never_due):
    m = Manifest(tmp_path / "manifest.json", {"command": "encode"})
    m.set("broken", "failed", path=str(tmp_path / "broken.svs"), error="broken.svs: not a slide")
    entries, _ = scan_out_dir(tmp_path)
    assert [(e.slide_id, e.encode_status, e.error) for e in entries] == [("broken", "failed", "broken.svs: not a slide")]


def test_a_torn_last_journal_line_is_skipped(tmp_path, never_due):
    path = tmp_path / "manifest.json"
    m = Manifest(path, {})
    m.set("a", "done")
    with open(journal_path(path), "a") as fh:
        fh.write('{"id": "b", "entry": {"stat')  # a crash in the middle of a write
    assert set(read_slides(path)) == {"a"}


def test_keep_done_is_decided_against_every_process_entries_in_journal_order(tmp_path, never_due):
    path = tmp_path / "manifest.json"
    first, second = Manifest(path, {"rank": 0}), Manifest(path, {"rank": 1})
    first.set("a", "done", tiles=7, rank=0)
    second.set("a", "done", keep_done=True, note="encoded by another process", rank=1)  # second's own view lacks first's entry
    second.set("b", "failed", rank=1)
    second.set("b", "done", keep_done=True, note="already encoded (skipped)", rank=1)  # a failed entry is replaced
    second.flush()
    first.flush()
    on_disk = _on_disk(path)
    assert on_disk["a"]["tiles"] == 7 and on_disk["a"]["rank"] == 0
    assert on_disk["b"]["status"] == "done" and on_disk["b"]["note"] == "already encoded (skipped)"


def test_rewrites_are_throttled_but_the_flush_leaves_every_entry(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    m = Manifest(path, {})
    writes = []
    real = mf.atomic.write_json
    monkeypatch.setattr(mf.atomic, "write_json", lambda p, d: (writes.append(len(d["slides"])), real(p, d)))
    n = 400
    for i in range(n):
        m.set(f"s{i}", "done")
    assert writes[0] == 1  # the first update is written at once (nothing measured yet)
    assert len(writes) < n // 10  # not one rewrite per update: that made a batch quadratic in its size
    m.flush()
    assert writes[-1] == n and len(_on_disk(path)) == n and not journal_path(path).exists()


def test_a_manifest_rebuilt_from_a_damaged_file_keeps_the_journal(tmp_path, never_due):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    m = Manifest(path, {})
    m.set("a", "done")
    m.flush()
    assert set(_on_disk(path)) == {"a"}


def test_the_catalog_names_a_damaged_manifest_once_and_still_lists_the_journal(tmp_path, never_due):
    path = tmp_path / "manifest.json"
    Manifest(path, {}).set("a", "done", tiles=2)  # killed before its flush: the entry is in the journal only
    path.write_text("{not json")
    entries, problems = scan_out_dir(tmp_path)
    assert [(e.slide_id, e.encode_status) for e in entries] == [("a", "done")]
    assert problems == [f"{path}: unreadable manifest (ignored)"]

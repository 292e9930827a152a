"""The run layer: identity refusal, pickle-free checkpoints, bit-exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide import runs
from gigaslide.errors import GigaslideError

TRAIN = textwrap.dedent('''
    import sys, time, torch, numpy as np
    from gigaslide import runs
    out, steps, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    run = runs.open_run(out, "toy", {"lr": 0.01, "steps": steps}, seed=0)
    torch.manual_seed(0); np.random.seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    step, rng = 0, np.random.default_rng(0)
    ck = run.load()
    if ck:
        runs.load_module_state(model, ck["model"], out); opt.load_state_dict(ck["optimizer"])
        runs.set_rng_state(ck["rng"]); rng.bit_generator.state = ck["gen"]; step = ck["step"]
    while step < steps:
        x = torch.randn(4, 8) + float(rng.normal())
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        run.save({"model": runs.module_state(model), "optimizer": opt.state_dict(), "rng": runs.rng_state(),
                  "gen": rng.bit_generator.state, "step": step})
        time.sleep(slow)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/final.safetensors")
    run.finish(steps=step)
''')


def _train(tmp: Path, out: Path, steps: int, slow: float = 0.0) -> subprocess.Popen:
    script = tmp / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(steps), str(slow)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _final(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final.safetensors"))


@pytest.mark.slow
def test_kill_9_in_the_middle_then_resume_is_bit_exact(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    p = _train(tmp_path, ref, 12)
    assert p.wait(120) == 0, p.stderr.read().decode()
    killed = tmp_path / "killed"
    p = _train(tmp_path, killed, 12, slow=0.15)
    rec = killed / "checkpoint" / "last.json"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few steps are checkpointed, then kill -9
        if rec.is_file() and json.loads(rec.read_text())["payload"]["step"] >= 4:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    step_at_kill = json.loads(rec.read_text())["payload"]["step"]
    assert 4 <= step_at_kill < 12 and not (killed / "final.safetensors").exists()
    p = _train(tmp_path, killed, 12)
    assert p.wait(120) == 0, p.stderr.read().decode()
    a, b = _final(ref), _final(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = runs.read_run(killed)
    assert record["status"] == "finished" and len(record["invocations"]) == 2
    # an interrupted run did not reach the same weights: the comparison above can fail
    c = _train(tmp_path, tmp_path / "short", 11)
    assert c.wait(120) == 0
    assert not all(torch.equal(a[k], _final(tmp_path / "short")[k]) for k in a)


def test_changed_identity_or_input_content_is_refused_naming_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("1")
    runs.open_run(tmp_path / "run", "toy", {"lr": 0.1, "mpp": 0.5}, inputs={"data": data})
    runs.save_checkpoint(tmp_path / "run", {"step": 1})  # it trained: another run there would mix with it
    runs.open_run(tmp_path / "run", "toy", {"lr": 0.1, "mpp": 0.5}, inputs={"data": data})  # same: resumes
    with pytest.raises(GigaslideError, match=r"another run \(mpp: 0.5 -> 1.0\)") as e:
        runs.open_run(tmp_path / "run", "toy", {"lr": 0.1, "mpp": 1.0}, inputs={"data": data})
    assert "\n" not in str(e.value) and "--out" in str(e.value)
    (data / "b.txt").write_text("22")
    with pytest.raises(GigaslideError, match=r"input:data"):
        runs.open_run(tmp_path / "run", "toy", {"lr": 0.1, "mpp": 0.5}, inputs={"data": data})
    runs.open_run(tmp_path / "run2", "toy", {}, inputs={"data": data})
    runs.save_checkpoint(tmp_path / "run2", {"step": 1})
    (data / "b.txt").write_text("33")  # same name, same size, other bytes
    with pytest.raises(GigaslideError, match=r"another run \(input:data.listing_sha256: "):
        runs.open_run(tmp_path / "run2", "toy", {}, inputs={"data": data})
    moved = tmp_path / "moved"
    data.rename(moved)
    (moved / "b.txt").unlink()
    runs.open_run(tmp_path / "run", "toy", {"lr": 0.1, "mpp": 0.5}, inputs={"data": moved})  # same content elsewhere
    with pytest.raises(GigaslideError, match="another kind"):
        runs.open_run(tmp_path / "run", "other", {"lr": 0.1, "mpp": 0.5}, inputs={"data": moved})


def test_weights_file_hash_joins_the_identity(tmp_path: Path) -> None:
    w = tmp_path / "w.bin"
    w.write_bytes(b"\x00" * 10)
    runs.open_run(tmp_path / "run", "toy", {}, inputs={"weights": w})
    runs.save_checkpoint(tmp_path / "run", {"step": 1})
    w.write_bytes(b"\x01" * 10)  # same size, other bytes
    with pytest.raises(GigaslideError, match="input:weights"):
        runs.open_run(tmp_path / "run", "toy", {}, inputs={"weights": w})


def test_run_json_records_environment_config_and_fingerprints(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    run = runs.open_run(tmp_path / "run", "toy", {"k": 1}, {"k": 1, "extra": "x"}, seed=7, inputs={"data": f},
                        provenance={"mpp": 0.5, "tile_size": 224, "encoder": "resnet18"})
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["seed"] == 7 and rec["config"] == {"k": 1, "extra": "x"}
    assert rec["inputs"]["data"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rec["provenance"]["mpp"] == 0.5 and rec["provenance"]["encoder"] == "resnet18"
    env = rec["invocations"][0]["environment"]
    assert env["torch"] == torch.__version__ and env["gigaslide"]
    run.finish(auc=0.9)
    assert runs.read_run(tmp_path / "run")["summary"] == {"auc": 0.9}


@pytest.mark.skipif(__import__("shutil").which("git") is None, reason="needs git")
def test_git_commit_is_not_taken_from_another_projects_repository(tmp_path: Path) -> None:
    """gigaslide installed into a project's ``.venv`` (inside that project's git repository, ignored by it) recorded
    the project's HEAD as gigaslide's ``git_commit`` in every run.json."""
    import shutil

    import gigaslide

    proj = tmp_path / "project"
    site = proj / ".venv" / "site"
    site.mkdir(parents=True)
    (proj / ".gitignore").write_text(".venv/\n")
    git = ["git", "-C", str(proj), "-c", "user.email=a@b.c", "-c", "user.name=u"]
    for cmd in (["init", "-q"], ["add", ".gitignore"], ["commit", "-qm", "init"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    project_head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                                  text=True).stdout.strip()
    shutil.copytree(Path(gigaslide.__file__).parent, site / "gigaslide")
    out = subprocess.run([sys.executable, "-c", "import gigaslide.runs as r; print(r.__file__); "
                          "print(r.environment()['git_commit'])"], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == "None" and project_head not in out


def test_checkpoint_round_trips_nested_payloads_without_pickle(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    payload = {"opt": opt.state_dict(), "arr": np.arange(5, dtype=np.int16), "t": (1, 2.5, "x"), "nan": float("nan"),
               "int_keys": {3: "a"}, "bf16": torch.ones(2, dtype=torch.bfloat16), "rng": runs.rng_state()}
    runs.save_checkpoint(tmp_path, payload)
    back = runs.load_checkpoint(tmp_path)
    assert back["t"] == (1, 2.5, "x") and back["int_keys"] == {3: "a"} and np.isnan(back["nan"])
    assert back["arr"].dtype == np.int16 and back["arr"].tolist() == [0, 1, 2, 3, 4]
    assert back["bf16"].dtype == torch.bfloat16
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # no pickle anywhere: the record is JSON, the tensors safetensors
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["last-00000001.safetensors", "last.json"]
    runs.save_checkpoint(tmp_path, payload)  # a newer checkpoint supersedes the old tensor file
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["last-00000002.safetensors", "last.json"]
    with pytest.raises(TypeError):
        runs.save_checkpoint(tmp_path, {"obj": object()})


def test_saving_a_checkpoint_keeps_the_tensors_of_one_whose_name_it_prefixes(tmp_path: Path) -> None:
    """Saving ``best`` removed every ``best-*.safetensors``: also the tensor file of a checkpoint named ``best-ema``,
    which could then no longer be loaded."""
    runs.save_checkpoint(tmp_path, {"w": torch.ones(2)}, name="best-ema")
    runs.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, name="best")
    runs.save_checkpoint(tmp_path, {"w": torch.full((2,), 2.0)}, name="best")
    assert torch.equal(runs.load_checkpoint(tmp_path, "best-ema")["w"], torch.ones(2))
    assert torch.equal(runs.load_checkpoint(tmp_path, "best")["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "best-00000002.safetensors", "best-ema-00000001.safetensors", "best-ema.json", "best.json"]


def test_arrays_keep_their_shape_zero_d_included(tmp_path: Path) -> None:
    """A 0-d array came back as shape (1,) (``np.ascontiguousarray`` makes every array at least 1-d)."""
    arrays = {"0d": np.array(2.5), "0d_int": np.array(7, dtype=np.int64), "2d_f": np.asfortranarray(np.eye(3)[:, :2]),
              "strided": np.arange(10)[::3]}
    runs.save_checkpoint(tmp_path, arrays)
    back = runs.load_checkpoint(tmp_path)
    for k, a in arrays.items():
        assert back[k].shape == a.shape and back[k].dtype == a.dtype and np.array_equal(back[k], a), k


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    import random

    st = runs.rng_state()
    runs.save_checkpoint(tmp_path, {"rng": st})
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    runs.set_rng_state(runs.load_checkpoint(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_damaged_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    runs.save_checkpoint(tmp_path, {"w": torch.ones(3)})
    tf = next((tmp_path / "checkpoint").glob("*.safetensors"))
    tf.write_bytes(tf.read_bytes()[:20])
    with pytest.raises(GigaslideError, match="damaged") as e:
        runs.load_checkpoint(tmp_path)
    assert tf.name in str(e.value) and "delete RUN/checkpoint" in str(e.value)
    (tmp_path / "checkpoint" / "last.json").write_text("{not json")
    with pytest.raises(GigaslideError, match="last.json"):
        runs.load_checkpoint(tmp_path)


def test_selection_keeps_the_best_and_counts_patience() -> None:
    sel = runs.Selection("min", patience=2)
    assert [sel.update(v, e) for e, v in enumerate([3.0, 2.0, 2.5, float("nan"), 1.0])] == [True, True, False, False, True]
    assert sel.best == 1.0 and sel.best_epoch == 4 and not sel.stop
    sel.update(5.0, 5)
    sel.update(5.0, 6)
    assert sel.stop
    assert runs.Selection.from_state(sel.state()) == sel
    up = runs.Selection("max")
    assert up.update(0.5, 0) and not up.update(0.4, 1) and up.update(0.6, 2)


def test_stopper_budget_and_sigterm() -> None:
    with runs.Stopper(budget_s=100.0, elapsed_s=99.99) as s:
        time.sleep(0.02)
        assert s.reason() == "budget"
    with runs.Stopper() as s:
        assert s.reason() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert s.reason() == "signal"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(("text", "seconds"), [("2h", 7200.0), ("15m", 900.0), ("1h30m", 5400.0), ("90", 90.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert runs.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["abc", "0", "-5m", "nan", "5x"])
def test_parse_duration_refuses_nonsense(bad: str) -> None:
    with pytest.raises(GigaslideError):
        runs.parse_duration(bad)


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    """While one process has a run open, another process opening it gets a one-line error naming the holder
    (instead of both writing checkpoints, and one cleaning the other's temporary files); the same process may
    open it again; once the holder's Run is gone (or the process dies) the folder is free."""
    import gc

    from gigaslide.runs import open_run

    code = textwrap.dedent(f"""
        import sys
        from gigaslide.errors import GigaslideError
        from gigaslide.runs import open_run
        try:
            open_run({str(tmp_path / 'run')!r}, "test", {{"lr": 1}})
        except GigaslideError as e:
            print(e.one_line()); sys.exit(3)
    """)

    def other_process() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    run = open_run(tmp_path / "run", "test", {"lr": 1})
    again = open_run(tmp_path / "run", "test", {"lr": 1})  # this process: allowed
    assert again.resumed
    p = other_process()
    assert p.returncode == 3 and f"in use by pid {os.getpid()}" in p.stdout and "\n" not in p.stdout.strip()
    del again
    gc.collect()
    assert other_process().returncode == 3  # `run` still holds it
    del run
    gc.collect()
    p = other_process()
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_run_written_by_a_newer_format_is_refused(tmp_path):
    from gigaslide.errors import GigaslideError
    from gigaslide.provenance import FORMAT_VERSION
    from gigaslide.runs import open_run, read_run

    run = open_run(tmp_path / "run", "test", {"lr": 1})
    run.record["provenance"]["format_version"] = FORMAT_VERSION + 1
    run.update()
    with pytest.raises(GigaslideError, match="format version"):
        read_run(tmp_path / "run")


def test_an_encode_output_is_fingerprinted_by_its_features_so_a_rerun_that_changes_none_resumes(tmp_path):
    """A re-run of encode rewrites OUT/manifest.json (times, a broken slide tried again) and OUT/locks/ without
    changing a feature file: a training on OUT resumes (it was refused as 'another run'); a changed feature file is
    still refused."""
    from gigaslide.runs import open_run

    out = _encode_out(tmp_path, '{"slides": {"bad": {"status": "failed", "time": "10:00"}}}')
    (out / "locks").mkdir()
    run = open_run(tmp_path / "run", "mil", {"lr": 1}, inputs={"features": out})
    del run
    (out / "manifest.json").write_text('{"slides": {"bad": {"status": "failed", "time": "11:00:00"}}}')
    (out / "locks" / "bad.failed").write_text("{}")
    (out / "grid.png").write_bytes(b"png")
    _resumes_then_a_changed_feature_is_refused(tmp_path, out)


def _encode_out(tmp_path, manifest: str):  # noqa: ANN001, ANN202
    """An encode output folder: features/a.h5 beside manifest.json."""
    out = tmp_path / "feats"
    (out / "features").mkdir(parents=True)
    (out / "features" / "a.h5").write_bytes(b"A" * 100)
    (out / "manifest.json").write_text(manifest)
    return out


def _resumes_then_a_changed_feature_is_refused(tmp_path, out) -> None:  # noqa: ANN001
    from gigaslide.errors import GigaslideError
    from gigaslide.runs import open_run

    run = open_run(tmp_path / "run", "mil", {"lr": 1}, inputs={"features": out})
    assert run.resumed
    run.save({"step": 1})  # it trained
    del run
    (out / "features" / "a.h5").write_bytes(b"B" * 100)
    with pytest.raises(GigaslideError, match="holds another run"):
        open_run(tmp_path / "run", "mil", {"lr": 1}, inputs={"features": out})


def test_a_run_recorded_with_the_whole_encode_folders_fingerprint_still_resumes(tmp_path):
    """Runs started before encode outputs were hashed by features/ alone recorded the whole folder's listing: they
    resume while the folder is as it was, and are refused when a feature file changed."""
    import json

    from gigaslide.runs import _content_key, _listing, open_run

    out = _encode_out(tmp_path, "{}")
    first = open_run(tmp_path / "run", "mil", {"lr": 1}, inputs={"features": out})
    del first
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    rec["identity"]["input:features"] = _content_key(_listing(out))  # as the older code recorded it
    (tmp_path / "run" / "run.json").write_text(json.dumps(rec))
    _resumes_then_a_changed_feature_is_refused(tmp_path, out)


def test_a_run_that_stopped_before_writing_anything_is_replaced_by_its_fix(tmp_path: Path) -> None:
    # e.g. refused by an input check after run.json was written: the corrected command must run on the same --out
    run_dir = tmp_path / "run"
    first = runs.open_run(run_dir, "toy", {"lr": 0.1, "slide_mpp": None})
    del first
    (run_dir / "cache").mkdir()
    (run_dir / "cache" / "s0.npy").write_bytes(b"x")  # a content-keyed cache the command names
    (run_dir / ".tmp-best.safetensors.abc").write_bytes(b"")  # a killed write's temporary
    run = runs.open_run(run_dir, "toy", {"lr": 0.1, "slide_mpp": 0.5}, caches=("cache",))
    assert not run.resumed and run.identity["slide_mpp"] == 0.5
    rec = runs.read_run(run_dir)
    assert rec["replaced_identity"] == {"lr": 0.1, "slide_mpp": None}
    assert len(rec["invocations"]) == 2 and rec["status"] == "running"
    del run
    (run_dir / "cache" / "s0.npy").unlink()
    (run_dir / "cache").rmdir()
    (run_dir / "fold0").mkdir()
    (run_dir / "fold0" / "model.safetensors").write_bytes(b"x")  # a result: never replaced
    with pytest.raises(GigaslideError, match=r"another run \(slide_mpp: 0.5 -> 1.0\)"):
        runs.open_run(run_dir, "toy", {"lr": 0.1, "slide_mpp": 1.0})


def test_a_finished_run_is_never_replaced(tmp_path: Path) -> None:
    run = runs.open_run(tmp_path / "run", "toy", {"lr": 0.1})
    run.finish()
    del run
    with pytest.raises(GigaslideError, match="another run"):
        runs.open_run(tmp_path / "run", "toy", {"lr": 0.2})


def test_an_input_folder_with_symlinked_sub_folders_is_fingerprinted_through_them(tmp_path: Path) -> None:
    other = tmp_path / "storage" / "cohort_b"
    other.mkdir(parents=True)
    (other / "t.png").write_bytes(b"1")
    data = tmp_path / "data"
    data.mkdir()
    (data / "cohort_b").symlink_to(other, target_is_directory=True)
    fp = runs.fingerprint(data)
    assert fp["files"] == 1
    runs.open_run(tmp_path / "run", "toy", {}, inputs={"data": data})
    runs.save_checkpoint(tmp_path / "run", {"step": 1})
    (other / "t.png").write_bytes(b"2")  # a tile changed in the linked folder
    with pytest.raises(GigaslideError, match="input:data"):
        runs.open_run(tmp_path / "run", "toy", {}, inputs={"data": data})


def test_a_folders_fingerprint_is_the_one_recorded_runs_hold(tmp_path):
    """Golden: the listing hash of a fixed tree (names whose string order differs from their path order, non-ASCII,
    hidden files, a file larger than the two hashed 64 KiB blocks). Runs record it; a change to how folders are
    walked or hashed would refuse every recorded run's resume."""
    from gigaslide.files import walk_file_paths, walk_files

    r = tmp_path / "golden"
    for d in ["a", "a-b", "a b", "ä", "a/b-c", ".hid"]:
        (r / d).mkdir(parents=True, exist_ok=True)
        for n in ["x", "x-1", ".h", "é"]:
            (r / d / n).write_bytes(f"{d}/{n}".encode() * 50)
    (r / "big").write_bytes(bytes(range(256)) * 1024)
    fp = runs.fingerprint(r)
    assert (fp["files"], fp["bytes"]) == (16, 266494)
    assert fp["listing_sha256"] == "a95eec3b9db1b444b0f4d3177bd39651251d4c195f40716e855ba3a32b8a9104"
    # the strings come in the order sorting the paths gives ("a/b-c/x" before "a-b/x", unlike plain string order)
    paths = walk_file_paths(r)
    assert paths == [str(p) for p in sorted(walk_files(r))] and paths != sorted(paths)


def test_isolated_rng_seeds_the_block_and_gives_the_callers_streams_back():
    import random

    import numpy as np
    import torch

    from gigaslide import runs

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected_after = draws()  # what the caller's streams give next without the call in between
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with runs.isolated_rng(7):
        inside = draws()
    assert draws() == expected_after
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert inside == draws()  # the block ran as after the three seed calls

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    try:
        with runs.isolated_rng(3):
            draws()
            raise KeyError("boom")
    except KeyError:
        pass
    assert draws() == expected_after  # given back on an exception too

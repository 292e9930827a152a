"""Reliability campaign: kill -9 and resume, broken and truncated slides, CLI fuzzing, storage faults.

    GIGASLIDE_THREADS=1 nice .venv/bin/python benchmarks/bench_reliability.py [--kills 20] [--slow-kills 3]

Writes benchmarks/results/reliability.md: one row per fault or bad input: how many were tried,
the outcome (clean error / recovered / identical output) and data lost. Every count is measured:

- kill -9: each command runs once uninterrupted (the reference), then ``--kills`` times it is
  started, SIGKILLed at a uniformly random moment of the reference's duration, and re-run to the
  end; the final outputs' arrays (HDF5 datasets, safetensors tensors, prediction tables; never
  timestamps) must equal the reference's byte for byte, no temporary file may be left, and every
  output present right after the kill must be complete (loadable). Slow training commands get
  ``--slow-kills`` (this is a shared 2-core machine).
- every fixture in ../shared/data/slides/corrupt and every real slide truncated at 10 points,
  each encoded in process: a clean one-line error, or the slide is encoded (a truncation that
  spared the pixels it needs), never a traceback.
- the CLI fuzz (tests/cli/test_fuzz.py with a larger budget) and the storage-fault tests
  (tests/cli/test_storage_faults.py), run here with pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, load_note, write_result  # noqa: E402

from gigaslide.testing import output_arrays  # noqa: E402

PY = sys.executable
RESULTS_JSON = ROOT / "benchmarks" / "results" / "reliability.json"
ENV = {**os.environ, "GIGASLIDE_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
ENC = ["--encoder", "test_resnet", "--weights", "random", "--workers", "0", "--precision", "fp32"]


def incomplete(out: Path, keep: Callable[[str], bool]) -> int:
    """Final outputs present right after a kill that do not load (half-written)."""
    n = 0
    for f in out.rglob("*"):
        rel = str(f.relative_to(out))
        if f.is_file() and not f.name.startswith(".") and keep(rel) and f.suffix in (".h5", ".safetensors"):
            try:
                output_arrays(f.parent, lambda r, name=f.name: r == name)
            except Exception:  # noqa: BLE001 - any failure to read counts
                n += 1
    return n


def cli(argv: list[str], timeout: float = 600) -> tuple[int, str, float]:
    t = time.perf_counter()
    p = subprocess.run([PY, "-m", "gigaslide", *argv], capture_output=True, text=True, env=ENV, timeout=timeout)
    return p.returncode, p.stderr, time.perf_counter() - t


def kill_campaign(name: str, argv_for: Callable[[Path], list[str]], keep: Callable[[str], bool], n: int,
                  work: Path, rng: random.Random, budget_s: float = float("inf")) -> dict:
    ref_dir = work / name / "ref"
    rc, err, t_ref = cli(argv_for(ref_dir))
    if rc != 0:
        return {"fault": f"kill -9 during `{name}`", "tried": 0, "outcome": f"reference run failed: {err.strip()[-200:]}",
                "lost": "-", "ok": False}
    ref = output_arrays(ref_dir, keep)
    same = clean = killed = half = kept_lost = tracebacks = 0
    wanted, stop_at, hi, n = n, time.perf_counter() + budget_s, 1.0, 0
    # until `wanted` kills landed mid-run: a run that finishes before its kill point (the machine got faster than
    # during the reference run) still counts as a resume check, and later kill points are drawn earlier
    while killed < wanted and n < 3 * wanted and time.perf_counter() < stop_at:
        out = work / name / f"kill{n}"
        n += 1
        t0 = time.perf_counter()
        p = subprocess.Popen([PY, "-m", "gigaslide", *argv_for(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
        try:
            p.wait(timeout=rng.uniform(0.05, hi) * t_ref)
            hi = max(0.1, min(hi, 0.9 * (time.perf_counter() - t0) / t_ref))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            killed += 1
        half += incomplete(out, keep)
        before = {str(f): f.stat().st_mtime_ns for f in out.rglob("*")  # finished outputs (not temporary files)
                  if f.is_file() and not f.name.startswith(".") and keep(str(f.relative_to(out)))}
        rc, err, _ = cli(argv_for(out))
        tracebacks += "Traceback" in err
        after = output_arrays(out, keep) if rc == 0 else {}
        same += rc == 0 and after == ref
        clean += not list(out.rglob(".tmp-*"))
        kept_lost += sum(not Path(f).is_file() for f in before)
    ok = same == n and clean == n and half == 0 and kept_lost == 0 and tracebacks == 0 and killed >= wanted
    outcome = (f"{killed} killed mid-run in {n} runs (the other {n - killed} finished before their kill point); "
               f"resumed to identical arrays {same}/{n}; no temporary file left {clean}/{n}; uninterrupted run {t_ref:.0f} s"
               + (f"; stopped at {killed} of {wanted} mid-run kills (time budget)" if killed < wanted else ""))
    return {"fault": f"kill -9 at a random point of `{name}`", "tried": killed, "outcome": outcome,
            "lost": f"{half} half-written, {kept_lost} finished outputs lost", "ok": ok}


def in_process(argv: list[str]) -> tuple[int, str]:
    from gigaslide.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except Exception:  # noqa: BLE001 - a traceback is what we count
            import traceback

            err.write("Traceback\n" + traceback.format_exc())
            code = 1
    return code, err.getvalue()


def bad_slides(shared: Path, work: Path) -> list[dict]:
    rows = []
    corrupt = sorted((shared / "slides" / "corrupt").glob("*"))
    res = [in_process(["encode", str(f), "--out", str(work / "corrupt" / f.stem), "--mpp", "2.0", "--tile-size", "64",
                       *ENC]) for f in corrupt]
    good = sum(c == 2 and "Traceback" not in e and sum(ln.startswith("error:") for ln in e.splitlines()) == 1 for c, e in res)
    rows.append({"fault": f"corrupt fixtures ({', '.join(f.name for f in corrupt)})", "tried": len(corrupt),
                 "outcome": f"clean one-line error {good}/{len(corrupt)}", "lost": "-", "ok": good == len(corrupt)})
    reals = sorted(p for p in (shared / "slides").rglob("*") if p.is_file() and "corrupt" not in p.parts
                   and p.suffix.lower() in (".svs", ".tif", ".tiff", ".dcm"))
    tried = errors = recovered = tracebacks = bad_lines = 0
    for src in reals:
        data = src.read_bytes()
        for i, frac in enumerate([0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]):
            d = work / "trunc" / f"{src.stem}-{i}"
            d.mkdir(parents=True, exist_ok=True)
            t = d / src.name
            t.write_bytes(data[: max(1, int(len(data) * frac))])
            code, err = in_process(["encode", str(t), "--out", str(d / "out"), "--mpp", "2.0", "--tile-size", "64",
                                    "--slide-mpp", "0.5", "--min-tissue", "0.0", *ENC])
            tried += 1
            tracebacks += "Traceback" in err
            if code == 0:
                recovered += 1
            elif code == 2 and sum(ln.startswith("error:") for ln in err.splitlines()) == 1:
                errors += 1
            else:
                bad_lines += 1
            half = [f for f in (d / "out").rglob(".tmp-*")]
            bad_lines += bool(half)
    rows.append({"fault": f"real slides truncated at 10 points ({len(reals)} files: {', '.join(p.name for p in reals)})",
                 "tried": tried, "outcome": f"clean one-line error {errors}, encoded anyway {recovered}, "
                 f"traceback {tracebacks}, other {bad_lines}", "lost": "-",
                 "ok": tracebacks == 0 and bad_lines == 0 and errors + recovered == tried})
    return rows


def pytest_rows(work: Path, fuzz_examples: int) -> list[dict]:
    rows = []
    log = work / "fuzz.jsonl"
    env = {**ENV, "GIGASLIDE_FUZZ_EXAMPLES": str(fuzz_examples), "GIGASLIDE_FUZZ_LOG": str(log)}
    p = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/cli/test_fuzz.py"), "-k",
                        "every_command"], capture_output=True, text=True, env=env, cwd=ROOT)
    calls = [json.loads(ln) for ln in log.read_text().splitlines()] if log.is_file() else []
    good = sum(c["code"] != 0 and not c["traceback"] and c["error_lines"] == 1 for c in calls)
    cmds = len({c["command"] for c in calls})
    rows.append({"fault": f"CLI fuzz: generated calls of every command ({cmds} commands)", "tried": len(calls),
                 "outcome": f"non-zero exit with one `error:` line, no traceback {good}/{len(calls)}; nothing written outside "
                 f"--out: {'yes' if p.returncode == 0 else 'see pytest'} (pytest exit {p.returncode})", "lost": "-",
                 "ok": p.returncode == 0 and good == len(calls) and len(calls) > 0})
    junit = work / "storage.xml"
    subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/cli/test_storage_faults.py"),
                    f"--junitxml={junit}"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    import xml.etree.ElementTree as ET  # our own pytest output

    err, resumed, redone = ("one-line error naming the file and the fix, no half-written file",
                            "; the next run resumes to identical features", "redone on the next run to identical features")
    names = {"test_disk_full_while_writing_features": ("disk full while writing features (patched write, ENOSPC)", err + resumed),
             "test_disk_full_on_a_real_tiny_file_system": ("disk full on a real 200 kB tmpfs (root only)", err),
             "test_read_only_output_folder": ("read-only output folder", err),
             "test_read_only_file_system_while_writing": ("read-only file system at the rename (EROFS)", err),
             "test_damaged_feature_file_from_another_tool_is_redone": (
                 "features/*.h5 truncated / garbage / bytes flipped / empty (left by another tool)",
                 "refused on load with a one-line error (Fletcher-32 checksums catch flipped bytes); " + redone),
             "test_damaged_coords_file_is_recomputed": ("truncated patches/*.h5 and a killed run's temporary file",
                                                        "refused on load; recomputed identically; the leftover removed, "
                                                        "another slide's temporary file kept"),
             "test_slide_vanishes_mid_run": ("slide file vanishes mid-run (after tiling, before reading)",
                                             "that slide fails with a one-line reason, the batch goes on" + resumed)}
    cases: dict[str, list[str]] = {}
    if junit.is_file():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            base = tc.get("name", "").split("[")[0]
            state = "skipped" if tc.find("skipped") is not None else "failed" if (
                tc.find("failure") is not None or tc.find("error") is not None) else "passed"
            cases.setdefault(base, []).append(state)
    for base, (label, outcome) in names.items():
        st = cases.get(base, ["not run"])
        ok = all(s == "passed" for s in st)
        rows.append({"fault": f"storage: {label}", "tried": len(st), "outcome": outcome if ok else ", ".join(st),
                     "lost": "none" if ok else "?", "ok": ok})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--slow-kills", type=int, default=3)
    ap.add_argument("--fuzz-examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated parts: kill,slow,slides,pytest (others' rows are kept)")
    ap.add_argument("--budget-min", type=float, default=18.0, help="time budget of the encode kill loop (minutes)")
    ap.add_argument("--slow-budget-min", type=float, default=4.0, help="time budget of each slow command's kill loop")
    args = ap.parse_args()
    slow = ["pretrain", "augment-cache", "train-mil", "train-streaming"]
    parts = set(args.only.split(",")) if args.only else {"slides", "pytest", "encode", *slow}
    parts = (parts - {"kill", "slow"}) | ({"encode"} if "kill" in parts else set()) | (set(slow) if "slow" in parts else set())
    from gigaslide.testing import make_slide, make_tile_folder, shared_data_dir

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="gigaslide-reliability-"))
    slides = [make_slide(work / "slides" / f"s{i}.tiff", (1536, 1024), seed=i) for i in range(3)]
    sdir = work / "stream"  # four slides: two per class, so that each of 2 folds has both classes
    for i in range(4):
        make_slide(sdir / f"s{i}.tif", (1024, 768), mpp=0.5, seed=i)
    (sdir / "labels.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(4)))
    saved = RESULTS_JSON.is_file() and json.loads(RESULTS_JSON.read_text()) or []
    rows: list[dict] = [r for r in saved if r.get("part") not in parts]  # rows of parts not re-run this time
    t0 = time.perf_counter()

    order = ["encode", *slow, "slides", "pytest"]

    def publish(done: bool) -> None:
        rows.sort(key=lambda r: order.index(r["part"]) if r.get("part") in order else len(order))
        n_ok = sum(r["ok"] for r in rows)
        lines = ["# Reliability", "",
                 "Faults and bad inputs thrown at the CLI (`benchmarks/bench_reliability.py`). Goal: zero tracebacks, zero "
                 f"half-written files, zero differing outputs. Last run: {load_note()} (kill points are "
                 "drawn from the uninterrupted run's duration, so they land at different stages on each run).", "",
                 "| fault or bad input | tried | outcome | data lost | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['fault']} | {r['tried']} | {r['outcome']} | {r['lost']} | {'ok' if r['ok'] else '**FAILS**'} |"
                  for r in rows]
        lines += ["", f"**{n_ok} of {len(rows)} rows meet the goal**" + ("." if n_ok == len(rows) else
                  "; the rows marked FAILS do not (see their outcome)."),
                  (f"Campaign time {(time.perf_counter() - t0) / 60:.1f} min" + ("." if done else
                   " so far (still running: parts not listed yet were not measured).")) if parts != {"none"} else "",
                  f"Rows of parts not re-run this time (`--only {args.only}`) are kept from the previous run "
                  "(results/reliability.json), measured on the same code unless the row says otherwise." if args.only else ""]
        print(write_result("reliability", "\n".join(lines)), flush=True)
        RESULTS_JSON.write_text(json.dumps(rows, indent=1) + "\n")
        if done:
            print("\n".join(lines))

    shared = shared_data_dir()
    if "slides" in parts and shared is not None:
        rows += [{**r, "part": "slides"} for r in bad_slides(shared, work)]
        publish(False)
    if "pytest" in parts:
        rows += [{**r, "part": "pytest"} for r in pytest_rows(work, args.fuzz_examples)]
        publish(False)
    if "encode" in parts:
        rows.append(kill_campaign("encode", lambda o: ["encode", *map(str, slides), "--out", str(o), "--mpp", "1.0",
                                                       "--tile-size", "64", "--batch-size", "16", *ENC],
                                  lambda r: r.startswith("features/"), args.kills, work, rng, args.budget_min * 60))
        rows[-1]["part"] = "encode"
        publish(False)
    if "pretrain" in parts:
        tiles = make_tile_folder(work / "tiles", 8, size=32, noise=20.0)
        rows.append(kill_campaign("pretrain", lambda o: [
            "pretrain", "--data", str(tiles), "--out", str(o), "--method", "simclr", "--backbone", "test_resnet",
            "--tile-size", "32", "--steps", "30", "--batch-size", "4", "--workers", "0", "--seed", "1",
            "--checkpoint-every", "1s", "--method-args", '{"hidden_dim": 16, "out_dim": 8}'],
            lambda r: r.startswith("encoder/"), args.slow_kills, work, rng, args.slow_budget_min * 60))
        rows[-1]["part"] = "pretrain"
        publish(False)
    if "augment-cache" in parts:
        rows.append(kill_campaign("augment-cache", lambda o: [
            "augment-cache", *map(str, slides), "--out", str(o), "--encoder", "test_resnet", "--weights", "random",
            "--views", "3", "--tiles-per-view", "6", "--mpp", "2.0", "--tile-size", "32", "--seed", "2"],
            lambda r: r.startswith("features/"), args.slow_kills, work, rng, args.slow_budget_min * 60))
        rows[-1]["part"] = "augment-cache"
        publish(False)
    if "train-mil" in parts:
        feats = work / "mil"
        more = [make_slide(work / "more" / f"t{i}.tiff", (1024, 768), seed=10 + i) for i in range(5)]
        cli(["encode", *map(str, [*slides, *more]), "--out", str(feats), "--mpp", "2.0", "--tile-size", "64", *ENC])
        (work / "labels8.csv").write_text("slide_id,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(3)) +
                                          "".join(f"t{i},{(i + 1) % 2}\n" for i in range(5)))
        rows.append(kill_campaign("train-mil", lambda o: [
            "train-mil", "--features", str(feats / "features"), "--labels", str(work / "labels8.csv"), "--out", str(o),
            "--model", "abmil", "--folds", "2", "--epochs", "15", "--hidden", "16", "--bootstrap", "0", "--seed", "3"],
            lambda r: "pred" in r or r.endswith("model.safetensors"), args.slow_kills, work, rng, args.slow_budget_min * 60))
        rows[-1]["part"] = "train-mil"
        publish(False)
    if "train-streaming" in parts:
        rows.append(kill_campaign("train-streaming", lambda o: [
            "train-streaming", "--slides", str(sdir), "--labels", str(sdir / "labels.csv"), "--out", str(o), "--mpp", "1.5",
            "--image-size", "320", "--tile-size", "256", "--encoder", "test_resnet", "--weights", "random",
            "--pool-kernel", "2", "--folds", "2", "--epochs", "2", "--freeze-epochs", "1", "--accumulate", "1",
            "--precision", "fp32", "--seed", "0", "--checkpoint-blocks", "false"],
            lambda r: r.endswith("predictions.csv") or "best" in r, args.slow_kills, work, rng, args.slow_budget_min * 60))
        rows[-1]["part"] = "train-streaming"
    publish(True)


if __name__ == "__main__":
    main()

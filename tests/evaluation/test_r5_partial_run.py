"""Review round 5: `evaluate slides` on the folder of an unfinished run (train-mil killed after some folds) must not
report the folds done so far as the run's result."""

import json

import numpy as np

from gigaslide.evaluation.slides import write_predictions


def _run_folder(tmp_path, status):
    run = tmp_path / "run"
    r = np.random.default_rng(0)
    for k in range(2):  # 2 of 4 folds written, as a kill after fold1 leaves them
        ids = [f"s{k}_{i}" for i in range(6)]
        p1 = r.uniform(size=6)
        write_predictions(run / f"fold{k}" / "predictions.csv", ids, [i % 2 for i in range(6)],
                          np.stack([1 - p1, p1], 1), k)
    (run / "run.json").write_text(json.dumps({"run_kind": "mil", "status": status, "identity": {"folds": 4}}))
    return run


def test_an_unfinished_runs_fold_files_are_not_evaluated_as_the_run(tmp_path, cli, capsys):
    run = _run_folder(tmp_path, "running")
    assert cli(["evaluate", "slides", "--predictions", str(run), "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err
    assert "not finished (run.json status 'running'): its 2 fold*/predictions.csv" in err and "resumes" in err
    assert not (run / "evaluation.json").exists()  # (was written: 12 of the slides, exit 0)
    other = tmp_path / "other.csv"
    write_predictions(other, [f"s{k}_{i}" for k in range(2) for i in range(6)], [i % 2 for i in range(12)],
                      np.full((12, 2), 0.5), 0)
    assert cli(["evaluate", "slides", "--predictions", str(other), "--baseline", str(run), "--bootstrap", "10"]) == 2
    assert "not finished" in capsys.readouterr().err
    # finished (or no run.json: another tool's fold files): evaluated from the fold files as before
    (run / "run.json").write_text(json.dumps({"run_kind": "mil", "status": "finished"}))
    assert cli(["evaluate", "slides", "--predictions", str(run), "--bootstrap", "10"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["n_slides"] == 12

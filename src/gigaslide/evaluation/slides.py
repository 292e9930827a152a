"""Slide-level evaluation: the one protocol every slide-level method of gigaslide reports with.

Prediction CSV contract (written by MIL, Giga-SSL, SLPD, StreamingCLAM ... ; read here)
---------------------------------------------------------------------------------------
One row per (slide, fold[, repeat]) *test* prediction, UTF-8, comma-separated, with a header::

    slide_id,label,prob_0,prob_1,...,prob_{C-1},fold[,repeat][,patient_id][,class_name]

* ``slide_id``: str, the slide's id (feature file stem); ``label``: int ground truth 0..C-1;
* ``prob_c``: float probability of class c (rows should sum to 1; they are re-normalised);
* ``fold``: int, the cross-validation fold in which the slide was in the test set;
* ``repeat`` (optional): int, the few-shot draw / repeated run; every repeat is a full CV;
* ``patient_id`` (optional): str, the slide's patient (labels.csv's ``patient_id``): the CIs then resample
  patients, each with all its slides (an empty value: the slide is its own patient);
* ``class_name`` (optional): str, the name of class ``label`` where labels.csv names the classes (``LUAD``):
  ``prob_c`` is the probability of the class whose rows have ``label`` c; one name per label, one label per name.

A slide appears once per repeat (cross-validation: every slide is tested exactly once). A run
directory may hold this as ``predictions.csv`` or as ``fold*/predictions.csv`` (concatenated);
:func:`write_predictions` writes it atomically. Methods store the folds they used in the run
(``splits.json``, from :mod:`gigaslide.evaluation.splits`) and pick checkpoints on a validation
split inside the training folds, never on the test fold.

Reported metrics: AUC (ROC; macro one-vs-rest for C > 2) and balanced accuracy (plus macro-F1)
on the pooled out-of-fold predictions, with a 95 % percentile bootstrap CI that resamples slides
within each fold (B = ``n_bootstrap``) -- or, where the predictions know the patients, patients with
all their slides (a cluster bootstrap: slides of one patient are not independent; recorded as
``resampled``); the per-fold mean ± std is reported too. With repeats, the value is the mean over
repeats and each bootstrap replicate averages over the repeats.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.provenance import check_format, provenance, sidecar, write_sidecar
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.compare import COMPARE_METRICS
from gigaslide.evaluation.metrics import METRICS, bootstrap_replicates, fmt_ci, paired_difference, percentile_ci
from gigaslide.evaluation.splits import utf8_or_error

SLIDE_METRICS = ("auc", "balanced_accuracy", "macro_f1")


@dataclass
class Predictions:
    slide_ids: list[str]
    labels: np.ndarray  # [N]
    probs: np.ndarray  # [N, C]
    folds: np.ndarray  # [N]
    repeats: np.ndarray  # [N] (zeros when absent)
    source: str = ""
    patient_ids: list[str] | None = None  # [N] when the predictions name the slides' patients
    class_names: list[str] | None = None  # [C] when the predictions name the classes (a class without rows: "c")

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[1])


def write_predictions(path: str | os.PathLike, slide_ids: Sequence[str], labels: Sequence[int], probs: np.ndarray,
                      folds: Sequence[int] | int, repeats: Sequence[int] | int | None = None,
                      record: Mapping[str, Any] | None = None, patient_ids: Sequence[str] | None = None,
                      class_names: Sequence[str] | None = None) -> Path:
    """Write a prediction CSV in the contract above (atomic); ``record`` (provenance of the features/model
    it came from: encoder, weights hash, mpp, tile size, seed, run) goes to its ``.provenance.json`` sidecar;
    ``patient_ids`` (one per row, from labels.csv) adds the ``patient_id`` column, ``class_names`` (one per class,
    from labels.csv) the ``class_name`` column and the sidecar's ``class_names``."""
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    folds = [folds] * n if isinstance(folds, (int, np.integer)) else list(folds)
    reps = None if repeats is None else ([repeats] * n if isinstance(repeats, (int, np.integer)) else list(repeats))
    pats = None if patient_ids is None else [str(x) for x in patient_ids]
    if pats is not None and len(pats) != n:
        raise ValueError(f"{len(pats)} patient ids for {n} predictions")
    header = ["slide_id", "label"] + [f"prob_{k}" for k in range(c)] + ["fold"] + (["repeat"] if reps is not None else [])
    header += ["patient_id"] if pats is not None else []
    names = None if class_names is None else [str(x) for x in class_names]
    if names is not None and len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} prob columns")
    header += ["class_name"] if names is not None else []
    with atomic.atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(n):
                # every digit (shortest round trip): at 6 digits a confident model's 1 - 1e-7 and 1 - 4e-7 were both
                # "1" (a tie in the AUC) and 0.5000004 vs 0.4999996 both "0.5" (the arg-max flipped to class 0)
                row = [slide_ids[i], int(labels[i])] + [repr(float(v)) for v in probs[i]] + [int(folds[i])]
                w.writerow(row + ([int(reps[i])] if reps is not None else []) + ([pats[i]] if pats is not None else [])
                           + ([names[int(labels[i])]] if names is not None else []))
    if record is not None:
        extra = {} if names is None else {"class_names": names}
        write_sidecar(path, provenance(kind="predictions", **{**dict(record), **extra}))
    return Path(path)


def pool_predictions(parts: Sequence[str | os.PathLike], out: str | os.PathLike,
                     record: Mapping[str, Any] | None = None, patients: Mapping[str, str] | None = None,
                     class_names: Sequence[str] | None = None) -> Predictions:
    """Concatenate per-fold prediction CSVs (in the order given) into ``out`` — the one way runs pool folds.
    ``patients`` (slide id -> patient id, from labels.csv) names every slide's patient (fold files written before
    the column existed have none); else the parts' own ``patient_id`` columns are kept when all have them.
    ``class_names`` (from labels.csv) names the classes, else the parts' own ``class_name`` columns do."""
    preds = [read_predictions(p) for p in parts]
    if not preds:
        raise GigaslideError("no fold predictions to pool", path=out, fix="check that training finished")
    ids = sum((p.slide_ids for p in preds), [])
    pats = ([patients[s] for s in ids] if patients is not None else
            sum((p.patient_ids for p in preds), []) if all(p.patient_ids is not None for p in preds) else None)
    pooled = Predictions(ids, np.concatenate([p.labels for p in preds]),
                         np.concatenate([p.probs for p in preds]), np.concatenate([p.folds for p in preds]),
                         np.concatenate([p.repeats for p in preds]), str(out), pats)
    names = list(class_names) if class_names is not None else _pooled_names(preds, out)
    pooled.class_names = names
    _checked_patients(pooled)
    with_repeats = len(np.unique(pooled.repeats)) > 1
    write_predictions(out, pooled.slide_ids, pooled.labels, pooled.probs, pooled.folds,
                      pooled.repeats if with_repeats else None, record=record, patient_ids=pats, class_names=names)
    return pooled


def _pooled_names(preds: Sequence[Predictions], out: str | os.PathLike) -> list[str] | None:
    """The class names the parts agree on (a class without rows in one part, named ``"c"`` there, takes the others'
    name); None when some part names none."""
    if not preds or any(p.class_names is None for p in preds):
        return None
    merged: dict[int, str] = {}
    for p in preds:
        for c, n in enumerate(p.class_names or []):
            if n != str(c) and merged.setdefault(c, n) != n:
                raise GigaslideError(f"class {c} is {merged[c]!r} in one fold file, {n!r} in another", path=out,
                                     fix="pool the folds of one run (one labels.csv)")
    return [merged.get(c, str(c)) for c in range(preds[0].n_classes)]


def _csv_files(source: str | os.PathLike) -> list[Path]:
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise GigaslideError("predictions not found", path=p, fix="pass a run directory or a predictions CSV")
    if (p / "predictions.csv").is_file():
        return [p / "predictions.csv"]
    files = sorted(p.glob("fold*/predictions.csv"))
    if not files:
        raise GigaslideError("no predictions.csv or fold*/predictions.csv here", path=p,
                             fix="pass the --out directory of a finished training run")
    return files


def _check_sidecar_format(path: Path) -> None:
    """Refuse predictions whose record (``<stem>.provenance.json``, where there is one: other tools write none) says
    a newer gigaslide wrote them, in one line, rather than read a layout this one does not know."""
    import json

    side = sidecar(path)
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):  # none (other tools), or unreadable: the CSV's own checks decide
        return
    if isinstance(rec, dict):
        check_format(rec, side)


def read_predictions(source: str | os.PathLike) -> Predictions:
    """Read a run directory or CSV in the contract above, validating every row."""
    ids: list[str] = []
    labels, folds, reps, probs = [], [], [], []
    pats: list[str] | None = []
    names: dict[int, str] | None = {}  # label -> class name, from the class_name columns
    n_classes = None
    for f in _csv_files(source):
        _check_sidecar_format(f)
        with open(f, newline="", encoding="utf-8-sig") as fh, utf8_or_error(f):  # -sig: Excel's BOM
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = cols
            pcols = [c for c in cols if c.startswith("prob_")]
            n_prob = len(pcols)
            if sorted(pcols) != sorted(f"prob_{k}" for k in range(n_prob)):  # prob_tumor, or prob_0,prob_2
                raise GigaslideError(f"prob columns {', '.join(pcols)} are not prob_0..prob_{n_prob - 1}", path=f,
                                     fix="write one column prob_c per class index c = 0..C-1")
            pcols = [f"prob_{k}" for k in range(n_prob)]
            missing = [c for c in ("slide_id", "label", "fold") if c not in cols]
            if missing or len(pcols) < 2:
                raise GigaslideError(f"missing column(s) {', '.join(missing) or 'prob_0, prob_1'}", path=f,
                                     fix="header must be slide_id,label,prob_0..prob_{C-1},fold[,repeat]")
            if n_classes is not None and len(pcols) != n_classes:
                raise GigaslideError(f"{len(pcols)} prob columns, other files have {n_classes}", path=f,
                                     fix="evaluate one run at a time")
            n_classes = len(pcols)
            if "patient_id" not in cols:  # every file names the patients, or none counts
                pats = None
            if "class_name" not in cols:  # likewise the classes
                names = None
            for line, r in enumerate(reader, start=2):
                try:
                    probs.append([float(r[c]) for c in pcols])
                    labels.append(int(r["label"]))
                    folds.append(int(r["fold"]))
                    reps.append(int(r["repeat"]) if r.get("repeat") not in (None, "") else 0)
                except (TypeError, ValueError):
                    raise GigaslideError(f"line {line}: non-numeric label/prob/fold", path=f,
                                         fix="labels, folds and repeats are integers, probs are floats") from None
                ids.append((r["slide_id"] or "").strip())
                if pats is not None:
                    pats.append((r["patient_id"] or "").strip() or ids[-1])
                if names is not None:
                    name = (r["class_name"] or "").strip()
                    if not name:
                        raise GigaslideError(f"line {line}: empty class_name", path=f,
                                             fix="name the class of every row, or leave out the class_name column")
                    if names.setdefault(labels[-1], name) != name:
                        raise GigaslideError(f"line {line}: label {labels[-1]} is class {name!r} here, "
                                             f"{names[labels[-1]]!r} above", path=f,
                                             fix="one class_name per label (as labels.csv maps them)")
    if not ids:
        raise GigaslideError("predictions are empty", path=source, fix="check that training finished")
    P = np.asarray(probs)
    if not np.isfinite(P).all():
        raise GigaslideError("predictions contain NaN/inf probabilities", path=source, fix="the model diverged; retrain")
    sums = P.sum(axis=1, keepdims=True)
    # rows that sum to 1 up to the file's rounding are kept as written (renormalising them would turn tied scores
    # into near-ties ordered by rounding noise); other scores are made rows of probabilities
    if not np.allclose(sums, 1.0, rtol=0, atol=1e-4):
        P = P / np.clip(sums, 1e-12, None)
    pred = Predictions(ids, np.asarray(labels), P, np.asarray(folds), np.asarray(reps), str(source),
                       pats if pats is not None and len(pats) == len(ids) else None)
    if names:
        two = [n for n, k in Counter(names.values()).items() if k > 1]
        if two:
            raise GigaslideError(f"class {two[0]!r} has two labels", path=source,
                                 fix="one label per class_name (as labels.csv maps them)")
        pred.class_names = [names.get(c, str(c)) for c in range(n_classes or 0)]
    key = list(zip(pred.slide_ids, pred.repeats.tolist()))
    if len(set(key)) != len(key):
        raise GigaslideError("a slide is predicted twice in the same repeat", path=source,
                             fix="each slide must be in exactly one test fold per repeat")
    if pred.labels.max() >= n_classes or pred.labels.min() < 0:
        raise GigaslideError(f"labels outside 0..{n_classes - 1}", path=source, fix="write one prob column per class")
    return _checked_patients(pred)


def _checked_patients(pred: Predictions) -> Predictions:
    """Refuse, in one line, a slide that the predictions put in two patients."""
    if pred.patient_ids is None:
        return pred
    seen: dict[str, str] = {}
    for s, pt in zip(pred.slide_ids, pred.patient_ids):
        if seen.setdefault(s, pt) != pt:
            raise GigaslideError(f"slide {s} belongs to patient {seen[s]} in one row, {pt} in another",
                                 path=pred.source, fix="one patient_id per slide (as in labels.csv)")
    return pred


def with_patients(pred: Predictions, labels: str | os.PathLike) -> Predictions:
    """``pred`` with each slide's patient from ``labels`` (labels.csv with a ``patient_id`` column), for predictions
    written without them, and its class names where it names the classes; refused in one line when labels.csv lacks
    the column (and names no class), a slide or its label. Where both name the classes, labels are compared by
    name: a labels.csv with a subset of the classes numbers them 0..C'-1, not as the run did."""
    from gigaslide.evaluation.splits import read_labels

    table = read_labels(labels)
    fix = "pass the labels.csv the run was trained with"
    if not table.has_patients and not table.class_names:
        raise GigaslideError("no patient_id (or case_id) column", path=labels,
                             fix="add one (slide_id,patient_id,label), or leave out --labels: the CIs resample slides")
    row = {s: i for i, s in enumerate(table.slide_ids)}
    missing = sorted({s for s in pred.slide_ids if s not in row})
    if missing:
        raise GigaslideError(f"{len(missing)} predicted slide(s) are not in it: {', '.join(missing[:5])}", path=labels,
                             fix=fix)
    def here(s: str) -> str:
        c = int(table.labels[row[s]])
        return table.class_names[c] if table.class_names else str(c)

    def there(y: int) -> str:
        return pred.class_names[y] if pred.class_names else str(y)

    by_name = table.class_names is not None and pred.class_names is not None
    other = [(s, y) for s, y in zip(pred.slide_ids, pred.labels.tolist())
             if (here(s) != there(y) if by_name else table.labels[row[s]] != y)]
    if other:
        s, y = other[0]
        raise GigaslideError(f"slide {s} has label {_named(int(table.labels[row[s]]), table.class_names)} here, "
                             f"{_named(y, pred.class_names)} in the predictions", path=labels, fix=fix)
    names = pred.class_names
    if names is None and table.class_names is not None and len(table.class_names) == pred.n_classes:
        names = list(table.class_names)  # the same numbering: every slide's label agrees
    if not table.has_patients:
        return Predictions(pred.slide_ids, pred.labels, pred.probs, pred.folds, pred.repeats, pred.source,
                           pred.patient_ids, names)
    pats = [table.patient_ids[row[s]] for s in pred.slide_ids]
    if pred.patient_ids is not None and pred.patient_ids != pats:
        k = next(i for i, (a, b) in enumerate(zip(pred.patient_ids, pats)) if a != b)
        raise GigaslideError(f"slide {pred.slide_ids[k]} belongs to patient {pats[k]} here, {pred.patient_ids[k]} in "
                             f"the predictions", path=labels, fix=fix)
    return Predictions(pred.slide_ids, pred.labels, pred.probs, pred.folds, pred.repeats, pred.source, pats, names)


def _named(c: int, names: Sequence[str] | None) -> str:
    """Label ``c`` as ``1 (LUSC)`` where the classes have names, else ``1``."""
    return f"{c} ({names[c]})" if names is not None and 0 <= c < len(names) else str(c)


def _patients(pred: Predictions, rows: np.ndarray) -> list[str] | None:
    """The patients of ``rows`` (for a cluster bootstrap), or None when the predictions do not name them."""
    return None if pred.patient_ids is None else [pred.patient_ids[i] for i in rows]


def _per_repeat(pred: Predictions) -> tuple[list[str], list[np.ndarray]]:
    """(slide ids sorted, one row index array per repeat in that slide order): repeats aligned on their slides so
    one bootstrap draw resamples the same slides in each."""
    per_rep = []
    base_ids = None
    rep_ids = np.unique(pred.repeats)
    for r in rep_ids:
        m = pred.repeats == r
        order = np.argsort(np.asarray(pred.slide_ids, dtype=object)[m].astype(str), kind="stable")
        idx = np.flatnonzero(m)[order]
        ids = [pred.slide_ids[i] for i in idx]
        if base_ids is None:
            base_ids = ids
        elif ids != base_ids:
            raise GigaslideError(f"repeat {r} predicts a different set of slides than repeat {rep_ids[0]}",
                                 path=pred.source, fix="every repeat must be a full cross-validation of the same slides")
        per_rep.append(idx)
    return base_ids or [], per_rep


def compare_predictions(pred: Predictions | str | os.PathLike, base: Predictions | str | os.PathLike, *,
                        n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``pred`` minus ``base`` on the same slides: metric -> paired difference of the pooled out-of-fold metric
    (mean over each run's repeats), one bootstrap resample of slides for both, stratified by label (the two runs'
    folds may differ); a run's repeats (few-shot draws of training slides) are resampled too, each run's on its
    own. Where either run names the slides' patients, patients are resampled with all their slides (``resampled:
    patients``). Refused in one line when they predict other slides, labels, classes or patients."""
    pred = pred if isinstance(pred, Predictions) else read_predictions(pred)
    base = base if isinstance(base, Predictions) else read_predictions(base)
    _one_class(pred)
    fix = "compare runs cross-validated on the same slides (the same labels.csv)"
    (ids, rows), (base_ids, base_rows) = _per_repeat(pred), _per_repeat(base)
    if ids != base_ids:
        here, there = sorted(set(ids) - set(base_ids)), sorted(set(base_ids) - set(ids))
        raise GigaslideError(f"the baseline predicts other slides ({len(here)} only here{_eg(here)}, {len(there)} only "
                             f"in the baseline{_eg(there)})", path=base.source, fix=fix)
    if pred.n_classes != base.n_classes:
        raise GigaslideError(f"{base.n_classes} classes in the baseline, {pred.n_classes} here", path=base.source,
                             fix=fix)
    if pred.class_names is not None and base.class_names is not None and pred.class_names != base.class_names:
        raise GigaslideError(f"classes {', '.join(base.class_names)} in the baseline, {', '.join(pred.class_names)} "
                             f"here", path=base.source, fix=fix)
    labels, base_labels = pred.labels[rows[0]], base.labels[base_rows[0]]
    if not np.array_equal(labels, base_labels):
        k = int(np.flatnonzero(labels != base_labels)[0])
        raise GigaslideError(f"slide {ids[k]} has label {_named(int(base_labels[k]), base.class_names)} in the "
                             f"baseline, {_named(int(labels[k]), pred.class_names)} here", path=base.source, fix=fix)
    pats, base_pats = _patients(pred, rows[0]), _patients(base, base_rows[0])
    if pats is not None and base_pats is not None and pats != base_pats:
        k = next(i for i, (a, b) in enumerate(zip(pats, base_pats)) if a != b)
        raise GigaslideError(f"slide {ids[k]} belongs to patient {base_pats[k]} in the baseline, {pats[k]} here",
                             path=base.source, fix=fix)
    groups = pats if pats is not None else base_pats
    probs = np.stack([pred.probs[i] for i in rows])
    base_probs = np.stack([base.probs[i] for i in base_rows])
    draws = "independent" if len(probs) > 1 or len(base_probs) > 1 else None  # repeats: resampled too
    out = {m: paired_difference(labels, probs, base_probs, m, n_bootstrap=n_bootstrap, seed=seed, strata=labels,
                                draws=draws, groups=groups) for m in COMPARE_METRICS}
    for d in out.values():
        d["resampled"] = "slides" if groups is None else "patients"
        if groups is not None:
            d["n_patients"] = len(set(groups))
    return out


def _eg(ids: list[str]) -> str:
    return f", e.g. {ids[0]}" if ids else ""


def evaluate_predictions(pred: Predictions | str | os.PathLike, *, n_bootstrap: int = 1000, seed: int = 0,
                         out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Pooled out-of-fold metrics with bootstrap CIs (resampling slides within folds, or patients with all their
    slides where the predictions name them), per-fold mean ± std."""
    if not isinstance(pred, Predictions):
        pred = read_predictions(pred)
    _one_class(pred)
    _, per_rep = _per_repeat(pred)
    first = per_rep[0]
    strata = pred.folds[first]
    groups = _patients(pred, first)
    res: dict[str, Any] = {"n_slides": len(first), "n_classes": pred.n_classes, "n_repeats": len(per_rep),
                           "resampled": "slides" if groups is None else "patients",
                           **({} if groups is None else {"n_patients": len(set(groups))}),
                           "n_folds": int(len(np.unique(pred.folds))), "n_bootstrap": n_bootstrap, "seed": seed,
                           "class_counts": np.bincount(pred.labels[first], minlength=pred.n_classes).tolist(),
                           **({} if pred.class_names is None else {"class_names": list(pred.class_names)}),
                           "source": pred.source, "metrics": {}}
    for name in SLIDE_METRICS:
        fn = METRICS[name]
        vals = [fn(pred.labels[i], pred.probs[i]) for i in per_rep]
        value = float(np.mean(vals)) if not np.isnan(vals).all() else float("nan")

        def stat(b: np.ndarray, fn=fn) -> float:  # one resample of slides, the same in every repeat
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates (one class drawn) are dropped
                return float(np.nanmean([fn(pred.labels[i[b]], pred.probs[i[b]]) for i in per_rep]))

        lo, hi = percentile_ci(bootstrap_replicates(stat, len(first), n_bootstrap=n_bootstrap, seed=seed, strata=strata,
                                                    groups=groups))
        fold_vals = [fn(pred.labels[i][pred.folds[i] == k], pred.probs[i][pred.folds[i] == k])
                     for i in per_rep for k in np.unique(pred.folds[i])]
        fv = np.asarray([v for v in fold_vals if not np.isnan(v)])
        res["metrics"][name] = {"value": value, "ci_low": float(lo), "ci_high": float(hi),
                                "fold_mean": float(fv.mean()) if len(fv) else float("nan"),
                                "fold_std": float(fv.std()) if len(fv) else float("nan"),
                                # folds (x repeats) the metric is defined on: a test fold of one class has no AUC
                                "fold_n": int(len(fv)), "fold_total": len(fold_vals)}
    if out is not None:
        d = Path(out)
        target = d if d.suffix == ".json" else (d / "evaluation.json")
        atomic.write_json(target, {**provenance(kind="slide_evaluation"), **res})
        atomic.write_text(target.with_suffix(".md"), evaluation_markdown(res))
    return res


def _one_class(pred: Predictions) -> None:
    """Refuse, in one line, predictions whose slides are all of one class: AUC is undefined on them (it was reported
    as ``nan``, and ``NaN`` in evaluation.json)."""
    present = np.unique(pred.labels)
    if len(present) == 1:
        label = _named(int(present[0]), pred.class_names)
        raise GigaslideError(f"every predicted slide ({len(pred.labels)} rows) has label {label}: "
                             "AUC is undefined on one class", path=pred.source,
                             fix="evaluate the predictions of a whole cross-validation (every class), not a subset")


def evaluation_markdown(res: dict[str, Any], title: str = "Slide-level evaluation") -> str:
    m = res["metrics"]
    over = (f"patients within folds, each with all its slides ({res.get('n_patients')} patients)"
            if res.get("resampled") == "patients" else "slides within folds")
    names = res.get("class_names")
    counts = (", ".join(f"{c} = {n}: {k}" for c, (n, k) in enumerate(zip(names, res["class_counts"])))
              if names else res["class_counts"])
    counts = f"({counts})" if names else counts
    return (f"# {title}\n\n{res['n_slides']} slides {counts}, {res['n_folds']} folds, "
            f"{res['n_repeats']} repeat(s); 95 % bootstrap CI over {over} (B={res['n_bootstrap']})\n\n"
            "| metric | pooled [95 % CI] | per-fold mean ± std |\n|---|---|---|\n"
            + "".join(f"| {k} | {fmt_ci(v)} | {_fold_cell(v)} |\n" for k, v in m.items()))


def _fold_cell(v: dict[str, Any]) -> str:
    """``0.812 ± 0.034``, or what leaves it undefined (was ``nan ± nan`` where every test fold has one class)."""
    if not v.get("fold_n", 1) or np.isnan(v["fold_mean"]):
        return "undefined: every test fold has one class"
    return f"{v['fold_mean']:.3f} ± {v['fold_std']:.3f}{_folds_left_out(v)}"


def _folds_left_out(v: dict[str, Any]) -> str:
    """`` (3 of 4 folds: the others have one class)`` where a per-fold metric is undefined on some folds."""
    n, total = v.get("fold_n"), v.get("fold_total")
    return f" ({n} of {total} folds: the others have one class)" if n is not None and total and n < total else ""


def _check_embeddings(X: np.ndarray, y: np.ndarray) -> None:
    if X.ndim != 2 or len(X) != len(y):
        raise GigaslideError(f"embeddings must be [N, D] with N labels, got {X.shape} and {y.shape}")


def _fold_predictions(ids: list[str], y: np.ndarray, probs: np.ndarray, fold_of: np.ndarray,
                      repeat: int | None) -> Predictions:
    tested = fold_of >= 0
    return Predictions([ids[i] for i in np.flatnonzero(tested)], y[tested], probs[tested], fold_of[tested],
                       np.full(int(tested.sum()), repeat or 0))


def linear_probe_slides(embeddings: np.ndarray, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], *,
                        slide_ids: Sequence[str] | None = None, C: float = 1.0, seed: int = 0,
                        out_csv: str | os.PathLike | None = None, repeat: int | None = None,
                        n_classes: int | None = None) -> Predictions:
    """Cross-validated linear probe on slide embeddings [N, D]: StandardScaler + balanced LogisticRegression.

    ``folds`` come from :func:`gigaslide.evaluation.splits.make_folds`. Returns the out-of-fold
    :class:`Predictions` (and writes them as a prediction CSV with ``out_csv``); ``n_classes`` (default: the largest
    label + 1) sets the number of prob columns."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    _check_embeddings(X, y)
    ids = list(slide_ids) if slide_ids is not None else [str(i) for i in range(len(y))]
    n_classes = n_classes or int(y.max()) + 1
    probs = np.zeros((len(y), n_classes))
    fold_of = np.full(len(y), -1)
    for k, (tr, te) in enumerate(folds):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000,
                                                                 random_state=seed))
        clf.fit(X[tr], y[tr])
        classes = clf.classes_
        probs[np.ix_(te, classes)] = clf.predict_proba(X[te])
        fold_of[te] = k
    pred = _fold_predictions(ids, y, probs, fold_of, repeat)
    if out_csv is not None:
        write_predictions(out_csv, pred.slide_ids, pred.labels, pred.probs, pred.folds, repeat)
    return pred


#: neighbours of the slide k-NN probe (as the tile probe; SLPD reports a k-NN probe beside the linear one)
KNN_K = 20
#: test x training similarities the slide k-NN probe holds at a time (32 MB of float64)
KNN_CHUNK = 1 << 22


def knn_k(k: int, n_train: int) -> int:
    """The neighbours that vote: ``k``, but at most half the training slides (at least 1): with every training slide
    voting (few-shot: 8 slides, k = 20) each test slide would get the training prior -- a constant, AUC 0.5."""
    return max(1, min(int(k), n_train // 2))


def knn_probe_slides(embeddings: np.ndarray, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], *,
                     slide_ids: Sequence[str] | None = None, k: int = KNN_K, repeat: int | None = None,
                     n_classes: int | None = None) -> Predictions:
    """Cross-validated k-NN probe on slide embeddings [N, D]: each test slide's :func:`knn_k` (``k``, at most half
    the training slides) nearest training slides by cosine similarity (dot product of L2-normalised embeddings,
    brute force, a block of test slides at a time; similarities equal to 12 decimals: the earlier training slide),
    class probabilities = their vote fractions
    (unweighted, as sklearn's ``KNeighborsClassifier(metric="cosine")``: with unequal classes the arg-max leans to
    the larger class, where the linear probe is class-balanced; AUC, which ranks the vote fractions, does not). No
    fitting: scaling an embedding changes nothing."""
    X = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    _check_embeddings(X, y)
    if k < 1:
        raise GigaslideError(f"--k {k}: the k-NN probe needs at least one neighbour", fix="use --k 1 or more")
    ids = list(slide_ids) if slide_ids is not None else [str(i) for i in range(len(y))]
    n_classes = n_classes or int(y.max()) + 1
    Xn = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    probs = np.zeros((len(y), n_classes))
    fold_of = np.full(len(y), -1)
    for f, (tr, te) in enumerate(folds):
        tr, te = np.asarray(tr), np.asarray(te)
        kk = knn_k(k, len(tr))
        onehot = np.eye(n_classes)[y[tr]]  # [n_train, C]
        rows = max(1, KNN_CHUNK // max(1, len(tr)))
        for a in range(0, len(te), rows):  # a block of test slides at a time: the [n_test, n_train] similarities of
            t = te[a:a + rows]  # a cohort of 20,000 slides took 2 GB (and a full sort of each row, 2 minutes)
            # equal to 12 decimals counts as equal: the last bits of a dot product depend on the BLAS and the block
            sim = np.round(Xn[t] @ Xn[tr].T, 12)
            # the kk most similar training slides -- equal similarities: the earlier one, as a stable sort of -sim
            # takes them -- without sorting: those above the kk-th largest, then the first of those equal to it
            kth = np.partition(sim, len(tr) - kk, axis=1)[:, len(tr) - kk, None]
            above, tied = sim > kth, sim == kth
            need = kk - above.sum(1, keepdims=True)
            chosen = above | (tied & (np.cumsum(tied, axis=1) <= need))
            probs[t] = (chosen @ onehot) / kk
        fold_of[te] = f
    return _fold_predictions(ids, y, probs, fold_of, repeat)


PROBES = ("linear", "knn")


def probe_run(embeddings: dict[str, np.ndarray], labels: str | os.PathLike, out: str | os.PathLike, *,
              protocols: Sequence[str] | str = PROBES, folds: int = 5, seed: int = 0, train_slides: int | None = None,
              repeats: int = 1, C: float = 1.0, k: int = KNN_K, on_missing: str = "error",
              n_bootstrap: int = 1000) -> dict[str, dict[str, Any]]:
    """The whole slide-embedding protocol in one call (for Giga-SSL / SLPD style slide encoders): protocol -> its
    evaluation, every probe on the same folds, few-shot draws and test slides, scored alike.

    ``embeddings``: ``{slide_id: [D] vector}``; ``labels``: labels.csv. Reads and validates the
    labels, makes the stratified patient-grouped folds (saved as ``out/splits.json``), optionally
    draws ``train_slides`` training slides per fold ``repeats`` times (few-shot), fits each probe
    (``linear``: the balanced logistic regression, in ``out/``; ``knn``: :func:`knn_probe_slides`, in ``out/knn/``),
    writes ``predictions.csv`` and ``evaluation.{json,md}``, and ``out/probes.md``: one row per probe.
    """
    from gigaslide.evaluation import splits as S

    protos = [p.strip() for p in protocols.split(",") if p.strip()] if isinstance(protocols, str) else list(protocols)
    unknown = [p for p in protos if p not in PROBES]
    if unknown or not protos:
        raise GigaslideError(f"--protocol {','.join(protos)}: unknown {', '.join(unknown) or 'empty'}",
                             fix=f"use a comma-separated subset of {','.join(PROBES)}")
    table = S.read_labels(labels)
    m = S.match_features(table, list(embeddings), on_missing=on_missing)
    t = S.in_id_order(m.table)  # labels.csv's row order changes no fold, draw or prediction
    dims = {np.asarray(embeddings[s]).reshape(-1).shape[0] for s in t.slide_ids}
    if len(dims) > 1:
        raise GigaslideError(f"slide embeddings have different sizes {sorted(dims)}",
                             fix="embed every slide with the same slide encoder")
    X = np.stack([np.asarray(embeddings[s], dtype=np.float64).reshape(-1) for s in t.slide_ids])
    bad = [s for s, row in zip(t.slide_ids, X) if not np.isfinite(row).all()]
    if bad:
        raise GigaslideError(f"{len(bad)} slide embedding(s) contain NaN/inf: {S._preview(bad)}",
                             fix="the slide encoder diverged or met an empty slide: re-train or re-embed those slides")
    fold_idx = S.make_folds(t.labels, t.patient_ids, folds, seed, where=labels, class_names=t.class_names)
    out_d = atomic.ensure_writable_dir(out)
    rec = S.splits_record(t, fold_idx)
    rec["left_out"] = {"labeled_without_features": m.skipped_missing, "features_without_label": m.skipped_unlabeled}
    atomic.write_json(out_d / "splits.json", rec)
    run_folds = []  # per repeat: the (train, test) of each fold, shared by every probe
    for r in range(repeats):
        rf = []
        for f, (tr, te) in enumerate(fold_idx):
            if train_slides:
                tr = S.few_shot_draws(tr, t.labels, train_slides, repeats, seed=seed * 1000 + f)[r]
            rf.append((tr, te))
        run_folds.append(rf)
    patient_of = dict(zip(t.slide_ids, t.patient_ids)) if t.has_patients else None  # CIs over patients
    results: dict[str, dict[str, Any]] = {}
    for proto in protos:
        d = out_d if proto == "linear" else atomic.ensure_writable_dir(out_d / proto)
        if proto == "linear":
            parts = [linear_probe_slides(X, t.labels, rf, slide_ids=t.slide_ids, C=C, seed=seed, repeat=r,
                                         n_classes=t.n_classes) for r, rf in enumerate(run_folds)]
        else:
            parts = [knn_probe_slides(X, t.labels, rf, slide_ids=t.slide_ids, k=k, repeat=r, n_classes=t.n_classes)
                     for r, rf in enumerate(run_folds)]
        ids = sum((p.slide_ids for p in parts), [])
        write_predictions(d / "predictions.csv", ids, np.concatenate([p.labels for p in parts]),
                          np.concatenate([p.probs for p in parts]), np.concatenate([p.folds for p in parts]),
                          np.concatenate([p.repeats for p in parts]) if repeats > 1 else None,
                          patient_ids=None if patient_of is None else [patient_of[s] for s in ids],
                          class_names=t.class_names)
        res = evaluate_predictions(d / "predictions.csv", n_bootstrap=n_bootstrap, seed=seed, out=d)
        k_used = sorted({knn_k(k, len(tr)) for rf in run_folds for tr, _ in rf})
        res["probe"] = {"linear": {"name": "linear", "C": C}, "knn": {"name": "knn", "k": k, "k_used": k_used}}[proto]
        atomic.write_json(d / "evaluation.json", {**provenance(kind="slide_evaluation"), **res})
        atomic.write_text(d / "evaluation.md", evaluation_markdown(res, f"{_probe_label(proto, res)} probe"))
        results[proto] = res
    atomic.write_text(out_d / "probes.md", probes_markdown(results))
    return results


def probes_markdown(results: Mapping[str, Mapping[str, Any]], title: str = "Slide-embedding probes") -> str:
    """One row per probe (pooled out-of-fold metric [95 % CI]), on the same folds and slides."""
    first = next(iter(results.values()))
    over = "patients" if first.get("resampled") == "patients" else "slides"
    head = "| probe | " + " | ".join(SLIDE_METRICS) + " |\n|---|" + "---|" * len(SLIDE_METRICS) + "\n"
    rows = "".join(f"| {_probe_label(p, r)} | " + " | ".join(fmt_ci(r["metrics"][m]) for m in SLIDE_METRICS) + " |\n"
                   for p, r in results.items())
    return (f"# {title}\n\n{first['n_slides']} slides, {first['n_folds']} folds, {first['n_repeats']} repeat(s), the "
            f"same folds for every probe; 95 % bootstrap CI over {over} (B={first['n_bootstrap']})\n\n{head}{rows}")


def _probe_label(proto: str, res: Mapping[str, Any]) -> str:
    probe = res.get("probe") or {}
    used = ",".join(map(str, probe.get("k_used") or [probe.get("k")]))
    return f"k-NN (cosine, k={used})" if proto == "knn" else f"linear (C={probe.get('C')})"


def linear_probe_run(embeddings: dict[str, np.ndarray], labels: str | os.PathLike, out: str | os.PathLike, *,
                     folds: int = 5, seed: int = 0, train_slides: int | None = None, repeats: int = 1, C: float = 1.0,
                     on_missing: str = "error", n_bootstrap: int = 1000) -> dict[str, Any]:
    """:func:`probe_run` with the linear probe only; returns its evaluation."""
    return probe_run(embeddings, labels, out, protocols=("linear",), folds=folds, seed=seed,
                     train_slides=train_slides, repeats=repeats, C=C, on_missing=on_missing,
                     n_bootstrap=n_bootstrap)["linear"]

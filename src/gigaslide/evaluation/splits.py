"""Slide labels and data splits shared by every slide-level method.

``labels.csv`` has columns ``slide_id,label`` and optionally ``patient_id`` -- or ``case_id``, as CLAM's
CSVs and TCGA name it (any extra columns are ignored). Labels are integers 0..C-1, or class names (CLAM's
``normal_tissue``/``tumor_tissue``, TCGA's ``LUAD``/``LUSC``): a label column with no number in it is mapped to
0..C-1 in sorted order of the names, kept as :attr:`LabelTable.class_names` (written with the folds and the
predictions, so every report names the classes and a later run maps them the same way). Every check fails with a
:class:`GigaslideError` naming the file, the offending ids/values and the fix.

Splits: :func:`make_folds` gives stratified folds grouped by patient (sklearn
``StratifiedGroupKFold``), so no patient is in both train and test; :func:`validation_split`
carves an early-stopping validation set out of a training fold (never out of test);
:func:`few_shot_draws` gives the Giga-SSL few-shot protocol (n training slides drawn at random
from the training fold, repeated with different seeds, every class present).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import check_slide_id, is_number


@dataclass
class LabelTable:
    slide_ids: list[str]
    labels: np.ndarray  # [N] int in 0..C-1
    patient_ids: list[str]  # = slide id when the CSV has no patient_id column
    path: Path | None = None
    has_patients: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None  # [C] name of class c, sorted, when labels.csv names the classes

    @property
    def n_classes(self) -> int:
        # with names, every named class counts (a subset of slides keeps the numbering and the number of classes)
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.slide_ids)

    def subset(self, ids: list[str]) -> LabelTable:
        pos = {s: i for i, s in enumerate(self.slide_ids)}
        idx = [pos[s] for s in ids]
        return LabelTable([self.slide_ids[i] for i in idx], self.labels[idx],
                          [self.patient_ids[i] for i in idx], self.path, self.has_patients,
                          class_names=self.class_names)


def id_key(slide_id: str) -> tuple[list[Any], str]:
    """Sort key of a slide id: its digit runs as numbers (``s2`` before ``s10``; TCGA and CLAM ids keep their order),
    ties (``s01`` / ``s1``) by the text."""
    return [int(x) if x.isdecimal() else x for x in re.split(r"(\d+)", slide_id)], slide_id


def in_id_order(table: LabelTable) -> LabelTable:
    """``table`` with its slides in :func:`id_key` order: folds, few-shot draws, training order and prediction files
    made from it do not depend on the order of labels.csv's rows."""
    return table.subset(sorted(table.slide_ids, key=id_key))


def _preview(items: list[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


@contextlib.contextmanager
def utf8_or_error(path: str | os.PathLike) -> Iterator[None]:
    """A CSV read inside this block that is not UTF-8 (Excel's cp1252 / Latin-1: ``José``) is one line naming the
    file and the byte, not a UnicodeDecodeError traceback."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise GigaslideError(f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})", path=path,
                             fix="save the CSV as UTF-8 (Excel: CSV UTF-8)") from None


def read_labels(path: str | os.PathLike, *, min_classes: int = 2) -> LabelTable:
    """Read and validate ``labels.csv`` (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("labels file not found", path=p, fix="pass a CSV with columns slide_id,patient_id,label")
    with open(p, newline="", encoding="utf-8-sig") as f, utf8_or_error(p):
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        rows, lines = [], []  # lines: each row's line in the file (csv skips blank lines)
        for r in reader:
            if None in r:  # csv puts the fields beyond the header's under the key None, as a list
                raise GigaslideError(f"line {reader.line_num} has {len(cols) + len(r[None])} fields, the header "
                                     f"{len(cols)} ({', '.join(cols)})", path=p,
                                     fix="quote values that contain commas, or add the extra columns to the header")
            rows.append({k.strip(): (v or "").strip() for k, v in r.items()})
            lines.append(reader.line_num)
    missing_cols = [c for c in ("slide_id", "label") if c not in cols]
    if missing_cols:
        raise GigaslideError(f"missing column(s) {', '.join(missing_cols)} (found: {', '.join(cols) or 'none'})", path=p,
                             fix="the header must be slide_id,patient_id,label (patient_id optional)")
    if not rows:
        raise GigaslideError("labels file has no rows", path=p, fix="add one row per slide")
    # CLAM / TCGA CSVs (case_id,slide_id,label) name the patient case_id: ignoring it split a case's slides between
    # training and test folds
    pat_col = "patient_id" if "patient_id" in cols else ("case_id" if "case_id" in cols else None)
    has_pat = pat_col is not None
    ids = [r["slide_id"] for r in rows]
    empty = [str(line) for line, s in zip(lines, ids) if not s]
    if empty:
        raise GigaslideError(f"empty slide_id on line(s) {_preview(empty)}", path=p, fix="give every row a slide_id")
    for s in ids:  # ids become file names (canvas caches, heatmaps, predictions): no '../', separators, NULs
        check_slide_id(s, path=p)
    dup = [s for s, c in Counter(ids).items() if c > 1]
    if dup:
        raise GigaslideError(f"duplicate slide_id(s): {_preview(dup)}", path=p, fix="keep one row per slide")
    labels, names = _parse_labels(rows, p)
    y = np.asarray(labels, dtype=np.int64)
    classes = np.unique(y)
    if len(classes) < min_classes:
        shown = ", ".join(f"{c} = {names[c]}" if names else str(c) for c in classes)
        raise GigaslideError(f"only {len(classes)} class present (label {shown}); "
                             f"{len(ids)} slides", path=p, fix="a classifier needs slides of at least two classes")
    if names is None and not np.array_equal(classes, np.arange(len(classes))):
        raise GigaslideError(f"labels are {classes.tolist()}, not 0..{len(classes) - 1}", path=p,
                             fix="renumber the classes as consecutive integers starting at 0")
    pats = [r.get(pat_col) or r["slide_id"] for r in rows] if pat_col else list(ids)
    return LabelTable(ids, y, pats, p, has_pat, class_names=names)


_MISSING = {"", "na", "n/a", "nan", "none", "null"}  # casefolded spellings of a missing value


def _parse_labels(rows: list[dict[str, str]], p: Path) -> tuple[list[int], list[str] | None]:
    """The label column as integers 0..C-1, and the class names (sorted) when it holds names (else None)."""
    values = [r["label"] for r in rows]
    empty = [f"{r['slide_id']}={r['label']!r}" for r in rows if r["label"].casefold() in _MISSING]
    if empty:  # (pandas / R write a missing value as NA or nan: it would have been a class of its own)
        raise GigaslideError(f"missing label on slide(s) {_preview(empty)}", path=p,
                             fix="give every row a label (or remove the rows of unlabelled slides)")
    numeric = [is_number(v) for v in values]
    if not any(numeric):  # class names: sorted -> 0..C-1
        names = sorted(set(values))
        norm: dict[str, list[str]] = {}
        for n in names:
            norm.setdefault(" ".join(n.split()).casefold(), []).append(n)
        clash = [" / ".join(repr(x) for x in v) for v in norm.values() if len(v) > 1]
        if clash:
            raise GigaslideError(f"class names that differ only by case or spaces: {_preview(clash)}", path=p,
                                 fix="spell each class one way in the label column")
        code = {n: i for i, n in enumerate(names)}
        return [code[v] for v in values], names
    if not all(numeric):
        named = [f"{r['slide_id']}={r['label']!r}" for r, ok in zip(rows, numeric) if not ok]
        nums = [f"{r['slide_id']}={r['label']!r}" for r, ok in zip(rows, numeric) if ok]
        raise GigaslideError(f"label column mixes numbers ({_preview(nums, 2)}) and non-numeric class names "
                             f"({_preview(named, 3)})", path=p,
                             fix="use class names on every row, or integers 0..C-1 on every row")
    labels: list[int] = []
    bad: list[str] = []
    for r in rows:
        v = r["label"]
        try:
            fv = float(v)
            if not np.isfinite(fv) or fv != int(fv) or fv < 0:
                raise ValueError
            labels.append(int(fv))
        except ValueError:
            bad.append(f"{r['slide_id']}={v!r}")
    if bad:
        raise GigaslideError(f"non-numeric or invalid label(s): {_preview(bad)}", path=p,
                             fix="labels must be integers 0..C-1 or class names (one spelling per class)")
    return labels, None


@dataclass
class Matched:
    table: LabelTable
    skipped_unlabeled: list[str]  # feature files without a label row
    skipped_missing: list[str]  # label rows without a feature file

    def report(self) -> str:
        parts = []
        if self.skipped_missing:
            parts.append(f"{len(self.skipped_missing)} labeled slide(s) have no features: {_preview(self.skipped_missing)}")
        if self.skipped_unlabeled:
            parts.append(f"{len(self.skipped_unlabeled)} feature file(s) have no label: {_preview(self.skipped_unlabeled)}")
        return "; ".join(parts)


def match_features(table: LabelTable, feature_ids: list[str] | set[str], *, on_missing: str = "error",
                   features_dir: str | os.PathLike | None = None) -> Matched:
    """Intersect labels and feature files. ``on_missing="error"`` refuses any mismatch; ``"skip"``
    keeps the intersection and lists what was left out (callers write it into the run)."""
    feats = set(feature_ids)
    missing = [s for s in table.slide_ids if s not in feats]
    unlabeled = sorted(feats - set(table.slide_ids))
    m = Matched(table, unlabeled, missing)
    stems = [s for s in missing if Path(s).suffix and Path(s).stem in feats]
    if stems:  # CLAM's process lists keep the slide's extension (TCGA-...svs); feature files are named without it
        raise GigaslideError(f"{len(stems)} slide_id(s) name a feature file once their extension is dropped "
                             f"({stems[0]} -> {Path(stems[0]).stem}.h5)", path=table.path,
                             fix="write slide_id without the slide file's extension (e.g. s1, not s1.svs)")
    if (missing or unlabeled) and on_missing != "skip":
        raise GigaslideError(m.report(), path=table.path if missing else features_dir,
                             fix="make labels.csv and the features folder list the same slides, "
                                 "or pass --on-missing skip to use the slides present in both")
    keep = [s for s in table.slide_ids if s in feats]
    if not keep:
        raise GigaslideError("no slide has both a label and features", path=table.path,
                             fix="check that slide_id values match the feature file names (without .h5)")
    sub = table.subset(keep)
    if len(np.unique(sub.labels)) < 2:
        raise GigaslideError("after matching labels to features only one class is left", path=table.path,
                             fix="encode slides of every class")
    m.table = sub
    return m


def _groups_as_int(groups: list[str] | np.ndarray) -> np.ndarray:
    _, inv = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return inv


def make_folds(labels: np.ndarray, groups: list[str] | np.ndarray | None, n_folds: int, seed: int = 0,
               where: str | os.PathLike | None = None,
               class_names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped ``(train_idx, test_idx)`` folds, fixed by ``seed`` (``class_names``: for the
    messages)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    g = _groups_as_int(groups if groups is not None else np.arange(len(y)).astype(str))
    if n_folds < 2:
        raise GigaslideError(f"--folds {n_folds}: need at least 2 folds", fix="use --folds 2 or more")
    counts = Counter(zip(g.tolist(), y.tolist()))
    per_class_groups = Counter(c for (_, c) in counts)
    smallest = min(per_class_groups.values())
    if smallest < n_folds:
        cls = min(per_class_groups, key=per_class_groups.get)
        cls = f"{cls} ({class_names[cls]})" if class_names and 0 <= cls < len(class_names) else cls
        fix = (f"use --folds {smallest} or fewer, or add slides of class {cls}" if smallest >= 2 else
               f"cross-validation needs at least 2 patients/slides per class: add slides of class {cls}")
        raise GigaslideError(f"class {cls} has only {smallest} patient(s)/slide(s), fewer than --folds {n_folds}",
                             path=where, fix=fix)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = [(np.sort(tr), np.sort(te)) for tr, te in sgkf.split(np.zeros(len(y)), y, g)]
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
    return folds


def validation_split(idx: np.ndarray, labels: np.ndarray, groups: list[str] | np.ndarray | None, *,
                     fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices ``idx`` into (train, val), stratified and patient-grouped.

    With few patients the split takes more than ``fraction`` (1 / the number of patients of the rarest class); it
    is never ungrouped: the validation set is empty when some class has fewer than two slides or fewer than two
    patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    idx = np.asarray(idx)
    y = np.asarray(labels)[idx]
    g = _groups_as_int(np.asarray(groups)[idx] if groups is not None else idx.astype(str))
    if fraction <= 0 or min(Counter(y.tolist()).values()) < 2:
        return idx, idx[:0]
    k = max(2, round(1 / fraction))
    n_groups_min = min(len(set(g[y == c])) for c in np.unique(y))
    k = min(k, n_groups_min)
    if k < 2:
        return idx, idx[:0]
    tr, va = next(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, g))
    return np.sort(idx[tr]), np.sort(idx[va])


def few_shot_draws(idx: np.ndarray, labels: np.ndarray, n: int, repeats: int, seed: int = 0) -> list[np.ndarray]:
    """``repeats`` random draws of ``n`` indices from ``idx`` (each with every class present)."""
    idx = np.asarray(idx)
    y = np.asarray(labels)[idx]
    classes = np.unique(y)
    if n >= len(idx):
        return [np.sort(idx) for _ in range(repeats)]
    if n < len(classes):
        raise GigaslideError(f"--train-slides {n} is smaller than the number of classes ({len(classes)})",
                             fix=f"use --train-slides {len(classes)} or more")
    draws = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        first = [rng.choice(idx[y == c]) for c in classes]  # one per class, then the rest at random
        rest = rng.permutation(np.setdiff1d(idx, first))[: n - len(first)]
        draws.append(np.sort(np.concatenate([first, rest])))
    return draws


def splits_record(table: LabelTable, folds: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """JSON-able record of the folds by slide id (saved with every run)."""
    ids = table.slide_ids
    rec: dict[str, Any] = {"n_folds": len(folds),
                           "folds": [{"train": [ids[i] for i in tr], "test": [ids[i] for i in te]} for tr, te in folds]}
    if table.class_names:  # label c of the folds' predictions is class_names[c]
        rec["class_names"] = list(table.class_names)
    return rec

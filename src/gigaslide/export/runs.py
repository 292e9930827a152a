"""Training runs as the viewer and the exports see them: slide predictions and per-tile scores.

A MIL run (``gigaslide train-mil``) holds ``fold*/model.safetensors`` + ``config.json`` and
``predictions.csv`` (each slide's held-out prediction and the fold that tested it). Per-tile scores
are recomputed from a slide's features with the fold's model through the public
:func:`gigaslide.mil.train.load_model` / :func:`~gigaslide.mil.train.predict`:

* ``attention``: the model's ``instance_scores`` (attention for attention models, the tile's logit
  margin for mean / max pooling) and its percentile within the slide (CLAM-style display);
* ``probability``: P(class) of the tile alone, i.e. the model applied to a one-tile bag.

A StreamingCLAM run (``gigaslide train-streaming``) contributes its slide predictions, and the
attention grids ``gigaslide heatmap-streaming`` saved in ``RUN/heatmaps`` (a full CNN pass per slide:
never recomputed here). A slide-SSL run (``gigaslide pretrain-slides``: kind ``slpd`` / ``gigassl``)
contributes per-tile cluster ids (:mod:`gigaslide.ssl.slide.assign`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide.errors import GigaslideError
from gigaslide.evaluation.slides import read_predictions
from gigaslide.export.once import Once
from gigaslide.mil.heatmap import percentile
from gigaslide.mil.train import check_features_fit, load_model, predict
from gigaslide.runs import keeps_caller_rng
from gigaslide.ssl.slide.export import KINDS as SSL_KINDS


@dataclass
class Run:
    path: Path
    name: str
    kind: str  # "mil", "streaming", "slpd", "gigassl" or "predictions"
    folds: list[str] = field(default_factory=list)  # fold folders holding a model
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)  # slide_id -> label, probs, fold
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def held_out_fold(self, slide_id: str) -> str | None:
        """The fold that tested ``slide_id`` (repeat 0), if that fold has a model."""
        p = self.predictions.get(slide_id)
        if p is not None and f"fold{p['fold']}" in self.folds:
            return f"fold{p['fold']}"
        return None

    @property
    def class_names(self) -> list[str] | None:
        """The classes' names of a run trained on a labels.csv of class names (label c = class_names[c]), else None."""
        names = self.meta.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) and names else None

    def class_label(self, c: int) -> str:
        """``tumor`` for a run with class names, else ``class 1``: how exports and the viewer name class ``c``."""
        names = self.class_names
        return names[c] if names is not None and 0 <= c < len(names) else f"class {c}"

    @property
    def model(self) -> str | None:
        return self.meta.get("model") or (self.meta.get("train_config") or {}).get("model")

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "folds": self.folds,
                "model": self.model, "encoder": self.meta.get("encoder"), "problems": self.problems}


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read a run folder; a run without predictions or models is still listed, with its problems."""
    p = Path(path)
    if not p.is_dir():
        raise GigaslideError("run folder not found", path=p, fix="pass the --out folder of a training run to --runs")
    run = Run(p, name or p.name, "predictions")
    if (p / "run.json").is_file():
        try:
            run.meta = json.loads((p / "run.json").read_text())
        except (OSError, ValueError):
            run.problems.append(f"{p / 'run.json'}: unreadable")
    run.folds = sorted((f.name for f in p.glob("fold*") if (f / "model.safetensors").is_file() and (f / "config.json").is_file()
                        and "_r" not in f.name), key=lambda s: int(s[4:]) if s[4:].isdigit() else 10**6)
    if run.folds:
        run.kind = "mil"
        try:  # the fold's model config (mil.train.save_model) names model, encoder, in_dim, n_classes
            run.meta = {**run.meta, **json.loads((p / run.folds[0] / "config.json").read_text())}
        except (OSError, ValueError):
            run.problems.append(f"{p / run.folds[0] / 'config.json'}: unreadable")
    elif run.meta.get("run_kind") == "streaming" or list(p.glob("fold*/best.safetensors")):
        run.kind = "streaming"
        if not [g for g in p.glob("heatmaps/fold*/*.npz") if not g.name.startswith(".")]:  # not a killed write's
            run.problems.append("StreamingCLAM run without attention grids: run `gigaslide heatmap-streaming SLIDE "
                                f"--run {p} --fold K --out PNG` for the slides to show its attention")
    elif run.meta.get("run_kind") in SSL_KINDS:
        run.kind = run.meta["run_kind"]
        if not (p / "model.safetensors").is_file():
            run.problems.append("no model.safetensors: pre-training did not finish (re-run the same `gigaslide "
                                "pretrain-slides` command: it resumes and exports)")
        return run
    try:
        pred = read_predictions(p)
        if pred.class_names and not run.meta.get("class_names"):  # a predictions-only folder names them itself
            run.meta["class_names"] = list(pred.class_names)
        for i, sid in enumerate(pred.slide_ids):
            if int(pred.repeats[i]) == 0:
                run.predictions[sid] = {"label": int(pred.labels[i]), "probs": [float(v) for v in pred.probs[i]],
                                        "fold": int(pred.folds[i])}
    except GigaslideError as e:
        run.problems.append(f"no predictions ({e.what})")
    feats = _features_path(run.meta)
    if feats and not Path(feats).exists():
        run.problems.append(f"its features folder {feats} is gone: tile scores come from the viewer's OUT_DIR features")
    if run.kind == "predictions" and not run.predictions:
        run.problems.append("neither models (fold*/model.safetensors) nor predictions.csv: not a finished training run")
    return run


def _features_path(meta: dict[str, Any]) -> str | None:
    """The features folder a run was trained on, wherever its run.json records it: the input's absolute path first
    (the option as typed may be relative to the folder the run was started in, so looked up from another it seemed
    gone)."""
    inp = (meta.get("inputs") or {}).get("features")
    if isinstance(inp, dict) and isinstance(inp.get("path"), str):
        return inp["path"]
    for d in (meta, meta.get("config") or {}):
        if isinstance(d.get("features"), str):
            return d["features"]
    return None


def load_runs(paths: list[str | os.PathLike], problems: list[str] | None = None) -> list[Run]:
    """Several runs with unique names (``parent/name`` when two folders share a name). With ``problems``,
    a folder that is not a run is reported there and left out; without it, the error is raised."""
    runs = []
    for p in paths:
        try:
            runs.append(load_run(p))
        except GigaslideError as e:
            if problems is None:
                raise
            problems.append(e.one_line())
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    return runs


class TileScorer:
    """Per-tile scores of MIL folds, computed once per (fold, slide) and kept (thread-safe)."""

    def __init__(self) -> None:
        self._models = Once()
        self._scores = Once()

    def model(self, fold_dir: Path) -> tuple[Any, dict[str, Any]]:
        return self._models.get(fold_dir, keeps_caller_rng(lambda: load_model(fold_dir)))

    def _check(self, meta: dict[str, Any], ff: Any, fold_dir: Path) -> None:
        check_features_fit(meta, ff, fold_dir, fix="view the run with the OUT_DIR whose encoder it was trained on")
        if len(ff) == 0:
            raise GigaslideError("the slide has no tiles", path=ff.path, fix="re-tile the slide")

    def scores(self, run: Run, fold: str, ff: Any, kind: str) -> np.ndarray:
        """``attention`` [N] raw scores, ``attention_pct`` [N] percentiles, ``probability`` [N, C] per tile alone,
        ``slide_probs`` [C] of the whole bag."""
        if fold not in run.folds:
            raise GigaslideError(f"run has no model for {fold}", path=run.path, fix=f"choose one of {', '.join(run.folds)}")
        fold_dir = run.path / fold
        group = "probability" if kind == "probability" else "bag"
        if group == "bag" and kind not in ("attention", "attention_pct", "slide_probs"):
            raise ValueError(kind)

        def make() -> dict[str, np.ndarray]:
            model, meta = self.model(fold_dir)
            self._check(meta, ff, fold_dir)
            bag = torch.from_numpy(np.asarray(ff.features, np.float32))
            cells = ff.grid_cells()
            if group == "probability":
                probs, _ = predict(model, [bag[i:i + 1] for i in range(len(bag))],
                                   cells=[None if cells is None else cells[i:i + 1] for i in range(len(bag))])
                return {"probability": probs}
            probs, scores = predict(model, [bag], cells=[cells])
            raw = np.asarray(scores[0], np.float64).reshape(-1)
            return {"attention": raw, "attention_pct": percentile(raw), "slide_probs": probs[0]}

        return self._scores.get((fold_dir, str(ff.path), group), make)[kind]

    def forget(self, ff: Any) -> None:
        """Drop the scores kept for the slide of feature file ``ff`` (an export that has written its rows: kept,
        every slide's scores grew with the cohort, tens of bytes a tile per run)."""
        self._scores.forget(lambda key: key[1] != str(ff.path))



"""Cross-validated MIL training run: labels + feature folder -> RUN_DIR.

Layout of RUN_DIR::

    run.json            identity, config, input fingerprints, provenance (encoder, weights, mpp), slides left out
    splits.json         test folds by slide id (+ train/val/few-shot slides per fold and repeat)
    fold{k}/            repeat 0 of fold k; fold{k}_r{r}/ for further few-shot repeats
        model.safetensors, config.json, history.json, predictions.csv, attention.h5
    predictions.csv     all test predictions (the contract of gigaslide.evaluation.slides)
    evaluation.json/.md AUC / balanced accuracy with bootstrap CIs

The run stands on :mod:`gigaslide.runs`: its identity (training config, folds, few-shot draws and the
content of the features folder and labels file) must match to resume; finished folds are recorded in
``run.json`` (``folds_done``) after their files are written atomically, so an interrupted run retrains
only unfinished folds — deterministically, so the result is the same as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide import atomic, runs
from gigaslide.provenance import provenance
from gigaslide.errors import GigaslideError
from gigaslide.evaluation import splits as S
from gigaslide.evaluation.slides import evaluate_predictions, pool_predictions, read_predictions, write_predictions
from gigaslide.mil.bags import Bags, budget_note, resolve_budget
from gigaslide.mil.models import arch_version
from gigaslide.mil.train import TrainConfig, load_model, predict, save_model, train_fold


def load_bags(features: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{slide_id: FeatureFile}`` (one encoder, one dim) and shared metadata; refuses empty bags. Coordinates and
    attributes only: each slide's features are read when its bag is used (:class:`gigaslide.mil.bags.Bags`)."""
    from gigaslide.features import store

    files = store.load_dir(features, arrays=False)  # names every unreadable file in one line
    empty = sorted(s for s, ff in files.items() if len(ff) == 0)
    if empty:
        raise GigaslideError(f"{len(empty)} slide(s) have no tiles (empty bag): {S._preview(empty)}",
                             path=features, fix="re-tile those slides (tissue not found?) or remove their .h5 files")
    first = next(iter(files.values()))
    prov = first.provenance
    meta = {"encoder": first.encoder, "in_dim": first.dim, "mpp": first.mpp, "tile_size_level0": first.tile_size_level0,
            "tile_size": prov.tile_size, "encoder_weights_sha256": prov.encoder_weights_sha256}
    return files, meta


def _fold_dirname(k: int, r: int) -> str:
    return f"fold{k}" if r == 0 else f"fold{k}_r{r}"


def _train_val_parts(fold_idx: list[tuple[np.ndarray, np.ndarray]], t: Any, train_slides: int | None, repeats: int,
                     val_fraction: float, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """(train, validation) indices per fold and repeat. The validation split (stratified, patient-grouped) is carved
    from each fold's training slides -- from the drawn slides in few-shot runs, which then train on fewer than N.
    One protocol for the whole run: where some draw cannot give a validation split (a class with one slide in
    it), no draw gets one, and every model trains on all its N slides for ``epochs`` epochs, keeping the last (a
    run mixing early-stopped and last-epoch models, on N and on N/2 slides, would average two protocols)."""
    draws = [S.few_shot_draws(tr_all, t.labels, train_slides, repeats, seed=seed * 1000 + k) if train_slides
             else [tr_all] * repeats for k, (tr_all, _) in enumerate(fold_idx)]
    out = [[S.validation_split(d, t.labels, t.patient_ids, fraction=val_fraction, seed=seed + r)
            for r, d in enumerate(fold)] for fold in draws]
    if train_slides and any(len(va) == 0 for fold in out for _, va in fold):
        return [[(d, d[:0]) for d in fold] for fold in draws]
    return out


def run_cv(features: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike, *,
           cfg: TrainConfig | None = None, folds: int = 5, train_slides: int | None = None, repeats: int = 1,
           on_missing: str = "error", val_fraction: float = 0.2, n_bootstrap: int = 1000,
           bag_memory_gb: float | str | None = "auto", verbose: bool = True,
           fold_seed: int | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` with stratified, patient-grouped ``folds``-fold CV; returns the evaluation. The slides are
    taken in order of their ids (:func:`~gigaslide.evaluation.splits.id_key`): the order of labels.csv's rows changes
    no fold, draw or prediction.

    ``bag_memory_gb``: memory the slides' features may take (:class:`~gigaslide.mil.bags.Bags`; ``auto``: half of
    what is available); bags beyond it are read from their files at every use. It does not change the result.
    ``fold_seed``: seed of the folds (default ``cfg.seed``); fix it to train several seeds on the same folds.
    ``train_slides`` (few-shot): each of ``repeats`` draws of that many slides from a training fold trains a model; see
    :func:`_train_val_parts` for its validation split."""
    cfg = cfg or TrainConfig()
    out_d = atomic.ensure_writable_dir(out)  # (its stale temporaries: cleaned by open_run, under the run's lock)
    table = S.read_labels(labels)
    files, meta = load_bags(features)
    matched = S.match_features(table, list(files), on_missing=on_missing, features_dir=features)
    if matched.report() and verbose:
        print(f"warning: {matched.report()} (left out; listed in {out_d / 'run.json'})")
    t = matched.table
    ordered = S.in_id_order(t)  # labels.csv's row order changes no fold, draw or prediction
    in_order, t = ordered.slide_ids == t.slide_ids, ordered
    fold_seed = cfg.seed if fold_seed is None else int(fold_seed)
    fold_idx = S.make_folds(t.labels, t.patient_ids, folds, fold_seed, where=labels, class_names=t.class_names)
    n_classes = t.n_classes
    bags = Bags([files[s] for s in t.slide_ids], resolve_budget(bag_memory_gb))
    if verbose:
        print(budget_note(bags))
    identity = {"train_config": {k: v for k, v in asdict(cfg).items() if k != "device"}, "folds": folds,
                "train_slides": train_slides, "repeats": repeats, "val_fraction": val_fraction, "on_missing": on_missing}
    if train_slides:  # few-shot runs recorded before this rule could validate some draws and not others
        identity["few_shot_validation"] = "all draws or none"
    if not in_order:  # (absent for a labels.csv in id order: its runs, recorded before the ids were ordered, resume)
        identity["slide_order"] = "ids"
    if fold_seed != cfg.seed:  # (absent otherwise: runs recorded before fold_seed existed still resume)
        identity["fold_seed"] = fold_seed
    arch = arch_version(cfg.model, cfg.model_kwargs)
    if arch != 1:  # (absent for version 1: the runs recorded before versions existed)
        identity["model_arch"] = arch
    run = runs.open_run(out_d, "mil", identity, {**identity, "features": str(features), "labels": str(labels)},
                        seed=cfg.seed, inputs={"features": features, "labels": labels},
                        provenance={k: v for k, v in meta.items() if v is not None})
    run.update(n_classes=n_classes, encoder=meta["encoder"], in_dim=meta["in_dim"],
               **({} if t.class_names is None else {"class_names": t.class_names}),  # label c = class_names[c]
               left_out={"labeled_without_features": matched.skipped_missing,
                         "features_without_label": matched.skipped_unlabeled})
    for fd in out_d.glob("fold*"):  # a killed fold's temporaries (safe: the run's lock keeps other writers out)
        if fd.is_dir():
            atomic.clean_stale_tmp(fd)
    done = set(run.record.get("folds_done", []))
    pred_record = {k: v for k, v in meta.items() if k in ("encoder", "encoder_weights_sha256", "mpp", "tile_size")}
    pred_record.update(seed=cfg.seed, run=str(out_d), model=cfg.model)
    if fold_seed != cfg.seed:  # the folds' own seed: the record named only cfg.seed, which did not draw them
        pred_record["fold_seed"] = fold_seed
    if cfg.model_kwargs:  # (TransMIL's layout, CLAM's k_sample ...: another model than the name alone says)
        pred_record["model_args"] = dict(cfg.model_kwargs)
    rec = S.splits_record(t, fold_idx)
    rec["per_fold"] = {}
    ids = t.slide_ids
    parts = _train_val_parts(fold_idx, t, train_slides, repeats, val_fraction, cfg.seed)
    todo = {name for name in (_fold_dirname(k, r) for k in range(len(fold_idx)) for r in range(len(parts[k])))
            if name not in done or not _fold_intact(out_d / name)}
    if todo:  # a damaged or NaN bag is refused before training, not when a fold reaches its test slides
        bags.verify()
    for k, (_, te) in enumerate(fold_idx):
        for r, (tr, va) in enumerate(parts[k]):
            name = _fold_dirname(k, r)
            rec["per_fold"][name] = {"train": [ids[i] for i in tr], "val": [ids[i] for i in va],
                                     "test": [ids[i] for i in te]}
            fd = out_d / name
            if name not in todo:
                continue
            model, info = train_fold(bags.take(tr), t.labels[tr], bags.take(va), t.labels[va], meta["in_dim"], n_classes,
                                     cfg)
            probs, scores = predict(model, bags.take(te))
            save_model(fd, model, cfg, in_dim=meta["in_dim"], n_classes=n_classes,
                       extra={k2: v for k2, v in {**meta, "fold": k, "repeat": r,
                                                         "class_names": t.class_names}.items() if v is not None})
            atomic.write_json(fd / "history.json", info)
            with atomic.atomic_path(fd / "attention.h5", suffix=".h5") as tmp:
                with h5py.File(tmp, "w") as f:
                    for i, sc in zip(te, scores):
                        g = f.create_group(ids[i])
                        g.create_dataset("scores", data=sc.astype(np.float32))
                        g.create_dataset("coords", data=files[ids[i]].coords)
                        size0 = files[ids[i]].tile_size_level0  # per slide: scans of other resolutions differ
                        if size0:
                            g.attrs["tile_size_level0"] = float(size0)
            write_predictions(fd / "predictions.csv", [ids[i] for i in te], t.labels[te], probs, k,
                              r if repeats > 1 else None, record=pred_record,
                              patient_ids=[t.patient_ids[i] for i in te] if t.has_patients else None,
                              class_names=t.class_names)
            done.add(name)
            run.update(folds_done=sorted(done))
            if verbose:
                print(f"{name}: {len(tr)} train / {len(va)} val / {len(te)} test slides, "
                      f"best epoch {info['best_epoch']} of {info['epochs_run']}, {info['seconds']:.1f}s")
    atomic.write_json(out_d / "splits.json", rec)
    pool_predictions([out_d / _fold_dirname(k, r) / "predictions.csv" for k in range(len(fold_idx))
                      for r in range(repeats)], out_d / "predictions.csv", record=pred_record,
                     patients=dict(zip(ids, t.patient_ids)) if t.has_patients else None,  # CIs over patients
                     class_names=t.class_names)
    res = evaluate_predictions(out_d / "predictions.csv", n_bootstrap=n_bootstrap, seed=cfg.seed, out=out_d)
    res["seconds_per_fold"] = fold_seconds(out_d)
    atomic.write_json(out_d / "evaluation.json", {**provenance(kind="slide_evaluation"), **res})
    run.update(bags=bags.stats())
    run.finish(auc=res["metrics"]["auc"]["value"], balanced_accuracy=res["metrics"]["balanced_accuracy"]["value"])
    return res


def _fold_intact(fd: Path) -> bool:
    """A finished fold whose model and predictions still load (else it is retrained: deterministic, same result)."""
    try:
        load_model(fd)
        read_predictions(fd / "predictions.csv")
    except Exception:  # noqa: BLE001 - any damage (truncated, garbage, missing) means: redo this fold
        return False
    return True


def fold_seconds(out_d: Path) -> list[float | None]:
    """Training time of each finished fold; None for a history.json that is unreadable (damaged by another tool)."""
    out: list[float | None] = []
    for h in sorted(out_d.glob("fold*/history.json")):
        try:
            out.append(float(json.loads(h.read_text())["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            out.append(None)
    return out

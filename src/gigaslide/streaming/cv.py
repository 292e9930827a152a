"""Cross-validated StreamingCLAM runs on the run layer (:mod:`gigaslide.runs`).

``run_training(slides, labels, out, cfg)``: one run folder (``run.json`` with the identity: every option
except the memory-only ones, plus the content of slides, labels and weights), canvases cached in
``OUT/canvases``, stratified patient-grouped folds (``splits.json``), per fold a validation split inside
the training slides, ``fold<k>/best.safetensors`` and ``fold<k>/predictions.csv``, then the pooled
out-of-fold evaluation (``predictions.csv``, ``evaluation.json``) by :mod:`gigaslide.evaluation.slides`.
A re-run resumes (finished folds skipped, the current fold from its last checkpoint); a run folder
with other settings -- e.g. another ``--pool-kernel`` -- is refused, naming the option.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic, runs
from gigaslide.devices import PrecisionChoice, autocast_dtype, choose_precision, pick_device
from gigaslide.encoders.model import EXPORT_SPEC, EXPORT_WEIGHTS
from gigaslide.errors import GigaslideError
from gigaslide.evaluation.slides import evaluate_predictions, read_predictions, write_predictions
from gigaslide.evaluation.splits import make_folds, read_labels, splits_record, validation_split
from gigaslide.slides import by_slide_id, find_slides
from gigaslide.streaming.data import Canvas, cached_canvas
from gigaslide.streaming.train import MEMORY_ONLY, TrainConfig, build_model, evaluate, load_weights, train_fold
from gigaslide.tiling.tissue import check_background


def weights_input(cfg: TrainConfig) -> str | None:
    """The weights file or folder a run depends on (fingerprinted into its identity), if any."""
    for cand in (cfg.weights, cfg.encoder):
        if cand not in (None, "default", "random") and Path(cand).exists():
            return str(Path(cand) / EXPORT_WEIGHTS) if (Path(cand) / EXPORT_SPEC).is_file() else str(cand)
    return None


def _precision(run: runs.Run, model: Any, canvas: Canvas, cfg: TrainConfig, device: torch.device) -> PrecisionChoice:
    """The precision of this run: resolved once (training: no forward probe, so ``auto`` is fp32 on CPU, see
    :mod:`gigaslide.devices`) and reused on resume, so a resumed run computes exactly as the first invocation did."""
    old = run.record.get("precision")
    if isinstance(old, dict) and old.get("requested") == cfg.precision:
        return PrecisionChoice(old["requested"], old["resolved"], old.get("bf16_cosine"))
    choice = choose_precision(device, cfg.precision)
    run.update(precision=choice.record())
    return choice


def _check_slides(paths: list[Any], cfg: TrainConfig) -> None:
    """Refuse a slide that cannot be opened or read at ``cfg.mpp`` (no resolution: the fix is ``--slide-mpp``), before
    the run folder is made (cheap: the metadata only; the canvases are read later)."""
    from gigaslide.slides import open_slide

    for p in paths:
        with open_slide(p, mpp=cfg.slide_mpp) as slide:
            slide.check_target_mpp(cfg.mpp)


def run_training(slides: str, labels: str, out: str, cfg: TrainConfig, log: Any = print,
                 background: str = "auto") -> dict[str, Any]:
    """Cross-validated StreamingCLAM training; returns the pooled evaluation (AUC, balanced accuracy with CIs),
    or ``{"stopped": reason}`` after a clean stop (SIGTERM, Ctrl-C, ``budget``). ``background``: the slides'
    background (``auto``: detected; ``bright`` or ``dark`` forced, as ``tile --background``), recorded in run.json
    (``config``; and in the identity when forced, so runs made before the option resume at ``auto``).
    The caller's global RNG streams are given back afterwards (:func:`gigaslide.runs.isolated_rng`)."""
    with runs.isolated_rng():
        return _run_training(slides, labels, out, cfg, log, background)


def _run_training(slides: str, labels: str, out: str, cfg: TrainConfig, log: Any, background: str) -> dict[str, Any]:
    check_background(background)
    if cfg.patience < 1:  # patience 0 stops before the first epoch: no model to test (a FileNotFoundError traceback)
        raise GigaslideError(f"--patience {cfg.patience} must be >= 1 (epochs without a better validation loss)",
                             fix="use e.g. --patience 10 (or --patience larger than --epochs: never stop early)")
    table = read_labels(labels)
    paths: dict[str, Any] = {}
    labelled = set(table.slide_ids)
    for p, sid, taken in by_slide_id(find_slides([slides])):
        if taken is not None and sid in labelled:  # which of the two files would be trained on is arbitrary
            raise GigaslideError(f"two slides in {slides} have the labelled slide id '{sid}': {paths[sid]} and {p}",
                                 path=p, fix="rename or move one of them (slide ids come from file names)")
        paths.setdefault(sid, p)
    missing = [s for s in table.slide_ids if s not in paths]
    if missing:
        raise GigaslideError(f"{len(missing)} labelled slide(s) not found in {slides} (e.g. {missing[0]})", path=labels,
                             fix="check --slides and the slide_id column (file name without extension)")
    device = pick_device(cfg.device)
    probe_model = build_model(cfg, table.n_classes, torch.device("cpu"))  # refuses bad encoders/weights/tiles early
    y = table.labels.astype(int)
    groups = table.patient_ids if table.has_patients else None
    # everything that can refuse the labels or the slides does so before the run folder is made: a folder left by a
    # refused run pinned its options and inputs, so following the error's fix (--slide-mpp, more slides of a class)
    # on the same --out was refused as 'another run'
    folds = make_folds(y, groups, cfg.folds, cfg.seed, where=labels, class_names=table.class_names)
    _check_slides([paths[s] for s in table.slide_ids], cfg)
    identity = {k: v for k, v in asdict(cfg).items() if k not in MEMORY_ONLY}
    identity["weights_id"] = probe_model.weights_id
    if background != "auto":
        identity["background"] = background
    run = runs.open_run(out, "streaming", identity, {**asdict(cfg), "background": background}, seed=cfg.seed,
                        caches=("canvases",),  # keyed by each slide's content and the read: valid for any run
                        inputs={"slides": slides, "labels": labels, "weights": weights_input(cfg),
                                "slide_mpp": cfg.slide_mpp if isinstance(cfg.slide_mpp, str) else None},
                        provenance={"mpp": cfg.mpp, "tile_size": cfg.tile_size, "encoder": probe_model.spec.name,
                                    "encoder_weights_sha256": probe_model.weights_id,  # as feature files
                                    "pool_kernel": cfg.pool_kernel, "encoder_mean": list(probe_model.spec.mean),
                                    "encoder_std": list(probe_model.spec.std)})
    out_dir = run.dir
    atomic.clean_stale_tmp(out_dir / "canvases")  # a canvas being written when a run was killed (the lock is ours)
    stride = probe_model.stream.stride
    log(f"reading {len(table)} canvases at {cfg.mpp} µm/px (cache: {out_dir / 'canvases'})")
    canvases = [cached_canvas(paths[s], out_dir / "canvases", cfg.mpp, cfg.image_size, stride, slide_mpp=cfg.slide_mpp,
                              background=background) for s in table.slide_ids]
    blank = [c.slide_id for c in canvases if not c.tissue]
    if blank:  # said, not silent: a blank scan (or a failed detection) trains on glass
        log(f"no tissue found on {len(blank)} slide(s) ({', '.join(blank[:5])}{', ...' if len(blank) > 5 else ''}): "
            "each is read whole (its box centre-cropped to --image-size)")
    if table.class_names is not None:  # label c = class_names[c], as MIL runs record it
        run.update(class_names=table.class_names)
    run.update(n_classes=table.n_classes)  # what heatmap-streaming checks a checkpoint's head against
    atomic.write_json(out_dir / "splits.json", splits_record(table, folds))
    choice = _precision(run, probe_model, canvases[0], cfg, torch.device("cpu") if device.type == "cpu" else device)
    dtype = autocast_dtype(device, choice.resolved)
    del probe_model
    log(f"precision {choice.resolved} ({choice.requested}), pool kernel {cfg.pool_kernel}, device {device}")
    with runs.Stopper(runs.parse_duration(cfg.budget), elapsed_s=float(run.record.get("elapsed_s", 0.0))) as stopper:
        for k, (tr, te) in enumerate(folds):
            fold_dir = atomic.ensure_writable_dir(out_dir / f"fold{k}")
            atomic.clean_stale_tmp(fold_dir)  # best weights / predictions being written when a run was killed
            pred_path = fold_dir / "predictions.csv"
            if pred_path.is_file():
                log(f"fold {k}: done (skipped)")
                continue
            tr_i, va_i = validation_split(tr, y, groups, fraction=cfg.val_fraction, seed=cfg.seed + k)
            log(f"fold {k}: {len(tr_i)} train, {len(va_i)} val, {len(te)} test slides")
            model = build_model(cfg, table.n_classes, device)
            state = train_fold(run, k, model, [(canvases[i], int(y[i])) for i in tr_i],
                               [(canvases[i], int(y[i])) for i in va_i], cfg, device, dtype, stopper, log)
            run.update(elapsed_s=stopper.elapsed)
            if state["stopped"]:
                run.update(status="stopped", stop_reason=state["stopped"])
                log(f"stopped ({state['stopped']}) in fold {k}, epoch {state['epoch']}: re-run the same command to resume")
                return {"stopped": state["stopped"], "fold": k, "epoch": state["epoch"]}
            load_weights(model, fold_dir / "best.safetensors")
            _, probs = evaluate(model, [canvases[i] for i in te], [int(y[i]) for i in te], cfg, device, dtype)
            bad = [table.slide_ids[i] for i, p in zip(te, probs) if not np.isfinite(p).all()]
            if bad:  # not written as a finished fold: its NaN made every re-run fail at the pooled evaluation
                raise GigaslideError(f"fold {k}'s model predicts NaN/inf on {len(bad)} test slide(s) (e.g. {bad[0]})",
                                     path=fold_dir / "best.safetensors",
                                     fix="train with --precision fp32 (fp16 activations overflow) or a lower --lr, "
                                         "into a new --out" if dtype is torch.float16 else
                                         "train with a lower --lr / --trunk-lr into a new --out")
            write_predictions(pred_path, [table.slide_ids[i] for i in te], y[te], probs, k,
                              patient_ids=[table.patient_ids[i] for i in te] if table.has_patients else None,
                              class_names=table.class_names)
    # pool the folds' test predictions with the evaluation protocol's reader (one row per slide)
    (out_dir / "predictions.csv").unlink(missing_ok=True)
    pred = read_predictions(out_dir)  # reads fold*/predictions.csv
    patients = dict(zip(table.slide_ids, table.patient_ids)) if table.has_patients else None  # CIs over patients
    write_predictions(out_dir / "predictions.csv", pred.slide_ids, pred.labels, pred.probs, pred.folds,
                      patient_ids=[patients[s] for s in pred.slide_ids] if patients else None,
                      class_names=table.class_names)
    # the file named: an --out folder named '*.json' was taken for the evaluation file itself (IsADirectoryError)
    res = evaluate_predictions(out_dir / "predictions.csv", out=out_dir / "evaluation.json")  # with its patients
    auc = res["metrics"]["auc"]
    run.finish(auc=auc["value"], auc_ci=[auc["ci_low"], auc["ci_high"]], n_slides=res["n_slides"])
    log(f"AUC {auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]")
    return res

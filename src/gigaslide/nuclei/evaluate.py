"""Scoring a nuclei model on annotated images: per-image statistics, pooled and image-mean metrics with
bootstrap CIs, a per-image CSV and a Markdown report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic, runs
from gigaslide.devices import autocast_dtype
from gigaslide.errors import GigaslideError
from gigaslide.nuclei import metrics
from gigaslide.nuclei.annotations import class_names, unknown_class
from gigaslide.nuclei.data import (Item, check_resolution, dataset_type_codes, find_pairs, load_item, read_organs,
                                   read_split, resize)
from gigaslide.nuclei.infer import MODEL_WEIGHTS, fixed_window, load_model, model_dir, read_spec, segment
from gigaslide.nuclei.model import HoVerNet
from gigaslide.nuclei.postprocess import PostParams
from gigaslide.provenance import provenance


def predict_item(model: HoVerNet, item: Item, precision: str = "fp32") -> tuple[np.ndarray, dict[int, int]]:
    """Predicted instances at the image's own resolution, and ``id -> type``."""
    inst, types, _ = segment(model, item.image, precision=precision)
    if inst.shape != item.inst_orig.shape:
        inst = resize(inst, item.inst_orig.shape, nearest=True)
    return inst, {k: t for k, (t, _) in types.items()}


def score_items(model: HoVerNet, items: list[Item], precision: str = "fp32") -> list[metrics.ImageStats]:
    out = []
    for it in items:
        pred, ptypes = predict_item(model, it, precision)
        typed = bool(model.spec.n_types) and it.types is not None
        out.append(metrics.image_stats(it.inst_orig, pred, it.types if typed else None, ptypes if typed else None))
    return out


#: What an undefined metric (0 / 0: no nucleus in the ground truth nor in the prediction) is written as.
UNDEFINED_NOTE = ("n/a / empty / null: undefined -- Dice, AJI, DQ (F1) and PQ are 0 / 0 on an image with no nucleus in "
                  "its ground truth nor in the prediction, SQ where no nucleus matched; such an image is left out of "
                  "that metric's mean over images (`images`: how many it averages)")


def finite_or_none(obj: Any) -> Any:  # noqa: ANN401
    """``obj`` with every NaN / infinite float replaced by None (JSON null): a report keeps no NaN, which strict JSON
    readers refuse."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


def _fmt(d: dict[str, float | None]) -> str:
    v, lo, hi = (np.nan if d.get(k) is None else d[k] for k in ("value", "ci_low", "ci_high"))
    if np.isnan(v):
        return "n/a"
    return f"{v:.3f}" if np.isnan(lo) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _cell(v: Any) -> str:  # noqa: ANN401
    return "" if v is None else str(v)


def evaluate(model_path: str | os.PathLike, images: str | os.PathLike, annotations: str | os.PathLike,
             out: str | os.PathLike, *, subset: str = "auto", image_mpp: float | None = None, n_bootstrap: int = 1000,
             precision: str = "fp32", seed: int = 0, progress=None) -> dict[str, Any]:  # noqa: ANN001
    """Evaluate ``model_path`` on the annotated images; ``subset``: auto (the run's test images when the
    folder holds images the run trained or selected on), test, or all. The run's images are read from its
    ``split.csv``; a ``model/`` folder copied on its own has none, and its ``model.json`` names the images it trained
    and selected on (every other image counts as a test image).

    GeoJSON classes are read with the model's own name -> type map (its spec's ``type_names``), so a class is
    scored as the type the model predicts for it; a class the model does not know is refused up front, naming
    the file and the class. A model without stored names (one trained on numeric types, or exported before
    names were stored) reads them numbered 1..T in sorted order over the evaluated files, as training did when
    every file had every class."""
    check_resolution(image_mpp, "--image-mpp")
    model = load_model(model_path)
    spec, rec = read_spec(model_path)
    pairs, problems = find_pairs(images, annotations)
    split_file = model_dir(model_path).parent / "split.csv"
    split = read_split(split_file) if split_file.is_file() else {}
    prov = rec.get("provenance") or {}
    if not split and (prov.get("train_images") or prov.get("val_images")):
        # a model/ folder copied without its run (no split.csv): model.json names the images it trained and selected
        # on; the others were never seen
        split_file = model_dir(model_path) / "model.json"
        split = {p.id: "test" for p in pairs}
        split.update({i: "train" for i in prov.get("train_images") or []})
        split.update({i: "val" for i in prov.get("val_images") or []})
    seen = [p.id for p in pairs if split.get(p.id) in ("train", "val")]
    if subset not in ("auto", "test", "all"):
        raise GigaslideError(f"--subset {subset}", fix="use auto, test or all")
    if subset == "test" or (subset == "auto" and seen):
        pairs = [p for p in pairs if split.get(p.id) == "test"]
        if not pairs:
            raise GigaslideError("none of these images is in the run's test split", path=split_file,
                                 fix="evaluate on other images, or pass --subset all (scores on training images are not a test)")
    codes = {name: int(t) for t, name in spec.type_names.items()}
    if codes:
        for name, path in class_names(p.annotation for p in pairs if p.annotation is not None).items():
            if name not in codes:
                raise unknown_class(name, path, codes)
    else:
        codes = dataset_type_codes(pairs)
    organs = read_organs(images)
    stats, rows = [], []
    for k, p in enumerate(pairs):
        try:
            item = load_item(p, spec.mpp, image_mpp, organs.get(p.id, ""), codes, problems)
        except GigaslideError as e:
            problems.append(e.one_line())
            continue
        st = score_items(model, [item], precision)[0]
        stats.append(st)
        rows.append({"image_id": p.id, "organ": item.organ, "nuclei_true": st.tp + st.fn, "nuclei_pred": st.tp + st.fp,
                     **{m: None if np.isnan(v) else round(v, 6) for m, v in metrics.per_image(st).items()}})
        if progress:
            progress(p.id, k + 1, len(pairs))
    if not stats:
        raise GigaslideError("no image could be evaluated", path=images, fix="; ".join(problems[:3]) or None)
    summary = finite_or_none(metrics.summarize(stats, n_bootstrap=n_bootstrap, seed=seed))
    out = atomic.ensure_writable_dir(out)
    cols = list(rows[0])
    atomic.write_text(out / "per_image.csv", "\n".join([",".join(cols)] + [",".join(_cell(r[c]) for c in cols)
                                                                            for r in rows]) + "\n")
    weights = model_dir(model_path) / MODEL_WEIGHTS
    dtype = autocast_dtype(torch.device("cpu"), precision)
    used = {"model_weights_sha256": runs.file_sha256(weights),
            "postprocess": PostParams.from_dict(spec.postprocess).to_dict(), "window": fixed_window(model),
            "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"),
            "image_mpp": image_mpp}  # what scored: a report
    # named the model's folder only, not which weights (a re-trained run) nor the settings the maps were made with
    report = {"model": str(Path(model_path).resolve()), "backbone": spec.encoder_spec.name, "mpp": spec.mpp, **used,
              "provenance": provenance("nuclei-eval", mpp=spec.mpp, encoder=spec.encoder_spec.name,
                                       encoder_weights_sha256=spec.backbone_weights, seed=seed, **used),
              "images": [r["image_id"] for r in rows], "subset": subset if not (subset == "auto" and seen) else "test",
              "metrics": summary, "per_image": rows, "problems": problems, "bootstrap": n_bootstrap,
              "stats": [s.to_dict() for s in stats],
              "definitions": "PQ/DQ/SQ at IoU>0.5 (F1 == DQ); image_mean: mean over images of per-image values "
                             "(undefined ones left out); pooled: statistics summed over images (CoNIC mPQ+ style); "
                             "CIs: percentile bootstrap over images", "undefined": UNDEFINED_NOTE}
    atomic.write_json(out / "report.json", report)
    lines = [f"# Nuclei evaluation: {len(rows)} images, backbone {spec.encoder_spec.name}, {spec.mpp} µm/px", "",
             "| metric | mean over images [95 % CI] | pooled [95 % CI] |", "|---|---|---|"]
    for m in metrics.METRIC_NAMES:
        lines.append(f"| {m} | {_fmt(summary['image_mean'][m])} | {_fmt(summary['pooled'][m])} |")
    if "mpq" in summary["pooled"]:
        lines.append(f"| mPQ+ | | {_fmt(summary['pooled']['mpq'])} |")
    pq_n = summary["image_mean"]["pq"].get("images", len(rows))
    lines += ["", report["definitions"] + ".", ""]
    if any(v is None for r in rows for v in r.values()) or pq_n < len(rows):
        lines += [f"PQ is defined on {pq_n} of {len(rows)} images; {UNDEFINED_NOTE}.", ""]
    lines += [f"- {p}" for p in problems]
    atomic.write_text(out / "report.md", "\n".join(lines) + "\n")
    return report


__all__ = ["UNDEFINED_NOTE", "evaluate", "finite_or_none", "predict_item", "score_items"]

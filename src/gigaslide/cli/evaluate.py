"""The ``evaluate`` command group, defined in one place: tiles, finetune, slides, embeddings.

Every group member scores with the one protocol of :mod:`gigaslide.evaluation` (bootstrap CIs,
paired comparisons, the predictions contract).
"""

from __future__ import annotations

from pathlib import Path

from gigaslide.cli.main import Command
from gigaslide.errors import GigaslideError


def evaluate_tiles(train: str, test: str, out: str, protocol: str = "linear,knn,fewshot", bootstrap: int = 1000,
                   k: int = 20, fewshot_repeats: int = 5, seed: int = 0, baseline: str | None = None) -> None:
    """Probe frozen tile features (linear, k-NN, few-shot) with bootstrap CIs; writes report.{md,json,png}.

    Example: gigaslide evaluate tiles --train feats/train.h5 --test feats/valid.h5 --protocol linear,knn --out report/
    Paired against another encoder on the same test tiles (both embedded with `gigaslide embed-tiles`; the
    from-scratch baseline of an SSL run: `embed-tiles ... --encoder RUN/encoder --weights random`):
      gigaslide evaluate tiles --train rand/train.h5 --test rand/valid.h5 --out rep_random/
      gigaslide evaluate tiles --train dino/train.h5 --test dino/valid.h5 --out rep_dino/ --baseline rep_random/

    Args:
        train: feature file (.h5 with a 'labels' dataset) of the training tiles
        test: feature file of the test tiles (same encoder)
        out: report directory (report.{md,json,png} and the test predictions, predictions.npz)
        protocol: comma-separated subset of linear,knn,fewshot
        bootstrap: bootstrap resamples for the 95 % CIs (test tiles resampled within each class; 0 = none)
        k: neighbours of the k-NN probe (cosine)
        fewshot_repeats: random draws per few-shot setting (each reported; the CI resamples the draws too)
        seed: random seed (validation split, few-shot draws, bootstrap)
        baseline: --out folder of another `evaluate tiles` on the same test tiles (and, where both record them, the
            same training tiles): each protocol both have is compared with it, paired (bootstrap over the same test
            tiles); writes OUT/comparison.{md,json}
    """
    from gigaslide.evaluation.compare import check_same_tiles, check_same_training
    from gigaslide.evaluation.tiles import FIX_SAME_TILES, FIX_SAME_TRAIN, compare_with, evaluate_tile_features
    from gigaslide.evaluation.tiles import report_markdown, saved_predictions
    from gigaslide.features import store

    test_f, train_f = store.load(test), store.load(train)
    base = None
    if baseline:  # a wrong baseline is refused before any probing
        base = saved_predictions(baseline)
        check_same_tiles(test_f.attrs.get("tiles_fingerprint"), base, path=baseline, fix=FIX_SAME_TILES)
        check_same_training(train_f.attrs.get("tiles_fingerprint"), base, path=baseline, fix=FIX_SAME_TRAIN)
    rep = evaluate_tile_features(train_f, test_f, protocol, n_bootstrap=bootstrap, seed=seed, k=k,
                                 fewshot_repeats=fewshot_repeats, out=out)
    print(report_markdown(rep))
    print(f"wrote {out}/report.md, report.json, report.png, predictions.npz")
    if base is not None:
        _write_comparison(out, baseline, compare_with(rep, base, n_bootstrap=bootstrap, seed=seed))


def _write_comparison(out: str, baseline: str, diffs: dict, items: str = "test tiles") -> None:
    """OUT/comparison.{md,json}: the paired differences against ``baseline``, printed too."""
    from gigaslide import atomic
    from gigaslide.evaluation.compare import comparison_markdown

    d = Path(out)
    d = d.parent if d.suffix == ".json" else d
    text = comparison_markdown(diffs, baseline, items)
    atomic.write_json(d / "comparison.json", {"baseline": str(baseline), "protocols": diffs})
    atomic.write_text(d / "comparison.md", text)
    print(text)
    print(f"wrote {d}/comparison.md, comparison.json")


def evaluate_finetune(train: str, test: str, encoder: str, out: str, weights: str = "default", fractions: str = "1.0",
                      epochs: int = 10, batch_size: int = 64, lr: float = 1e-4, head_lr: float = 1e-3,
                      augment: str = "pathology", max_train: int | None = None, precision: str = "auto",
                      workers: int = 1, bootstrap: int = 1000, seed: int = 0, threads: int | None = None,
                      baseline: str | None = None) -> None:
    """Fine-tune an encoder end to end (plus a linear head) on labelled tiles; test with bootstrap CIs.

    Example: gigaslide evaluate finetune --train pcam/train --test pcam/valid --encoder runs/dino/encoder --fractions 0.01,0.1,1 --out ft/
    Paired against a from-scratch baseline on the same test tiles:
      gigaslide evaluate finetune ... --encoder runs/dino/encoder --weights random --out ft_random/
      gigaslide evaluate finetune ... --encoder runs/dino/encoder --out ft_dino/ --baseline ft_random/

    The low-label protocol of Kang et al.: each fraction of the training labels (stratified) is
    fine-tuned separately, with a validation split for model selection. Writes report.{md,json,png}
    (same metrics as `evaluate tiles`) and per fraction the fine-tuned encoder (fraction_*/encoder).
    Re-running with the same settings reuses finished fractions and resumes an interrupted one.

    Args:
        train: folder with one sub-folder of images per class (training tiles)
        test: folder with the same class sub-folders (test tiles)
        encoder: RUN_DIR/encoder (from pretrain), another export folder, or a registry name (see `gigaslide encoders`)
        out: report directory
        weights: default (the export's / local hub cache), a weights file, or random (a from-scratch baseline)
        fractions: comma-separated label fractions, e.g. 0.01,0.1,1.0
        epochs: maximum epochs per fraction (early stopping on validation loss)
        batch_size: tiles per step
        lr: encoder learning rate (AdamW, warm-up then cosine)
        head_lr: linear head learning rate
        augment: pathology (flips, 90° rotations, light stain jitter) or none
        max_train: use a random subset of this many training tiles (fixed by --seed)
        precision: auto (bf16 AMP on CUDA, fp32 on CPU), bf16, fp16 or fp32
        workers: data-loader worker processes
        bootstrap: bootstrap resamples for the 95 % CIs (test tiles resampled within each class)
        seed: random seed (subsets, splits, head init, augmentation)
        threads: torch CPU threads (default: torch's)
        baseline: --out folder of another finished fine-tune run on the same --test tiles and label draws (same
            --train, --seed, --max-train): each shared label fraction is compared with it, paired (bootstrap over
            the same test tiles); writes OUT/comparison.{md,json}
    """
    import torch

    from gigaslide.evaluation.tiles import report_markdown
    from gigaslide.ssl.tile.finetune import FinetuneConfig, check_baseline, compare_runs, finetune_tiles

    if threads:
        torch.set_num_threads(threads)
    try:
        fr = tuple(float(f) for f in str(fractions).split(",") if f.strip())
    except ValueError:
        raise GigaslideError(f"--fractions '{fractions}' is not a list of numbers", fix="use e.g. 0.01,0.1,1.0") from None
    cfg = FinetuneConfig(fractions=fr, epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, augment=augment,
                         max_train=max_train, precision=precision, workers=workers, seed=seed, n_bootstrap=bootstrap)
    if baseline:
        check_baseline(baseline, test, cfg)  # no finished run, other tiles or label draws: refused before training
    rep = finetune_tiles(train, test, encoder, out, weights=weights, cfg=cfg)
    print(report_markdown(rep))
    print(f"wrote {out}/report.md, report.json, report.png")
    if baseline:
        _write_comparison(out, baseline, compare_runs(rep, baseline, n_bootstrap=bootstrap, seed=seed))


def _finished(predictions: str | None) -> str | None:
    """``predictions`` unless it is the folder of a run that is not finished: its ``fold*/predictions.csv`` hold the
    folds done so far (a killed or running train-mil), which evaluated as if they were the whole cohort."""
    from gigaslide.runs import read_run

    p = Path(predictions) if predictions else None
    if p is None or not p.is_dir() or (p / "predictions.csv").is_file():
        return predictions
    rec = read_run(p)
    status = rec.get("status") if isinstance(rec, dict) else None
    if rec is not None and status != "finished":
        n = len(list(p.glob("fold*/predictions.csv")))
        raise GigaslideError(f"the run in this folder is not finished (run.json status {status!r}): its {n} "
                             "fold*/predictions.csv hold only the folds done so far", path=p,
                             fix="re-run its training command to finish it (it resumes), or pass one fold's "
                                 "predictions.csv to evaluate that fold alone")
    return predictions


def evaluate_slides(predictions: str, bootstrap: int = 1000, seed: int = 0, out: str | None = None,
                    baseline: str | None = None, labels: str | None = None) -> None:
    """Slide-level AUC / balanced accuracy with bootstrap 95 % CIs from a run's prediction CSVs.

    Example: gigaslide evaluate slides --predictions runs/abmil --bootstrap 1000
    Paired against another run on the same slides (e.g. another model or encoder, same labels.csv):
      gigaslide evaluate slides --predictions runs/transmil --baseline runs/abmil

    Args:
        predictions: run directory (predictions.csv or fold*/predictions.csv) or a CSV file
        bootstrap: bootstrap resamples (slides resampled within folds -- patients, with all their slides, where the
            predictions or --labels name them; 0 = none)
        seed: bootstrap seed
        out: where to write evaluation.json/.md (default: the run directory; a .json path also works)
        baseline: another run directory or CSV predicting the same slides: Δ AUC and Δ balanced accuracy, paired
            (one bootstrap resample of slides -- or patients -- for both, stratified by label); writes
            comparison.{md,json} beside evaluation.json
        labels: labels.csv with a patient_id column, for predictions written without it (e.g. by other tools):
            the CIs then resample patients, each with all its slides; where it names the classes, the report does too
            (predictions that name theirs are matched by name)
    """
    from gigaslide.evaluation.slides import compare_predictions, evaluate_predictions, evaluation_markdown
    from gigaslide.evaluation.slides import read_predictions, with_patients

    if out is None:
        p = Path(predictions)
        out = str(p if p.is_dir() else p.parent)
    base = read_predictions(_finished(baseline)) if baseline else None  # a wrong baseline: refused before any work
    pred = read_predictions(_finished(predictions))
    if labels:
        pred = with_patients(pred, labels)
    diffs = compare_predictions(pred, base, n_bootstrap=bootstrap, seed=seed) if base is not None else None
    res = evaluate_predictions(pred, n_bootstrap=bootstrap, seed=seed, out=out)
    print(evaluation_markdown(res))
    if diffs is not None:
        _write_comparison(out, baseline, {"slides (pooled out-of-fold)": diffs}, items="slides")


def evaluate_embeddings(embeddings: str, labels: str, out: str, folds: int = 5, train_slides: int | None = None,
                        repeats: int | None = None, seed: int = 0, bootstrap: int = 1000, on_missing: str = "error",
                        c: float = 10.0, baseline: str | None = None, protocol: str = "linear,knn",
                        k: int = 20) -> None:
    """Linear and k-NN evaluation of slide embeddings (Giga-SSL / SLPD), CV on the same folds, with CIs.

    linear: StandardScaler + balanced logistic regression; knn: cosine k-NN on L2-normalised embeddings, class
    probabilities = vote fractions of the k nearest training slides (at most half the training slides vote;
    unweighted votes: with unequal classes its balanced accuracy leans to the larger class, its AUC does not).

    Example: gigaslide evaluate embeddings --embeddings embeddings.h5 --labels labels.csv --folds 5 --out runs/linear
    Paired against another method's run on the same slides (e.g. SLPD vs Giga-SSL embeddings, same labels.csv):
      gigaslide evaluate embeddings --embeddings slpd.h5 --labels labels.csv --out lin_slpd/ --baseline lin_gssl/

    Args:
        embeddings: HDF5 written by `gigaslide embed-slides` (slide_ids + embeddings)
        labels: CSV with columns slide_id,patient_id,label (patient_id -- or CLAM's case_id -- optional; labels
            0..C-1 or class names)
        out: run directory (splits.json, probes.md; the linear probe's predictions.csv, evaluation.json/.md; the
            k-NN probe's in OUT/knn/)
        folds: number of stratified, patient-grouped folds
        train_slides: few-shot: train on this many slides per training fold (None = all)
        repeats: few-shot draws per fold (default 3 with --train-slides, else 1)
        seed: seed of folds and draws
        bootstrap: bootstrap resamples for the 95 % CIs (over patients, each with all its slides, where labels.csv
            names them; else over slides)
        on_missing: error (default) or skip: slides with a label but no embedding, or the reverse
        c: inverse L2 strength C of the logistic regression (10, as in Giga-SSL's linear evaluation)
        baseline: another run (an `evaluate embeddings` or `train-mil` --out folder, or a predictions CSV) on the same
            slides: Δ AUC and Δ balanced accuracy, paired over the slides (repeats resampled too); writes
            OUT/comparison.{md,json}. The k-NN probe is compared with the baseline's k-NN probe (BASELINE/knn/)
            where it has one
        protocol: comma-separated subset of linear,knn
        k: neighbours of the k-NN probe (20; at most half the training slides of a fold vote)
    """
    from gigaslide.evaluation.slides import compare_predictions, evaluation_markdown, probe_run, probes_markdown
    from gigaslide.evaluation.slides import read_predictions
    from gigaslide.ssl.slide.embed import load_embeddings

    base = read_predictions(_finished(baseline)) if baseline else None  # a wrong baseline: refused before any work
    e = load_embeddings(embeddings)
    dup = sorted({s for s in e.slide_ids if e.slide_ids.count(s) > 1})
    if len(e.slide_ids) != len(e.embeddings) or dup:  # a dict of them kept the last row of a slide, zip the shorter
        what = (f"slide(s) {', '.join(dup[:5])} appear more than once" if dup else
                f"{len(e.slide_ids)} slide ids for {len(e.embeddings)} embeddings")
        raise GigaslideError(f"{what} in the embeddings file", path=embeddings,
                             fix="one embedding per slide: re-run `gigaslide embed-slides`")
    vecs = dict(zip(e.slide_ids, e.embeddings))
    if repeats is None:
        repeats = 3 if train_slides else 1
    results = probe_run(vecs, labels, out, protocols=protocol, folds=folds, seed=seed, train_slides=train_slides,
                        repeats=repeats, C=c, k=k, on_missing=on_missing, n_bootstrap=bootstrap)
    for name, res in results.items():
        print(evaluation_markdown(res, f"{'k-NN' if name == 'knn' else 'linear'} probe on {embeddings}"))
    if len(results) > 1:
        print(probes_markdown(results))
    print(f"wrote {out}")
    if base is not None:
        diffs = {}
        if "linear" in results:
            diffs["slides (pooled out-of-fold)"] = compare_predictions(read_predictions(out), base,
                                                                    n_bootstrap=bootstrap, seed=seed)
        knn_base = Path(baseline) / "knn"
        if "knn" in results and (knn_base / "predictions.csv").is_file():
            diffs["slides, k-NN probe (pooled out-of-fold)"] = compare_predictions(
                read_predictions(Path(out) / "knn"), read_predictions(knn_base), n_bootstrap=bootstrap, seed=seed)
        elif "knn" in results:
            print(f"note: the k-NN probe is not compared: {baseline} has no k-NN probe ({knn_base}/predictions.csv)")
        if diffs:
            _write_comparison(out, baseline, diffs, items="slides")


COMMANDS: dict = {
    "evaluate": {
        "tiles": Command(evaluate_tiles, positional=None),
        "finetune": Command(evaluate_finetune, positional=None),
        "slides": Command(evaluate_slides, positional=None),
        "embeddings": Command(evaluate_embeddings, positional=None),
    },
}

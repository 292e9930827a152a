"""CLI commands of the nuclei stage: ``nuclei-train``, ``nuclei-eval`` and ``nuclei`` (whole slides)."""

from __future__ import annotations

import sys

from gigaslide.cli.main import Command


def nuclei_train(images: str, annotations: str, out: str, *, backbone: str = "resnet18", weights: str = "default",
                 mpp: float = 0.25, fraction: float = 1.0, budget: str | None = None, epochs: int | None = None,
                 freeze_encoder: bool = False, steps_per_epoch: int = 50, batch_size: int = 4, crop: int = 256,
                 lr: float = 1e-4, select: str = "pq", patience: int | None = None, image_mpp: float | None = None,
                 organs: str | None = None, split: str | None = None, precision: str = "auto", device: str = "auto",
                 seed: int = 0) -> dict:
    """Train a HoVer-Net-style nuclei instance segmentation model on annotated images (NP + HV [+ NC] branches).

    Example: gigaslide nuclei-train --images monuseg/images --annotations monuseg/annotations --backbone PRETRAIN_RUN/encoder --fraction 0.2 --budget 30m --out NUC_RUN

    Args:
        images: folder of images (<id>.png / .tif / .jpg).
        annotations: folder of annotations with the same stems: Aperio/MoNuSeg .xml, QuPath .geojson, label .png/.tif, .npy, .mat.
        out: run folder (run.json, split.csv, checkpoint/, model/); a re-run with the same options resumes.
        backbone: encoder: a registry name (resnet18, resnet50, vit_small ...; see `gigaslide encoders`) or an exported RUN/encoder.
        weights: default (the export's own weights / the registry entry's weights from the local cache), random, or a weights file.
        mpp: resolution the model works at (µm/px); images are resampled to it.
        fraction: fraction of the training images to use (label-efficiency curves); validation and test images are unchanged.
        budget: wall-clock training budget (e.g. 30m, 2h); training stops cleanly and exports the best epoch.
        epochs: number of epochs (default 20 when no --budget is given).
        freeze_encoder: keep the backbone fixed (linear-probe style: only the decoders learn).
        steps_per_epoch: batches of random crops per epoch.
        batch_size: crops per batch.
        crop: crop size in px (multiple of 32).
        lr: AdamW learning rate.
        select: best epoch by validation PQ (pq) or training loss (loss).
        patience: stop after this many epochs without improvement.
        image_mpp: µm/px of the images (MoNuSeg XML says it); given, it wins, with a warning per file that differs.
        organs: CSV image_id,organ for the stratified split (default: organs.csv beside the images).
        split: CSV image_id,split (train/val/test) to use instead of the computed split.
        precision: auto (CUDA: bf16, or fp16 with a loss scaler on GPUs without native bf16; CPU: fp32), fp32, bf16
            or fp16.
        device: auto, cpu or cuda.
        seed: seed for the split, initialisation and augmentation.
    """
    from gigaslide.nuclei.train import NucleiTrainConfig, train_nuclei
    from gigaslide.runs import parse_duration

    from gigaslide.cli.progress import progress_bar

    cfg = NucleiTrainConfig(images=images, annotations=annotations, out=out, mpp=mpp, backbone=backbone, weights=weights,
                            freeze_encoder=freeze_encoder, fraction=fraction, epochs=epochs, budget_s=parse_duration(budget),
                            steps_per_epoch=steps_per_epoch, batch_size=batch_size, crop=crop, lr=lr, select=select,
                            patience=patience, image_mpp=image_mpp, organs=organs, split=split, precision=precision,
                            device=device, seed=seed)
    with progress_bar("nuclei-train") as update:
        s = train_nuclei(cfg, progress=update)
    for p in s["problems"]:
        print(f"warning: {p}")
    print(f"{out}: {s['status']} after {s['epochs']} epochs, best epoch {s['best_epoch']} ({s['selection']} {s['best_value']})")
    from gigaslide.runs import STOP_EXIT_STATUS

    if s["status"] == "stopped" and s.get("stop_reason") in STOP_EXIT_STATUS:  # not finished, no model/: a script
        # must not go on as if it were (`nuclei-train && nuclei-eval`)
        print(f"stopped by {s['stop_reason']} after epoch {s['epochs']}: the checkpoint is saved; re-run the same "
              "command to resume", file=sys.stderr)
        raise SystemExit(STOP_EXIT_STATUS[s["stop_reason"]])
    return s


def nuclei_eval(model: str, images: str, annotations: str, out: str, *, subset: str = "auto",
                image_mpp: float | None = None, bootstrap: int = 1000, precision: str = "fp32", seed: int = 0) -> dict:
    """Score a nuclei model on annotated images: Dice, AJI, F1, DQ, SQ, PQ (mPQ+ with types) with bootstrap 95 % CIs.

    Example: gigaslide nuclei-eval --model NUC_RUN --images monuseg/images --annotations monuseg/annotations --out REPORT

    Args:
        model: a finished nuclei-train run folder (or its model/ folder).
        images: folder of images.
        annotations: folder of annotations (same formats as nuclei-train).
        out: report folder (report.md, report.json, per_image.csv).
        subset: auto (only the run's test images when the folder holds images it trained or selected on), test, or all.
        image_mpp: µm/px of the images (MoNuSeg XML says it); given, it wins, with a warning per file that differs.
        bootstrap: bootstrap resamples over images for the CIs.
        precision: fp32, bf16, fp16 or auto (CUDA: bf16, or fp16 without native bf16; CPU: fp32).
        seed: bootstrap seed.
    """
    from gigaslide.cli.progress import progress_bar
    from gigaslide.nuclei.evaluate import evaluate

    with progress_bar("nuclei-eval") as update:
        r = evaluate(model, images, annotations, out, subset=subset, image_mpp=image_mpp, n_bootstrap=bootstrap,
                     precision=precision, seed=seed, progress=update)
    for p in r["problems"]:
        print(f"warning: {p}")
    pq = r["metrics"]["image_mean"]["pq"]
    if pq["value"] is None:  # 0 / 0 on every image: no nucleus in their ground truth nor in the predictions
        print(f"{out}/report.md: {len(r['images'])} images, PQ undefined (no nucleus in the ground truth nor in the "
              "predictions of any image)")
    elif pq["ci_low"] is None:
        print(f"{out}/report.md: {len(r['images'])} images, PQ {pq['value']:.3f}")
    else:
        print(f"{out}/report.md: {len(r['images'])} images, PQ {pq['value']:.3f} [{pq['ci_low']:.3f}, "
              f"{pq['ci_high']:.3f}]")
    return r


def nuclei(slides: list[str], model: str, out: str, *, mpp: float | None = None, tissue_only: bool = True,
           region: int = 1024, margin: int = 64, tile_mpp: float = 0.5, tile_size: int = 224,
           slide_mpp: float | str | None = None, precision: str = "auto", device: str = "auto",
           background: str = "auto") -> dict:
    """Segment nuclei on whole slides: QuPath GeoJSON detections, a table and per-tile counts under OUT/nuclei/.

    Example: gigaslide nuclei slides/ --model NUC_RUN --out OUT --tissue-only

    Args:
        slides: slide files or folders of slides.
        model: a finished nuclei-train run folder.
        out: output folder (an encode OUT folder puts the per-tile counts on its features' coordinates); several
            processes may share one (each slide is segmented by one of them).
        mpp: resolution to segment at (µm/px); must be the model's (the default).
        tissue_only: segment only where the tissue mask has tissue.
        region: region side in px at the model's mpp (memory is one region at a time).
        margin: context px read around each region (wider than a nucleus; at least 16; 64 or more: the nuclei found
            do not depend on --region, apart from the network's context at its window borders).
        tile_mpp: resolution (µm/px) of the count grid when OUT has no feature files.
        tile_size: tile size in px (at --tile-mpp) of the count grid when OUT has no feature files.
        slide_mpp: level-0 µm/px for slides without it in their metadata: a number (every slide, their metadata
            overridden) or a CSV slide_id,mpp (the slides it lists).
        precision: auto (CUDA: bf16, or fp16 without native bf16; CPU: bf16 where it agrees with fp32 on the slide's
            first region, else fp32), fp32, bf16 or fp16.
        device: auto, cpu or cuda.
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence); also
            what the context outside the slide reads as (black for dark). A slide segmented with another value is
            segmented again
    """
    from gigaslide.cli.progress import progress_bar
    from gigaslide.errors import GigaslideError
    from gigaslide.nuclei.infer import read_spec
    from gigaslide.nuclei.slide import SlideParams, segment_slides
    from gigaslide.slides import find_slides

    spec, _ = read_spec(model)
    if mpp is not None and abs(mpp - spec.mpp) > 0.01 * spec.mpp:
        raise GigaslideError(f"--mpp {mpp} differs from the model's {spec.mpp} µm/px", path=model,
                             fix=f"leave --mpp out (or give {spec.mpp}); train a model at {mpp} µm/px to segment there")
    paths = find_slides(slides)
    params = SlideParams(region=region, margin=margin, tissue_only=tissue_only, tile_mpp=tile_mpp, tile_size=tile_size,
                         precision=precision, background=background)
    with progress_bar("nuclei") as update:
        res = segment_slides(paths, model, out, params, slide_mpp=slide_mpp, device=device, progress=update)
    for sid, err in res.failed.items():
        print(f"failed {sid}: {err}")
    print(f"{out}/nuclei: {len(res.done)} done, {len(res.skipped)} skipped, {len(res.failed)} failed, "
          f"{res.nuclei} nuclei in {res.seconds:.1f} s")
    if res.failed:
        raise GigaslideError(f"{len(res.failed)} slide(s) failed (see {out}/nuclei/manifest.json)",
                             fix="fix or remove the failed slides and re-run; finished slides are skipped")
    return {"done": res.done, "skipped": res.skipped, "failed": res.failed, "nuclei": res.nuclei}


COMMANDS: dict = {
    "nuclei-train": Command(nuclei_train, positional=None),
    "nuclei-eval": Command(nuclei_eval, positional=None),
    "nuclei": Command(nuclei, positional="slides"),
}

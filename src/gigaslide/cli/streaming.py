"""CLI commands of the streaming stage: ``train-streaming`` and ``heatmap-streaming``."""

from __future__ import annotations

from gigaslide.cli.main import Command


def train_streaming(slides: str, labels: str, out: str, *, mpp: float = 0.5, image_size: int = 65536,
                    tile_size: int = 3200, encoder: str = "resnet34", weights: str = "default", head: str = "clam_sb",
                    pool_kernel: int = 8, folds: int = 5, epochs: int = 100, freeze_epochs: int = 15, lr: float = 1e-3,
                    trunk_lr: float = 1e-3, accumulate: int = 4, patience: int = 10, precision: str = "auto",
                    seed: int = 0, device: str = "auto", slide_mpp: float | str | None = None,
                    checkpoint_blocks: bool = True, trim_memory: bool = True, budget: str | None = None,
                    background: str = "auto") -> dict:
    """Train StreamingCLAM end to end on whole slides with slide labels only (streamed CNN trunk, max-pool, CLAM head).

    The defaults are the paper's scale (Dooper et al. 2023; the authors' reference implementation): ResNet-34
    with its registry weights, canvases up to 65536 px at 0.5 µm/px, 3200 px tiles, max-pool 8 before the head,
    trunk frozen for 15 epochs, lr 1e-3, 4 slides per optimizer step, mixed precision -- a GPU job. A CPU-sized
    run: --mpp 8.0 --image-size 4096 --tile-size 2048 --epochs 8 --freeze-epochs 2 --accumulate 2.

    Example: gigaslide train-streaming --slides DIR --labels labels.csv --encoder resnet34 --pool-kernel 8 --folds 5 --out RUN

    Args:
        slides: folder of slides (file name without extension = slide_id).
        labels: CSV with columns slide_id,label (and optional patient_id, or case_id as in CLAM's CSVs, for
            patient-grouped folds).
        out: run folder (run.json, canvases cache, checkpoints, per-fold predictions, evaluation.json); a re-run
            resumes; a folder holding a run with other settings (e.g. another --pool-kernel) is refused.
        mpp: resolution the whole slide is read at (µm/px).
        image_size: largest canvas side in px (the tissue box is centre-cropped to it).
        tile_size: streaming tile size in px (at least the trunk's receptive field + pool kernel x stride:
            1184 px for resnet34 with --pool-kernel 8); as large as memory allows (speed only: the same results up to
            float rounding, so a run resumes with its own tile size, bit-exactly).
        encoder: a registry CNN (`gigaslide encoders`: resnet18, resnet34, resnet50 ...) or an exported
            encoder folder (RUN/encoder of `gigaslide pretrain`): architecture, weights and mean/std come from it.
        weights: default (the entry's / export's own weights; hub weights from the local cache), random
            (benchmarks and tests only), a weights file, or an exported encoder folder of the same architecture.
        head: MIL head on the pooled feature-map positions (clam_sb, clam_mb, abmil, ...).
        pool_kernel: max-pool kernel (and stride) between trunk and head, streamed: 8 as in StreamingCLAM, 1 = off.
            The last window of a feature map not divisible by it pools the positions that exist.
        folds: number of cross-validation folds.
        epochs: maximum epochs per fold.
        freeze_epochs: first epochs train the head only (trunk frozen); the trunk unfreezes after them.
        lr: head learning rate.
        trunk_lr: trunk learning rate after unfreezing.
        accumulate: slides per optimiser step (gradient accumulation).
        patience: early stopping after this many epochs without a better validation loss (counted once the trunk trains).
        precision: auto (bf16, else fp16 AMP on CUDA; fp32 on a CPU: training has no forward pass to check bf16
            against fp32 with), fp32, bf16 or fp16.
        seed: seed for folds, augmentation and initialisation.
        device: auto, cpu or cuda (memory/speed only: a run may resume on another device).
        slide_mpp: level-0 resolution (µm/px) for slides without it in their metadata: a number (every slide, their
            metadata overridden) or a CSV slide_id,mpp (the slides it lists).
        checkpoint_blocks: recompute each residual block's activations during the backward pass of a tile
            (activation checkpointing): lower peak memory for about one extra forward; gradients unchanged.
        trim_memory: return buffers freed between tiles to the OS at once (Linux/glibc mallopt) instead of
            letting malloc cache them: ~1 GB lower peak RSS on CPU for ~10 % more time.
        budget: wall-clock budget (e.g. 12h): stops cleanly at an optimizer step; re-run to continue. (Ctrl-C and
            SIGTERM stop cleanly too, with exit status 130 / 143: a script does not go on as if training had finished.)
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence); also
            what the canvas reads outside the slide and is padded with (black for dark). A canvas cached with another
            value is read again
    """
    from gigaslide.streaming.cv import run_training
    from gigaslide.streaming.train import TrainConfig

    cfg = TrainConfig(mpp=mpp, image_size=image_size, tile_size=tile_size, encoder=encoder, weights=weights, head=head,
                      pool_kernel=pool_kernel, folds=folds, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr,
                      trunk_lr=trunk_lr, accumulate=accumulate, patience=patience, precision=precision, seed=seed,
                      device=device, slide_mpp=slide_mpp, checkpoint_blocks=checkpoint_blocks, trim_memory=trim_memory,
                      budget=budget)
    res = run_training(slides, labels, out, cfg, background=background)
    from gigaslide.runs import STOP_EXIT_STATUS

    if res.get("stopped") in STOP_EXIT_STATUS:  # checkpoint saved and the stop line printed: only the status is left
        raise SystemExit(STOP_EXIT_STATUS[res["stopped"]])
    return res


def heatmap_streaming(slide: str, run: str, out: str, *, fold: int = 0, thumb_size: int = 1024, device: str = "auto",
                      slide_mpp: float | str | None = None, background: str | None = None) -> dict:
    """Draw a StreamingCLAM model's attention over the feature map of one slide on its thumbnail.

    The attention grid is also saved as RUN/heatmaps/fold<k>/<slide_id>.npz: `gigaslide view OUT --runs RUN`
    then shows it as a layer on the slide.

    Example: gigaslide heatmap-streaming slide.tif --run RUN --out slide_attention.png

    Args:
        slide: the slide file.
        run: the --out folder of a finished train-streaming run.
        out: output PNG path.
        fold: which fold's best checkpoint to use.
        thumb_size: longest side of the thumbnail in px.
        device: auto, cpu or cuda.
        slide_mpp: level-0 resolution (µm/px) of this slide, overriding its metadata, or a CSV slide_id,mpp (default:
            the run's --slide-mpp, if it was given one); for a slide without it in its metadata.
        background: auto (detected from the thumbnail), bright (bright-field glass) or dark (fluorescence); also
            what the canvas reads outside the slide (black for dark). Default: the run's --background (auto if none)
    """
    from gigaslide.streaming.heatmap import streaming_heatmap

    res = streaming_heatmap(slide, run, out, fold=fold, thumb_size=thumb_size, device=device, slide_mpp=slide_mpp,
                            background=background)
    print(f"{out}: P = {[round(p, 3) for p in res['probs']]}, feature map {res['fmap_size']}; "
          + (f"grid -> {res['grid']}" if res["grid"] else f"grid not saved ({res['grid_error']})")
          + ("" if res.get("tissue", True) else "; no tissue found on the slide: it was read whole"))
    return res


COMMANDS: dict = {
    "train-streaming": Command(train_streaming, positional=None),
    "heatmap-streaming": Command(heatmap_streaming, positional="slide", nargs=None),
}

"""CLI commands of the streaming stage: ``train-streaming`` and ``heatmap-streaming``."""

from __future__ import annotations

from gigaslide.cli.main import Command


def train_streaming(slides: str, labels: str, out: str, *, mpp: float = 8.0, image_size: int = 8192,
                    tile_size: int = 2048, encoder: str = "resnet34", weights: str | None = None, head: str = "clam_sb",
                    folds: int = 5, epochs: int = 20, freeze_epochs: int = 5, lr: float = 2e-4, trunk_lr: float = 2e-5,
                    accumulate: int = 4, patience: int = 5, precision: str = "auto", seed: int = 0,
                    device: str = "auto", slide_mpp: float | None = None, checkpoint_blocks: bool = True,
                    trim_memory: bool = True) -> dict:
    """Train StreamingCLAM end to end on whole slides with slide labels only (streamed CNN trunk + CLAM head).

    Example: gigaslide train-streaming --slides DIR --labels labels.csv --mpp 8.0 --image-size 8192 --tile-size 2048 --encoder resnet34 --head clam_sb --folds 5 --out RUN

    Args:
        slides: folder of slides (file name without extension = slide_id).
        labels: CSV with columns slide_id,label (and optional patient_id for grouped folds).
        out: run folder (canvases cache, per-fold checkpoints, predictions.csv, evaluation.json); a re-run resumes.
        mpp: resolution the whole slide is read at (µm/px).
        image_size: largest canvas side in px (the tissue box is centre-cropped to it).
        tile_size: streaming tile size in px (at least the trunk's receptive field + stride, e.g. 960 for resnet34).
        encoder: timm CNN trunk (resnet18, resnet34, resnet50 ...).
        weights: optional trunk weights (.safetensors or state_dict file, timm names); random init otherwise.
        head: MIL head on the feature-map positions (clam_sb, clam_mb, abmil, ...).
        folds: number of cross-validation folds.
        epochs: maximum epochs per fold.
        freeze_epochs: first epochs train the head only (trunk frozen), as in the paper.
        lr: head learning rate.
        trunk_lr: trunk learning rate after unfreezing.
        accumulate: slides per optimiser step (gradient accumulation).
        patience: early stopping after this many epochs without a better validation loss.
        precision: auto (bf16/fp16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16.
        seed: seed for folds, augmentation and initialisation.
        device: auto, cpu or cuda.
        slide_mpp: level-0 resolution for slides without it in their metadata.
        checkpoint_blocks: recompute each residual block's activations during the backward pass of a tile
            (activation checkpointing): lower peak memory for about one extra forward; gradients unchanged.
        trim_memory: return buffers freed between tiles to the OS at once (Linux/glibc mallopt) instead of
            letting malloc cache them: ~1 GB lower peak RSS on CPU for ~10 % more time.
    """
    from gigaslide.streaming.train import TrainConfig, run_training

    if precision not in ("auto", "fp32", "bf16", "fp16"):
        from gigaslide.errors import GigaslideError

        raise GigaslideError(f"--precision {precision}", fix="use auto, fp32, bf16 or fp16")
    cfg = TrainConfig(mpp=mpp, image_size=image_size, tile_size=tile_size, encoder=encoder, weights=weights, head=head,
                      folds=folds, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, trunk_lr=trunk_lr,
                      accumulate=accumulate, patience=patience, precision=precision, seed=seed, device=device,
                      slide_mpp=slide_mpp, checkpoint_blocks=checkpoint_blocks,
                      trim_memory=trim_memory)
    return run_training(slides, labels, out, cfg)


def heatmap_streaming(slide: str, run: str, out: str, *, fold: int = 0, thumb_size: int = 1024, device: str = "auto") -> dict:
    """Draw a StreamingCLAM model's attention over the feature map of one slide on its thumbnail.

    Example: gigaslide heatmap-streaming slide.tif --run RUN --out slide_attention.png

    Args:
        slide: the slide file.
        run: the --out folder of a finished train-streaming run.
        out: output PNG path.
        fold: which fold's best checkpoint to use.
        thumb_size: longest side of the thumbnail in px.
        device: auto, cpu or cuda.
    """
    from gigaslide.streaming.heatmap import streaming_heatmap

    res = streaming_heatmap(slide, run, out, fold=fold, thumb_size=thumb_size, device=device)
    print(f"{out}: P = {[round(p, 3) for p in res['probs']]}, feature map {res['fmap_size']}")
    return res


COMMANDS: dict = {
    "train-streaming": Command(train_streaming, positional=None),
    "heatmap-streaming": Command(heatmap_streaming, positional="slide", nargs=None),
}

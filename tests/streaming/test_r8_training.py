"""Review round 8 (mutation testing): what StreamingCLAM training computes per step -- the accumulated gradient, the
CLAM loss weighting, the stain jitter / normalisation, the augmentation draw, the centre crop of a large tissue box
and the heatmap grid over the canvas content -- each against a value computed here independently."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gigaslide import runs
from gigaslide.streaming.data import Augment, Canvas, Normalize, read_canvas
from gigaslide.streaming.train import TrainConfig, build_model, step_loss, train_fold

CPU = torch.device("cpu")
CFG = dict(encoder="test_resnet", weights="random", tile_size=256, pool_kernel=2, checkpoint_blocks=False,
           trim_memory=False, precision="fp32", seed=0, lr=1e-3, trunk_lr=1e-3)


def _model(cfg: TrainConfig, head: str = "clam_sb"):  # noqa: ANN202
    """test_resnet (stride 32) + head, dropout off (so a step can be recomputed exactly)."""
    model = build_model(cfg, 2, CPU)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _canvas(sid: str, seed: int, hw: tuple[int, int] = (320, 288)) -> Canvas:
    img = np.random.default_rng(seed).integers(0, 256, (3, *hw), dtype=np.uint8)
    return Canvas(sid, img, (0, 0), 1.0, 0.5, hw)


def test_an_accumulated_step_takes_the_mean_gradient_of_its_slides(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """--accumulate 2 on 3 training slides: 2 optimizer steps (slides 1+2, then slide 3), and the first step's gradient
    is the mean of the two slides' loss gradients (each recomputed here on a copy of the initial model with the
    augmentation the step drew). A step per slide, or the sum instead of the mean, fails."""
    cfg = TrainConfig(**CFG, accumulate=2, epochs=1, freeze_epochs=0)
    model = _model(cfg)
    start = copy.deepcopy(model)
    train = [(_canvas(f"c{i}", i), i % 2) for i in range(3)]
    import gigaslide.streaming.train as T

    calls, steps = [], []
    real_step_loss = T.step_loss

    def recording(model, canvas, label, cfg, device, dtype, aug):  # noqa: ANN001, ANN202
        calls.append((canvas, label, aug))
        return real_step_loss(model, canvas, label, cfg, device, dtype, aug)

    real_opt_step = torch.optim.AdamW.step

    def opt_step(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        return real_opt_step(self, *a, **k)

    monkeypatch.setattr(T, "step_loss", recording)
    monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)
    run = runs.open_run(tmp_path / "run", "streaming", {"t": 1})
    train_fold(run, 0, model, train, [], cfg, CPU, None, runs.Stopper(None), log=lambda *a: None)
    assert len(calls) == 3 and len(steps) == 2
    start.train()
    params = list(start.parameters())
    want = [torch.zeros_like(p) for p in params]
    for canvas, label, aug in calls[:2]:
        loss, _ = real_step_loss(start, canvas, label, cfg, CPU, None, aug)
        for w, g in zip(want, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                w += g / 2
    got = [torch.zeros_like(p) if g is None else g for p, g in zip(params, steps[0])]
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) <= 1e-4 * scale


def test_the_training_loss_weights_bag_and_instance_losses_as_clam(monkeypatch) -> None:  # noqa: ANN001
    """CLAM's total loss: 0.7 * bag cross-entropy + 0.3 * instance-clustering loss (--instance-weight 0.3), computed
    here from the head run on the whole (dense, max-pooled) feature map."""
    cfg = TrainConfig(**CFG)
    model = _model(cfg).train()
    canvas = _canvas("c", 5)
    loss, probs = step_loss(model, canvas, 1, cfg, CPU, None, None)
    loss = loss.detach()
    with torch.no_grad():
        x = Normalize(model.spec.mean, model.spec.std)(canvas.pixels()[None])
        fmap = F.max_pool2d(model.stream.trunk(x), 2, 2, ceil_mode=True)
        out = model.head(fmap[0].flatten(1).T, label=1)
    bag = F.cross_entropy(out["logits"].reshape(1, -1), torch.tensor([1]))
    inst = out["instance_loss"]
    assert abs(float(bag) - float(inst)) > 1e-3  # the two terms differ: their weights are told apart
    assert float(loss) == pytest.approx(0.7 * float(bag) + 0.3 * float(inst), rel=1e-5)
    assert probs.tolist() == pytest.approx(torch.softmax(out["logits"].reshape(-1), 0).tolist(), abs=1e-6)


def test_normalize_applies_stain_gain_and_bias_then_clips_then_the_encoders_mean_std() -> None:
    """Per channel: v * gain + bias (0-255 units), clipped to [0, 255], then (v / 255 - mean) / std -- written out."""
    aug = Augment(gain=(1.1, 0.9, 1.0), bias=(10.0, -5.0, -30.0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    crop = torch.tensor([0, 20, 100, 250], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    got = Normalize(mean, std, aug)(crop)[0, :, 0]
    want = [[(min(max(v * g + b, 0), 255) / 255 - m) / s for v in (0, 20, 100, 250)]
            for g, b, m, s in zip(aug.gain, aug.bias, mean, std)]
    # e.g. channel 0 at 250: 250 * 1.1 + 10 = 285 -> 255 -> (1 - 0.5) / 0.2 = 2.5; channel 2 at 0: -30 -> 0 -> -1
    assert want[0][3] == pytest.approx(2.5) and want[2][0] == pytest.approx(-1.0)
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-5, atol=1e-6)


def test_augment_draw_covers_the_eight_flips_and_rotations_evenly() -> None:
    """Whole-image augmentation: every one of the 8 dihedral transforms (flip x rot90 0..3) drawn about equally
    (400 draws: each of the 8 within 3 sd of 50), and the stain jitter within +-5 % gain, +-5 % of 127.5 bias."""
    rng = np.random.default_rng(0)
    draws = [Augment.draw(rng) for _ in range(400)]
    counts = {(f, r): 0 for f in (False, True) for r in range(4)}
    for a in draws:
        counts[(a.flip, a.rot90)] += 1
    assert all(30 <= c <= 70 for c in counts.values()), counts
    gains = np.array([a.gain for a in draws])
    biases = np.array([a.bias for a in draws])
    assert gains.min() >= 0.95 and gains.max() <= 1.05 and gains.max() - gains.min() > 0.09
    assert np.abs(biases).max() <= 0.05 * 127.5 and biases.max() - biases.min() > 0.09 * 127.5


def test_a_tissue_box_larger_than_image_size_is_centre_cropped(tmp_path: Path) -> None:
    """--image-size smaller than the tissue box: the canvas is the box's centre (the centres agree within one canvas
    px), not its left / top part nor its right / bottom part."""
    from gigaslide.testing import make_slide

    s = make_slide(tmp_path / "s.tif", (1024, 768), mpp=0.5, seed=0, blobs=2)
    full = read_canvas(s, 2.0, 4096, 32)
    cap = read_canvas(s, 2.0, 40, 32)
    h, w = full.content_size
    assert h > 80 and w > 80 and cap.content_size == (40, 40)
    per = full.level0_per_px  # 4 level-0 px per canvas px
    for axis in (0, 1):
        centre_full = full.origin[axis] + (w if axis == 0 else h) * per / 2
        centre_cap = cap.origin[axis] + 40 * per / 2
        assert abs(centre_cap - centre_full) <= per, (axis, centre_cap, centre_full)


def test_the_heatmap_grid_covers_the_canvas_content_and_no_more(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """heatmap-streaming keeps the pooled positions over slide content: every content px lies in some position's box
    (a last, partial box included) and no box lies wholly beyond the content (over the canvas padding)."""
    import gigaslide.streaming.heatmap as H
    from gigaslide.testing import make_slide

    cfg = TrainConfig(**CFG, mpp=1.0, image_size=4096)
    model = _model(cfg).eval()
    monkeypatch.setattr(H, "load_run_model", lambda run, fold, device: (model, cfg, 2))
    run = tmp_path / "run"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "best.safetensors").write_bytes(b"x")  # hashed into the grid only
    s = make_slide(tmp_path / "s.tif", (768, 512), mpp=0.5, seed=3, blobs=2)
    res = H.streaming_heatmap(s, run, tmp_path / "h.png", device="cpu")
    c = read_canvas(s, 1.0, 4096, 32)
    ch, cw = c.content_size
    box = res["box_level0_px"]
    assert box == 64 * c.level0_per_px and ch % 64 and cw % 64  # partial last boxes on both axes
    xy = np.asarray(res["coords"], float)
    end = (c.origin[0] + cw * c.level0_per_px, c.origin[1] + ch * c.level0_per_px)
    assert (xy[:, 0] < end[0]).all() and (xy[:, 1] < end[1]).all()  # each box starts inside the content
    assert xy[:, 0].max() + box >= end[0] and xy[:, 1].max() + box >= end[1]  # the last boxes reach its end
    for axis in (0, 1):  # a full grid of boxes from the canvas origin
        assert np.array_equal(np.unique(xy[:, axis]), c.origin[axis] + box * np.arange(len(np.unique(xy[:, axis]))))
    assert len(xy) == len(np.unique(xy, axis=0)) == len(np.unique(xy[:, 0])) * len(np.unique(xy[:, 1]))
    assert res["grid"] is not None

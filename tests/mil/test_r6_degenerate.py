"""Review round 6 (degenerate numbers): a loss that turns NaN mid-training, feature dimensions constant over the
training fold."""

import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.mil import train as T
from gigaslide.mil.train import TrainConfig, feature_stats, predict, train_fold

torch.set_num_threads(1)


def _bags(n=12, d=8, seed=0):
    r = np.random.default_rng(seed)
    y = np.arange(n) % 2
    bags = []
    for c in y:
        x = r.normal(size=(10, d)).astype(np.float32)
        if c:
            x[:3, 1:3] += 3.0
        bags.append(torch.from_numpy(x))
    return bags, y


class _NanAfter(torch.nn.Module):
    """Mean pooling whose logits turn NaN from the ``k``-th training forward on (finite features, diverged weights)."""

    def __init__(self, in_dim, n_classes, k):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, n_classes)
        self.k, self.calls = k, 0

    def forward(self, bag, label=None, cells=None):
        self.calls += 1
        logits = self.fc(bag.mean(0))
        if self.training and self.calls > self.k:
            logits = logits * float("nan")
        return {"logits": logits, "instance_scores": bag[:, 0], "attention": None}


def test_a_nan_loss_stops_training_at_its_step(monkeypatch):
    """Without a validation split (few-shot draws, tiny folds) a NaN loss at step k went on for every epoch left and
    was only noticed when the NaN model met its test slides; now training stops at that step, naming it."""
    made = []

    def build(name, in_dim, n_classes, **kw):
        made.append(_NanAfter(in_dim, n_classes, k=5))
        return made[-1]

    monkeypatch.setattr(T, "build_model", build)
    bags, y = _bags()
    cfg = TrainConfig(model="mean", epochs=20, patience=20, standardize=False)
    with pytest.raises(GigaslideError, match=r"training loss is nan at epoch 0, step 5 \(bag \d+\): training diverged"
                       r".*lower --lr"):
        train_fold(bags, y, [], np.array([], int), 8, 2, cfg)
    assert made[0].calls == 6  # stopped there, not after 20 epochs x 12 bags


def test_a_dimension_constant_over_the_training_tiles_is_not_blown_up():
    """A unit that never fires on the training tiles (all 0) was divided by the std floor 1e-6: a test tile where it
    fires at 1.0 became 1e6 and pushed every test slide to the same class (AUC 0.5). It gets std 1 (sklearn's
    StandardScaler), so that tile moves the predictions as any other feature value would."""
    bags, y = _bags(n=20)
    for b in bags:
        b[:, 0] = 0.0
    mean, std = feature_stats(bags)
    assert std[0].item() == 1.0 and mean[0].item() == 0.0
    assert torch.all(std[1:] > 0.5)  # the other dimensions keep their own std
    cfg = TrainConfig(model="abmil", epochs=1, lr=3e-3, hidden=16, patience=10)
    model, _ = train_fold(bags, y, [], np.array([], int), 8, 2, cfg)
    test, yte = _bags(n=12, seed=1)
    for b in test:
        b[:, 0] = 0.0
    p0, _ = predict(model, test)
    for b in test:
        b[0, 0] = 1.0  # one tile per test slide
    p1, _ = predict(model, test)
    assert np.abs(p1 - p0).max() < 0.1, np.abs(p1 - p0).max()


def test_leaderboard_says_why_the_localisation_auc_is_undefined(tmp_path):
    """A mosaic without a test slide of tumour and normal tiles (--task composition, or all-tumour slides) has no
    localisation AUC: the leaderboard printed `nan` in that column."""
    from gigaslide.mil.benchmark import leaderboard_markdown
    from gigaslide.mil.heatmap import run_localisation

    loc = run_localisation(tmp_path, tmp_path)
    assert loc["n_slides"] == 0
    row = {"encoder": "e", "dim": 8, "tile": {}, "slide": {"auc": {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0}},
           "localisation": loc}
    last = leaderboard_markdown([row]).strip().splitlines()[-1]
    assert "nan" not in last and last.endswith("| undefined: no test slide has both tumour and normal tiles |")
    assert "0.900 [0.800, 1.000]" in last

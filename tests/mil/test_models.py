import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.mil.models import MIL_MODELS, build_model
from gigaslide.mil.train import TrainConfig, load_model, predict, save_model, train_fold

torch.set_num_threads(1)
ALL = ["mean", "max", "abmil", "clam_sb", "clam_mb", "transmil"]


def test_registry_has_all_models():
    assert MIL_MODELS.names() == sorted(ALL)
    with pytest.raises(GigaslideError, match="unknown mil"):
        build_model("gcn", 8, 2)


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_order_invariance(name):
    torch.manual_seed(0)
    m = build_model(name, 16, 3).eval()
    x = torch.randn(37, 16)
    with torch.no_grad():
        out = m(x)
        out2 = m(x[perm := torch.randperm(37)])
    assert out["logits"].shape == (3,)
    assert out["instance_scores"].shape == (37,)
    if out["attention"] is not None:
        assert out["attention"].shape == (37,) and float(out["attention"].sum()) == pytest.approx(1.0, abs=1e-5)
        assert (out["attention"] >= 0).all()
    torch.testing.assert_close(out2["logits"], out["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2["instance_scores"], out["instance_scores"][perm], atol=1e-5, rtol=1e-5)
    assert m(x[:1])["logits"].shape == (3,)  # a single tile works


@pytest.mark.parametrize("name", ALL)
def test_empty_bag_is_a_clear_error(name):
    with pytest.raises(GigaslideError, match="empty bag"):
        build_model(name, 8, 2)(torch.zeros(0, 8))


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_instance_loss(name):
    torch.manual_seed(0)
    m = build_model(name, 8, 2, k_sample=4)
    out = m(torch.randn(20, 8), label=1)
    loss = out["instance_loss"]
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert m.instance_classifiers[1].weight.grad is not None and m.instance_classifiers[1].weight.grad.abs().sum() > 0
    assert "instance_loss" not in m(torch.randn(20, 8))
    assert float(m(torch.randn(1, 8), label=0)["instance_loss"]) == 0.0  # too few tiles: no instance loss


def _toy_bags(n, seed, d=8):
    """Positive bags hide 3 'tumour' tiles (features 0, 1 shifted by +3) among 5-17 normal ones."""
    r = np.random.default_rng(seed)
    bags, ys, keys = [], [], []
    for i in range(n):
        y = i % 2
        x = r.normal(size=(r.integers(8, 20), d)).astype(np.float32)
        key = np.zeros(len(x), bool)
        if y:
            key[:3] = True
            x[:3, :2] += 3.0
        bags.append(torch.from_numpy(x))
        ys.append(y)
        keys.append(key)
    return bags, np.array(ys), keys


@pytest.mark.parametrize("name", ALL)
def test_learns_key_instance_bags(name, tmp_path):
    from gigaslide.evaluation.metrics import auc

    bags, y, _ = _toy_bags(72, 0)
    tb, ty, tkeys = _toy_bags(40, 1)
    cfg = TrainConfig(model=name, epochs=10, lr=2e-3, hidden=32, seed=0, patience=12)
    model, info = train_fold(bags[:60], y[:60], bags[60:], y[60:], 8, 2, cfg)
    probs, scores = predict(model, tb)
    assert auc(ty, probs) > 0.9, name
    assert info["epochs_run"] >= 1 and 0 <= info["best_epoch"] < info["epochs_run"]
    if name in ("abmil", "clam_sb", "max"):  # tile scores localise the key tiles in positive bags
        # (clam_mb's tumour-branch attention is not forced to localise: class 0's branch can do the work)
        pos = [i for i in range(len(tb)) if ty[i] == 1]
        loc = np.mean([auc(tkeys[i].astype(int), scores[i]) for i in pos])
        assert loc > 0.8, (name, loc)
    save_model(tmp_path / "m", model, cfg, in_dim=8, n_classes=2, extra={"encoder": "toy"})
    m2, meta = load_model(tmp_path / "m")
    assert meta["model"] == name and meta["encoder"] == "toy"
    p2, _ = predict(m2, tb)
    np.testing.assert_allclose(p2, probs, atol=1e-6)


def test_load_model_missing(tmp_path):
    with pytest.raises(GigaslideError, match="no trained MIL model"):
        load_model(tmp_path)

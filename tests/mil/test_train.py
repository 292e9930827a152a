import numpy as np
import torch

from gigaslide.mil.train import TrainConfig, predict, train_fold

torch.set_num_threads(1)


def _noise_bags(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(5, 15, (1,), generator=g)), d, generator=g) for _ in range(n)]


def test_class_weights_balance_an_imbalanced_cohort():
    # 36 bags of class 0 and 4 of class 1, features carrying no label signal: the class-weighted loss is minimised by
    # predicting the classes evenly (mean P(class 1) near 0.5); an unweighted loss -- e.g. cross_entropy's weight=
    # on a batch of one bag, which divides it out again -- by the prior, 0.1
    bags = _noise_bags(40)
    y = np.array([0] * 36 + [1] * 4)
    cfg = TrainConfig(model="mean", epochs=15, lr=3e-3, hidden=8, patience=15, dropout=0.0)
    model, _ = train_fold(bags, y, [], np.array([], int), 8, 2, cfg)
    probs, _ = predict(model, _noise_bags(200, seed=1))
    assert 0.35 < probs[:, 1].mean() < 0.65


def test_standardized_model_takes_a_batched_bag():
    bags = [torch.randn(12, 8) * 5 + 3 for _ in range(8)]  # far from zero mean / unit std, as encoder features are
    cfg = TrainConfig(model="abmil", epochs=2, hidden=8, patience=2)
    model, _ = train_fold(bags, np.array([0, 1] * 4), [], np.array([], int), 8, 2, cfg)
    p2, s2 = predict(model, bags[:2])
    p3, s3 = predict(model, [b[None] for b in bags[:2]])  # [1, N, D], as CLAM / TRIDENT tensors come
    np.testing.assert_allclose(p3, p2, atol=1e-6)
    np.testing.assert_allclose(s3[0], s2[0], atol=1e-6)


def test_a_model_refuses_features_of_other_weights_or_another_mpp():
    from types import SimpleNamespace

    import pytest

    from gigaslide.errors import GigaslideError
    from gigaslide.mil.train import check_features_fit

    meta = {"in_dim": 96, "encoder": "test_resnet", "encoder_weights_sha256": "random-seed0", "mpp": 0.5}

    def feats(weights: str, mpp: float) -> SimpleNamespace:
        return SimpleNamespace(dim=96, encoder="test_resnet", mpp=mpp, attrs={"encoder_weights_sha256": weights})

    check_features_fit(meta, feats("random-seed0", 0.5), "x")  # what it was trained on
    with pytest.raises(GigaslideError, match="other weights"):
        check_features_fit(meta, feats("random-seed1", 0.5), "x")
    with pytest.raises(GigaslideError, match="1 µm/px"):
        check_features_fit(meta, feats("random-seed0", 1.0), "x")


def test_fp16_training_scales_each_bags_loss(monkeypatch):
    """Where `auto` is fp16 (GPUs without native bf16, simulated here on CPU), each bag's loss goes through an
    enabled loss scaler, or small gradients flush to zero (tests/test_devices.py shows the flush)."""
    from gigaslide import devices

    real = devices.choose_precision
    monkeypatch.setattr(devices, "choose_precision",
                        lambda device, precision="auto", *a, **k: devices.PrecisionChoice("auto", "fp16")
                        if precision == "auto" else real(device, precision, *a, **k))
    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scaled.append(self.is_enabled())
        return real_scale(self, outputs)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    cfg = TrainConfig(model="abmil", epochs=1, hidden=8, patience=1)
    model, _ = train_fold(_noise_bags(6), np.array([0, 1] * 3), [], np.array([], int), 8, 2, cfg)
    assert scaled == [True] * 6

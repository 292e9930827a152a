import numpy as np
import pytest
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


class _HugeAttention(torch.nn.Module):
    """A model whose forward asks the allocator for too much on bags of more than 10 tiles (TransMIL's N x N
    attention over 50,000 tiles: 40 GB)."""

    def __init__(self, in_dim, n_classes, **_):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, n_classes)

    def forward(self, bag, label=None, cells=None):
        if len(bag) > 10:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 40283701264 bytes. Error code 12")
        return {"logits": self.fc(bag).mean(0), "instance_scores": bag[:, 0]}


def test_a_bag_too_large_for_memory_is_one_line_naming_its_file(tmp_path, monkeypatch):
    from gigaslide.errors import GigaslideError
    from gigaslide.features import store
    from gigaslide.mil.bags import Bags

    monkeypatch.setattr("gigaslide.mil.train.build_model", lambda name, d, c, **k: _HugeAttention(d, c))
    r = np.random.default_rng(0)
    for i, n in enumerate((6, 40, 8, 9)):
        store.save(tmp_path / f"s{i}.h5", r.normal(size=(n, 4)).astype(np.float32), attrs={"encoder": "toy",
                                                                                            "slide_id": f"s{i}"})
    files = store.load_dir(tmp_path, arrays=False)
    bags = Bags([files[f"s{i}"] for i in range(4)], 1 << 30)
    y = np.array([0, 1, 0, 1])
    cfg = TrainConfig(epochs=1, min_epochs=1)
    with pytest.raises(GigaslideError, match=r"s1\.h5: out of memory on a bag of 40 tiles in training .*fix: train "
                                             r"with --max-tiles") as e:
        train_fold(bags.take([0, 1]), y[:2], bags.take([]), y[:0], 4, 2, cfg)
    assert "\n" not in str(e.value)
    model, _ = train_fold(bags.take([0, 2, 3]), y[[0, 2, 3]], bags.take([]), y[:0], 4, 2, cfg)
    with pytest.raises(GigaslideError, match=r"s1\.h5: out of memory on a bag of 40 tiles \("):
        predict(model, bags.take([2, 1]))
    from gigaslide.mil.train import _bag_memory

    with pytest.raises(RuntimeError, match="other"), _bag_memory(bags, 0, 6, True):  # others are not dressed up
        raise RuntimeError("other")

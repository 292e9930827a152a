import torch
from torch import nn

from gigaslide.encoders import build_encoder
from gigaslide.encoders.inference import fold_batchnorm, for_inference

torch.set_num_threads(1)


def _bns(m):
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _trained_bn_stats(enc):
    """Random init has BN mean 0 / var 1 / weight 1 / bias 0, where folding is nearly the identity: give every
    batch norm other statistics, as trained weights have."""
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return enc


def test_folded_resnet_gives_the_same_features_without_batchnorms():
    for name in ("resnet18", "resnet18_layer3"):
        enc = _trained_bn_stats(build_encoder(name, "random")).eval()
        n_bn = _bns(enc)
        x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
        with torch.no_grad():
            ref = enc(x)
            fast = for_inference(enc)
            out = fast(x)
        assert n_bn > 0 and _bns(fast) == 0 and fast.bn_folded, name
        assert _bns(enc) == n_bn  # the caller's encoder is left as it was
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert fast.spec == enc.spec and fast.weights_id == enc.weights_id
        assert fast.trunk(torch.zeros(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)).shape[1] == enc.embed_dim


def test_folding_is_not_the_identity_on_trained_statistics():
    """The check above could pass with folding that ignores the statistics only if they did not matter: they do."""
    enc = build_encoder("resnet18", "random").eval()
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        before = enc(x)
        after = _trained_bn_stats(enc)(x)
    assert float((after - before).abs().max()) > 1e-2


def test_models_without_batchnorm_or_untraceable_are_used_as_they_are():
    vit = build_encoder("test_vit", "random")
    assert fold_batchnorm(vit.trunk) is None and for_inference(vit) is vit and not vit.bn_folded

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.bn(self.conv(x))

    assert fold_batchnorm(Untraceable()) is None

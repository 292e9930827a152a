"""TransMIL's Nystrom attention layer: the class token's attention row against exact attention and against the
``nystrom-attention`` package's own attention matrix; fp32 under autocast."""

import math

import pytest
import torch

from gigaslide.mil.nystrom import NystromSelfAttention


def _exact_cls_row(layer: NystromSelfAttention, x: torch.Tensor, heads: int) -> torch.Tensor:
    n, d = x.shape
    q, k, _ = layer.attn.to_qkv(layer.norm(x)).chunk(3, -1)
    q, k = (t.view(n, heads, d // heads).transpose(0, 1) for t in (q, k))
    return torch.softmax(q[:, :1] @ k.transpose(1, 2) / math.sqrt(d // heads), -1)[:, 0].mean(0)


def test_class_token_row_is_exact_attention_when_every_token_is_a_landmark():
    # with one landmark per token, A pinv(A) A = A: the Nystrom row is softmax(q_cls K^T / sqrt(dh)) itself
    torch.manual_seed(0)
    n, d, h = 12, 16, 2
    layer = NystromSelfAttention(d, h, 0.0, landmarks=n, pinv_iterations=30).eval()
    x = torch.randn(n, d)
    _, row = layer(x, return_cls_attention=True)
    torch.testing.assert_close(row, _exact_cls_row(layer, x, h), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [7, 10, 23])
def test_class_token_row_is_the_package_matrix_row_after_its_front_padding(n):
    torch.manual_seed(1)
    d, h = 16, 4
    layer = NystromSelfAttention(d, h, 0.0, landmarks=5).eval()
    x = torch.randn(n, d)
    y, row = layer(x, return_cls_attention=True)
    out, full = layer.attn(layer.norm(x)[None], return_attn=True)
    pad = full.shape[-1] - n  # the package pads its sequence at the front to a multiple of the landmarks
    assert row.shape == (n,)
    torch.testing.assert_close(row, full[0, :, pad, pad:].mean(0).clamp_min(0))
    torch.testing.assert_close(y, x + out[0])  # the paper's TransLayer: x + attention(LayerNorm(x))


def test_default_landmarks_are_half_the_width_as_in_transmil():
    assert NystromSelfAttention(64, 8, 0.1).attn.num_landmarks == 32


def test_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    layer = NystromSelfAttention(32, 4, 0.0).eval()
    x = torch.randn(50, 32)
    ref, ref_row = layer(x, return_cls_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, row = layer(x, return_cls_attention=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(row, ref_row)


@pytest.mark.parametrize("n", [1, 5, 37])
def test_transmil_with_nystrom_attention_gives_an_attention_over_its_tiles(n):
    from gigaslide.mil.models import build_model

    torch.manual_seed(0)
    model = build_model("transmil", 8, 2, hidden=32, heads=4, attention="nystrom").eval()
    assert isinstance(model.layers[0], NystromSelfAttention) and model.layers[0].attn.num_landmarks == 16
    out = model(torch.randn(n, 8))
    a = out["attention"]
    assert out["logits"].shape == (2,) and torch.isfinite(out["logits"]).all()
    assert a.shape == (n,) and (a >= 0).all() and float(a.detach().sum()) == pytest.approx(1.0, abs=1e-5)


def test_transmil_with_nystrom_attention_learns_a_tumour_tile_task():
    """Bags whose label is whether one of 30 tiles carries the 'tumour' direction: the Nystrom TransMIL fits them
    (the class token's last-layer attention does not single that tile out, with exact attention neither: the first
    layer has spread it over the tokens)."""
    from gigaslide.mil.models import build_model

    g = torch.Generator().manual_seed(0)
    bags, labels = [], []
    for i in range(48):
        x = torch.randn(30, 8, generator=g) * 0.3
        y = i % 2
        k = int(torch.randint(0, 30, (1,), generator=g))
        if y:
            x[k, 0] += 3.0
        bags.append(x)
        labels.append(y)
    torch.manual_seed(0)
    model = build_model("transmil", 8, 2, hidden=32, heads=4, dropout=0.0, ppeg=False, attention="nystrom",
                        landmarks=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for x, y in zip(bags, labels):
            loss = torch.nn.functional.cross_entropy(model(x)["logits"][None], torch.tensor([y]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        outs = [model(x) for x in bags]
    acc = sum(int(o["logits"].argmax()) == y for o, y in zip(outs, labels)) / len(bags)
    assert acc >= 0.95


def test_transmil_attention_settings_are_checked():
    from gigaslide.errors import GigaslideError
    from gigaslide.mil.models import build_model, model_settings

    assert {"attention", "landmarks"} <= set(model_settings("transmil"))
    with pytest.raises(GigaslideError, match="attention 'linear'"):
        build_model("transmil", 8, 2, attention="linear")
    with pytest.raises(GigaslideError, match="landmarks"):
        build_model("transmil", 8, 2, landmarks=16)  # exact attention has none


def test_train_mil_with_nystrom_transmil_saves_and_reloads_it(tmp_path):
    from gigaslide.cli.main import main
    from gigaslide.mil.train import load_model

    from .test_cv import _make

    feats, lab = _make(tmp_path)
    out = tmp_path / "run"
    assert main(["train-mil", "--features", str(feats), "--labels", str(lab), "--model", "transmil", "--folds", "2",
                 "--epochs", "1", "--hidden", "16", "--bootstrap", "0", "--model-args", '{"attention": "nystrom"}',
                 "--out", str(out)]) == 0
    model, meta = load_model(out / "fold0")
    assert meta["train_config"]["model_kwargs"] == {"attention": "nystrom"}
    assert isinstance(model.mil.layers[0], NystromSelfAttention)

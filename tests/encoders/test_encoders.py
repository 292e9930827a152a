from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from gigaslide.encoders import ENCODERS, build_encoder, create_trunk, export_encoder
from gigaslide.errors import GigaslideError


def _x() -> torch.Tensor:
    return torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_registry_entries_carry_preprocessing():
    for name, spec in ENCODERS.items():
        assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.input_size > 0, name
        assert spec.weight_source
    assert ENCODERS.get("encoder/resnet18").embed_dim == 512
    assert ENCODERS.get("vit_small_dinov2").arch.endswith("patch14_dinov2")
    with pytest.raises(GigaslideError, match="unknown encoder"):
        ENCODERS.get("nope")


def test_golden_tiny_resnet():
    enc = build_encoder("test_resnet", "random", seed=0)
    with torch.no_grad():
        f = enc(_x())
    assert f.shape == (2, 96)
    assert f.sum().item() == pytest.approx(18.8708, rel=1e-3)
    assert f[0, :3].tolist() == pytest.approx([0.079722, 0.0, 0.143286], abs=1e-4)


def test_uint8_and_float_inputs_agree():
    enc = build_encoder("test_resnet", "random")
    x = _x()
    with torch.no_grad():
        a = enc(x)
        b = enc(x.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_roundtrip_and_prefix_stripping(tmp_path, suffix):
    src = build_encoder("test_resnet", "random", seed=3)
    sd = {"module.backbone." + k: v for k, v in src.trunk.state_dict().items()}
    sd["head.fc.weight"] = torch.zeros(2, 2)  # a classifier head the trunk does not have is dropped
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    enc = build_encoder("test_resnet", str(path))
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), src(_x()))
    assert enc.weights_id.startswith("sha256:")


def test_wrong_architecture_weights_refused(tmp_path):
    vit = create_trunk(ENCODERS.get("test_vit"))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(GigaslideError, match="do not fit encoder 'test_resnet'"):
        build_encoder("test_resnet", str(path))


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(GigaslideError, match="cannot load weights"):
        build_encoder("test_resnet", str(path))


def test_hub_weights_from_local_cache(tmp_path, monkeypatch):
    src = build_encoder("resnet18", "random", seed=1)
    snap = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in src.trunk.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    save_file(sd, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    enc = build_encoder("resnet18")  # default weights = the entry's hub id, from the cache
    x = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src(x))


@pytest.mark.parametrize("name,repo", [("uni", "MahmoodLab/UNI"), ("virchow2", "paige-ai/Virchow2")])
def test_missing_hub_weights_clear_offline_error(tmp_path, monkeypatch, name, repo):
    import gigaslide.encoders.model as M

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("GIGASLIDE_WEIGHTS", raising=False)
    monkeypatch.setattr(M, "create_trunk", lambda spec: pytest.fail("the model was built before its weights were found"))
    with pytest.raises(GigaslideError) as e:
        build_encoder(name)
    assert repo in str(e.value) and "--weights" in str(e.value)


def test_export_roundtrip_keeps_preprocessing(tmp_path):
    import dataclasses

    enc = build_encoder("test_vit", "random", seed=2)
    spec = dataclasses.replace(enc.spec, name="my_ssl", mean=(0.7, 0.5, 0.6), std=(0.2, 0.25, 0.2))
    export_encoder(tmp_path / "encoder", enc.trunk, spec)
    back = build_encoder(str(tmp_path / "encoder"))
    assert back.spec.name == "my_ssl" and back.spec.mean == (0.7, 0.5, 0.6) and back.spec.input_size == 64
    assert torch.allclose(back.mean.flatten(), torch.tensor([0.7, 0.5, 0.6]))


def test_dinov2_pos_embed_is_resampled(tmp_path):
    """A DINOv2 checkpoint at 518 px (37x37 patches) loads into the 224 px (16x16) entry."""
    import timm

    big = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(path))
    enc = build_encoder("vit_small_dinov2", str(path))
    assert enc.trunk.pos_embed.shape[1] == 1 + 16 * 16
    with torch.no_grad():
        assert enc(torch.zeros(1, 224, 224, 3, dtype=torch.uint8)).shape == (1, 384)


def test_weights_are_assigned_into_a_meta_trunk_without_a_random_init(tmp_path, monkeypatch):
    """With a checkpoint the trunk is made on the meta device and the checkpoint's tensors become its weights (cast to
    the trunk's dtypes): nothing is left on meta, the features are the checkpoint's, and no random init runs."""
    import gigaslide.encoders.model as M

    src = build_encoder("test_vit", "random", seed=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in src.trunk.state_dict().items()}, str(path))
    made_off_meta = []
    real = M.create_trunk
    monkeypatch.setattr(M, "create_trunk", lambda spec: made_off_meta.append(torch.empty(0).device.type != "meta")
                        or real(spec))
    enc = build_encoder("test_vit", str(path))
    assert made_off_meta == [False]  # one trunk, made on the meta device
    tensors = list(enc.trunk.parameters()) + list(enc.trunk.buffers())
    assert not any(t.is_meta for t in tensors) and {t.dtype for t in tensors} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), src(_x()), atol=2e-2, rtol=0)  # fp16 checkpoint of fp32 weights


def test_a_trunk_with_unsaved_buffers_is_not_assigned_from_meta():
    from torch import nn

    from gigaslide.encoders.model import assignable

    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0), persistent=False)  # made in __init__, never saved

    assert not assignable(WithTable())
    assert assignable(create_trunk(ENCODERS.get("test_resnet")))  # batch-norm statistics are saved


@pytest.mark.parametrize("size", [64, 80])  # the input size, and one the encoder resizes from
def test_preprocess_normalises_as_the_spec_says_and_leaves_the_input_alone(size):
    import torch.nn.functional as F

    enc = build_encoder("test_resnet", "random", seed=0)
    spec = enc.spec
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    u8 = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    f01 = u8.permute(0, 3, 1, 2).float() / 255.0
    ref = f01 if size == spec.input_size else F.interpolate(
        f01, size=(spec.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    ref = (ref - mean) / std
    before = f01.clone()
    for x in (u8, f01):
        got = enc.preprocess(x)
        assert got.shape == (2, 3, spec.input_size, spec.input_size)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(f01, before)  # a float batch is not normalised in place

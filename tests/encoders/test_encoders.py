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


def test_weights_of_a_compiled_model_load(tmp_path):
    """``torch.compile`` wraps a model: its state dict keys start with ``_orig_mod.`` (``module._orig_mod.`` under DDP);
    they were refused as weights of another architecture."""
    src = build_encoder("test_resnet", "random", seed=3)
    sd = {k: v.contiguous() for k, v in torch.compile(src.trunk).state_dict().items()}
    assert all(k.startswith("_orig_mod.") for k in sd)
    path = tmp_path / "compiled.safetensors"
    save_file({"module." + k: v for k, v in sd.items()}, str(path))
    enc = build_encoder("test_resnet", str(path))
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), src(_x()))


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


def _tiny_dinov2(arch: str, img_size: int, depth: int = 2) -> torch.nn.Module:
    import timm

    torch.manual_seed(5)
    m = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, embed_dim=32, depth=depth,
                          num_heads=2)
    with torch.no_grad():
        m.pos_embed.normal_()
    return m


def _save(m: torch.nn.Module, path) -> str:  # noqa: ANN001
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return str(path)


def test_registers_dinov2_pos_embed_at_another_size_is_resampled_as_timm_does(tmp_path):
    """timm's DINOv2-with-registers hub weights are at 518 px and keep no position for the class and register tokens
    (``no_embed_class``): the whole embedding is the patch grid. It is resampled to the entry's grid exactly as timm's
    own loader does (it was cut as if it had 5 prefix positions: a crash for every ``vit_*_dinov2_reg`` entry)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    big = _tiny_dinov2("vit_small_patch14_reg4_dinov2", 98)  # 7x7 patches, the entry has 4x4
    enc = build_encoder("test_vit_dinov2_reg", _save(big, tmp_path / "reg.safetensors"))
    want = checkpoint_filter_fn(dict(big.state_dict()), create_trunk(ENCODERS.get("test_vit_dinov2_reg")))["pos_embed"]
    assert enc.trunk.pos_embed.shape == (1, 16, 32)
    torch.testing.assert_close(enc.trunk.pos_embed, want)
    assert torch.equal(enc.trunk.reg_token, big.reg_token)


@pytest.mark.parametrize("src,dst", [("vit_small_patch14_reg4_dinov2", "test_vit_dinov2"),
                                     ("vit_small_patch14_dinov2", "test_vit_dinov2_reg")])
def test_pos_embed_of_a_variant_with_other_prefix_tokens_is_a_one_line_error(tmp_path, src, dst):
    path = _save(_tiny_dinov2(src, 56), tmp_path / "w.safetensors")
    with pytest.raises(GigaslideError, match=f"do not fit encoder '{dst}'.*position embedding") as e:
        build_encoder(dst, path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_weights_of_a_deeper_vit_are_refused_not_cut_to_the_entrys_depth(tmp_path):
    path = _save(_tiny_dinov2("vit_small_patch14_dinov2", 56, depth=4), tmp_path / "deep.safetensors")
    with pytest.raises(GigaslideError, match=r"do not fit encoder 'test_vit_dinov2'.*unexpected \(e.g. \['blocks.2."):
        build_encoder("test_vit_dinov2", path)


def test_a_full_resnet_checkpoint_loads_into_its_truncated_entry(tmp_path):
    """The stages a truncated ResNet leaves out (and the classifier) are dropped on purpose, not refused."""
    import timm

    torch.manual_seed(6)
    full = timm.create_model("resnet18", pretrained=False)
    enc = build_encoder("resnet18_layer3", _save(full, tmp_path / "r18.safetensors"))
    own = enc.trunk.state_dict()
    assert all(torch.equal(own[k], full.state_dict()[k]) for k in own)


def test_exporting_the_same_weights_again_gives_the_same_weights_hash(tmp_path):
    """The weights hash that provenance records must not change when identical weights are exported again (the
    safetensors header held its metadata in hash-map order, so repeated exports differed in their bytes)."""
    enc = build_encoder("test_resnet", "random", seed=0)
    ids = set()
    for i in range(6):
        export_encoder(tmp_path / f"e{i}", enc.trunk, enc.spec)
        ids.add(build_encoder(str(tmp_path / f"e{i}")).weights_id)
    assert len(ids) == 1
    other = build_encoder("test_resnet", "random", seed=1)
    export_encoder(tmp_path / "other", other.trunk, other.spec)
    assert build_encoder(str(tmp_path / "other")).weights_id not in ids


def test_a_training_checkpoint_with_teacher_and_student_gives_the_teacher():
    """DINO / DINOv2 training checkpoints hold student.backbone.* before teacher.backbone.*; the teacher is the
    model those methods evaluate and release, so it is the one loaded."""
    from gigaslide.encoders.weights import strip_prefixes

    t, s = torch.ones(2), torch.zeros(2)
    sd = {"student.backbone.blocks.0.w": s, "teacher.backbone.blocks.0.w": t, "teacher.dino_head.w": t}
    out = strip_prefixes(sd, {"blocks.0.w"})
    assert torch.equal(out["blocks.0.w"], t)
    assert torch.equal(strip_prefixes({"backbone.blocks.0.w": s}, {"blocks.0.w"})["blocks.0.w"], s)


def test_an_empty_weights_file_is_one_line_naming_it(tmp_path):
    """An interrupted download leaves a 0-byte .bin: torch.load's error has no text (was an IndexError traceback)."""
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")
    with pytest.raises(GigaslideError, match="weights file is empty") as e:
        build_encoder("test_resnet", str(path))
    assert str(path) in str(e.value)


def test_torch_load_messages_lose_their_terminal_colour_codes(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"obj": object()}, path)
    with pytest.raises(GigaslideError, match="cannot load weights") as e:
        build_encoder("test_resnet", str(path))
    assert "\x1b" not in str(e.value)


def test_hub_cache_uses_the_snapshot_refs_main_names(tmp_path, monkeypatch):
    """Two revisions in the cache: the one refs/main names is the model's weights (as huggingface_hub resolves them
    offline), even when another revision's folder is newer."""
    import os

    main = build_encoder("test_resnet", "random", seed=1)
    other = build_encoder("test_resnet", "random", seed=2)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    for rev, enc in (("mainrev", main), ("oldrev", other)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in enc.trunk.state_dict().items()},
                  str(repo / "snapshots" / rev / "model.safetensors"))
    os.utime(repo / "snapshots" / "mainrev", (1e9, 1e9))  # the older folder
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("mainrev")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("GIGASLIDE_WEIGHTS", raising=False)
    from gigaslide.encoders.weights import resolve_hub_weights

    assert resolve_hub_weights("hf-hub:timm/resnet18.a1_in1k").parent.name == "mainrev"


def test_weights_may_be_a_downloaded_model_folder(tmp_path):
    """``huggingface-cli download REPO --local-dir DIR`` (UNI's and Virchow's model cards) leaves a folder;
    --weights DIR loads its weights file (it said 'weights file not found' of a folder that is there); a folder
    without one says so."""
    src = build_encoder("test_resnet", "random", seed=4)
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "config.json").write_text("{}")
    torch.save({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, tmp_path / "uni" / "pytorch_model.bin")
    enc = build_encoder("test_resnet", str(tmp_path / "uni"))
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), src(_x()))
    from gigaslide.provenance import file_sha256

    assert enc.weights_id == "sha256:" + file_sha256(tmp_path / "uni" / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GigaslideError, match="folder holds no weights file"):
        build_encoder("test_resnet", str(tmp_path / "empty"))


@pytest.mark.parametrize("var,sub", [("XDG_CACHE_HOME", "huggingface/hub"), ("HUGGINGFACE_HUB_CACHE", "")])
def test_hub_cache_is_found_where_huggingface_hub_puts_it(tmp_path, monkeypatch, var, sub):
    """huggingface_hub caches under $XDG_CACHE_HOME/huggingface/hub when that is set (clusters set it to scratch),
    and honours the older HUGGINGFACE_HUB_CACHE: weights downloaded there were 'not in the local cache'."""
    from gigaslide.encoders.weights import resolve_hub_weights

    for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "GIGASLIDE_WEIGHTS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    snap = tmp_path / "cache" / sub / "models--MahmoodLab--UNI" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setenv(var, str(tmp_path / "cache"))
    assert resolve_hub_weights("hf-hub:MahmoodLab/UNI") == snap / "pytorch_model.bin"


def test_a_pretrain_run_folder_is_read_as_its_encoder_export(tmp_path):
    """`--encoder RUN_DIR` (what `pretrain --init RUN_DIR` takes) was 'not an encoder export folder'."""
    enc = build_encoder("test_resnet", "random", seed=5)
    export_encoder(tmp_path / "run" / "encoder", enc.trunk, enc.spec)
    back = build_encoder(str(tmp_path / "run"))
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), enc(_x()))


def test_weights_of_another_entry_name_the_entries_they_fit(tmp_path):
    """'pick the --encoder these weights were trained for' left the user to guess; the error names the entries."""
    src = build_encoder("resnet18", "random", seed=0)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(path))
    with pytest.raises(GigaslideError, match="do not fit encoder 'resnet34'") as e:
        build_encoder("resnet34", str(path))
    assert "--encoder resnet18" in str(e.value)
    assert "resnet50" not in str(e.value)


@pytest.mark.parametrize("keep,other", [("encoder_q", "encoder_k"), ("base_encoder", "momentum_encoder")])
def test_an_official_moco_checkpoint_gives_its_query_encoder(tmp_path, keep, other):
    """MoCo v2 (module.encoder_q / encoder_k, queue) and v3 (module.base_encoder / momentum_encoder, predictor)
    training checkpoints: the query / base encoder is loaded, never the momentum copy (they were refused)."""
    src = build_encoder("test_resnet", "random", seed=6)
    mom = build_encoder("test_resnet", "random", seed=7)
    sd = {f"module.{keep}.{k}": v for k, v in src.trunk.state_dict().items()}
    sd.update({f"module.{other}.{k}": v for k, v in mom.trunk.state_dict().items()})
    sd[f"module.{keep}.fc.0.weight"] = torch.zeros(8, 8)  # the projection head
    sd["module.queue"] = torch.zeros(8, 16)
    torch.save({"epoch": 200, "arch": "resnet", "state_dict": sd}, tmp_path / "checkpoint_0199.pth.tar")
    enc = build_encoder("test_resnet", str(tmp_path / "checkpoint_0199.pth.tar"))
    with torch.no_grad():
        torch.testing.assert_close(enc(_x()), src(_x()))

"""Encoder registry entries: each carries its architecture, preprocessing and weight source.

Like timm's pretrained configs, an entry says everything needed to use the weights correctly:
embedding size, input size, normalisation, the resolution (µm/px) it was trained at, and where
its weights come from. Third-party pathology encoders are listed with their hub ids; their
weights are resolved from a local cache only (no downloads at run time).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from gigaslide.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Lunit "Benchmarking SSL on pathology" (Kang et al. 2023) normalisation.
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
#: H-optimus-0 / H-optimus-1 (Bioptimus) normalisation, from their model cards.
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: How an encoder turns a ViT's tokens into one vector: the trunk's own output (``model``: timm's pooling, the class
#: token for these ViTs), or the class token concatenated with the mean of the patch tokens (``cls_mean``, Virchow's
#: embedding; register tokens are left out of the mean).
POOLS = ("model", "cls_mean")


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str  # timm architecture name
    embed_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_mpp: float | None = None  # µm/px the weights were trained at (None: natural images)
    hub: str | None = None  # e.g. "hf-hub:MahmoodLab/UNI"; resolved from local cache only
    weight_source: str = "random"  # human description of where weights come from
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "cnn"  # "cnn" or "vit"
    description: str = ""
    pool: str = "model"  # one of POOLS

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"encoder '{self.name}': pool must be one of {POOLS}, not {self.pool!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def _add(spec: EncoderSpec) -> None:
    ENCODERS.add(spec.name, spec)


# Plain architectures (weights: --weights PATH, a hub cache, or random for tests/benchmarks).
_add(EncoderSpec("resnet18", "resnet18", 512, hub="hf-hub:timm/resnet18.a1_in1k", weight_source="ImageNet (timm) from local cache",
                 description="ResNet-18, global-average-pooled 512-d"))
_add(EncoderSpec("resnet34", "resnet34", 512, hub="hf-hub:timm/resnet34.a1_in1k", weight_source="ImageNet (timm) from local cache"))
_add(EncoderSpec("resnet50", "resnet50", 2048, hub="hf-hub:timm/resnet50.a1_in1k", weight_source="ImageNet (timm) from local cache"))
_add(EncoderSpec("resnet50_trunc", "resnet50", 1024, hub="hf-hub:timm/resnet50.tv_in1k",
                 weight_source="ImageNet (torchvision) from local cache", timm_kwargs={"out_stage": 3},
                 description="CLAM's truncated ResNet-50: layer3 features, average-pooled 1024-d"))
_add(EncoderSpec("vit_small", "vit_small_patch16_224", 384, family="vit", hub="hf-hub:timm/vit_small_patch16_224.dino",
                 weight_source="DINO ImageNet (timm) from local cache"))
_add(EncoderSpec("vit_base", "vit_base_patch16_224", 768, family="vit", hub="hf-hub:timm/vit_base_patch16_224.dino",
                 weight_source="DINO ImageNet (timm) from local cache"))
_add(EncoderSpec("vit_small_dinov2", "vit_small_patch14_dinov2", 384, input_size=224, family="vit",
                 hub="hf-hub:timm/vit_small_patch14_dinov2.lvd142m", weight_source="DINOv2 LVD-142M (timm) from local cache",
                 timm_kwargs={"img_size": 224}, description="DINOv2 ViT-S/14 (Roth et al. start point), at 224 px"))
_add(EncoderSpec("vit_base_dinov2", "vit_base_patch14_dinov2", 768, input_size=224, family="vit",
                 hub="hf-hub:timm/vit_base_patch14_dinov2.lvd142m", weight_source="DINOv2 LVD-142M (timm) from local cache",
                 timm_kwargs={"img_size": 224}))
for _size, _dim in (("large", 1024), ("giant", 1536)):
    _add(EncoderSpec(f"vit_{_size}_dinov2", f"vit_{_size}_patch14_dinov2", _dim, input_size=224, family="vit",
                     hub=f"hf-hub:timm/vit_{_size}_patch14_dinov2.lvd142m", weight_source="DINOv2 LVD-142M (timm) from local cache",
                     timm_kwargs={"img_size": 224}))
for _size, _dim in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536)):
    _add(EncoderSpec(f"vit_{_size}_dinov2_reg", f"vit_{_size}_patch14_reg4_dinov2", _dim, input_size=224, family="vit",
                     hub=f"hf-hub:timm/vit_{_size}_patch14_reg4_dinov2.lvd142m",
                     weight_source="DINOv2 with 4 register tokens, LVD-142M (timm) from local cache",
                     timm_kwargs={"img_size": 224}, description=f"DINOv2 ViT-{_size[0].upper()}/14 with registers, at 224 px"))
_add(EncoderSpec("vit_tiny_dinov2", "vit_small_patch14_dinov2", 192, input_size=98, family="vit", weight_source="random",
                 timm_kwargs={"img_size": 98, "embed_dim": 192, "num_heads": 3},
                 description="ViT-Ti/14 in the DINOv2 layout (LayerScale), no pretrained weights: small foundation models on CPU"))
# Third-party pathology encoders (weights from a local hub cache; gated models must be fetched by the user).
_add(EncoderSpec("lunit_dino_vits16", "vit_small_patch16_224", 384, mean=LUNIT_MEAN, std=LUNIT_STD, native_mpp=0.5, family="vit",
                 hub="hf-hub:1aurent/vit_small_patch16_224.lunit_dino", weight_source="Lunit DINO ViT-S/16 (Kang et al. 2023)"))
_add(EncoderSpec("lunit_bt_resnet50", "resnet50", 2048, mean=LUNIT_MEAN, std=LUNIT_STD, native_mpp=0.5,
                 hub="hf-hub:1aurent/resnet50.lunit_bt", weight_source="Lunit Barlow Twins ResNet-50 (Kang et al. 2023)"))
_add(EncoderSpec("lunit_swav_resnet50", "resnet50", 2048, mean=LUNIT_MEAN, std=LUNIT_STD, native_mpp=0.5,
                 hub="hf-hub:1aurent/resnet50.lunit_swav", weight_source="Lunit SwAV ResNet-50 (Kang et al. 2023)"))
_add(EncoderSpec("uni", "vit_large_patch16_224", 1024, native_mpp=0.5, family="vit", hub="hf-hub:MahmoodLab/UNI",
                 weight_source="UNI (Chen et al. 2024), gated: accept the licence, download, then use the local cache",
                 timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True}))
_add(EncoderSpec("phikon", "vit_base_patch16_224", 768, native_mpp=0.5, family="vit", hub="hf-hub:owkin/phikon",
                 weight_source="Phikon iBOT ViT-B/16 (Filiot et al. 2023)",
                 description="Phikon ViT-B/16: a transformers ViTModel checkpoint, converted on load; class token 768-d"))
_add(EncoderSpec("phikon_v2", "vit_large_patch14_dinov2", 1024, native_mpp=0.5, family="vit", hub="hf-hub:owkin/phikon-v2",
                 weight_source="Phikon-v2 DINOv2 ViT-L/16 (Filiot et al. 2024)", timm_kwargs={"img_size": 224, "patch_size": 16},
                 description="Phikon-v2 ViT-L/16: a transformers Dinov2Model checkpoint, converted on load; class token 1024-d"))
# Large pathology foundation models (timm layouts, as their model cards build them; gated: accept each licence and
# download the weights on a machine with internet, then use the local cache or --weights PATH). SwiGLU MLPs and SiLU
# are named (JSON-safe) and resolved when the trunk is made (gigaslide.encoders.model.create_trunk).
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_add(EncoderSpec("uni2_h", "vit_giant_patch14_224", 1536, native_mpp=0.5, family="vit", hub="hf-hub:MahmoodLab/UNI2-h",
                 weight_source="UNI2-h (Mahmood Lab 2025), gated: accept the licence, download, then use the local cache",
                 timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                              "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                              "dynamic_img_size": True, **_SWIGLU},
                 description="UNI2-h ViT-H/14 with 8 register tokens, class token 1536-d"))
for _name, _hub, _regs, _what in (("virchow", "paige-ai/Virchow", 0, "Virchow (Vorontsov et al. 2024)"),
                                  ("virchow2", "paige-ai/Virchow2", 4, "Virchow2 (Zimmermann et al. 2024)")):
    _add(EncoderSpec(_name, "vit_huge_patch14_224", 2560, native_mpp=0.5, family="vit", hub=f"hf-hub:{_hub}", pool="cls_mean",
                     weight_source=f"{_what}, gated: accept the licence, download, then use the local cache",
                     timm_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True,
                                  **({"reg_tokens": _regs} if _regs else {}), **_SWIGLU},
                     description=f"{_what.split(' (')[0]} ViT-H/14{f' with {_regs} register tokens' if _regs else ''}: "
                                 "class token + mean patch token, 2560-d (the model card's embedding)"))
for _v in (0, 1):
    _add(EncoderSpec(f"h_optimus_{_v}", "vit_giant_patch14_reg4_dinov2", 1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
                     native_mpp=0.5, family="vit", hub=f"hf-hub:bioptimus/H-optimus-{_v}",
                     weight_source=f"H-optimus-{_v} (Bioptimus): accept its terms on the hub, download, then use the "
                                   "local cache",
                     timm_kwargs={"img_size": 224, "init_values": 1e-5},
                     description=f"H-optimus-{_v} ViT-g/14 (DINOv2 layout, 4 register tokens), class token 1536-d"))
_add(EncoderSpec("prov_gigapath", "vit_giant_patch14_dinov2", 1536, native_mpp=0.5, family="vit",
                 hub="hf-hub:prov-gigapath/prov-gigapath",
                 weight_source="Prov-GigaPath tile encoder (Xu et al. 2024), gated: accept the licence, download, then use "
                               "the local cache",
                 timm_kwargs={"img_size": 224, "patch_size": 16},
                 description="Prov-GigaPath tile encoder: ViT-g in the DINOv2 layout with 16-px patches, class token 1536-d"))
# Tiny architectures for tests and quick benchmarks.
_add(EncoderSpec("test_resnet", "test_resnet", 0, input_size=64, weight_source="random (tests only)",
                 description="tiny timm ResNet for tests"))
_add(EncoderSpec("test_vit", "test_vit", 0, input_size=64, family="vit", weight_source="random (tests only)",
                 timm_kwargs={"img_size": 64}, description="tiny timm ViT for tests"))
_add(EncoderSpec("test_vit_dinov2", "vit_small_patch14_dinov2", 0, input_size=56, family="vit", weight_source="random (tests only)",
                 timm_kwargs={"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2},
                 description="tiny DINOv2-layout ViT/14 for tests"))
_add(EncoderSpec("test_vit_dinov2_reg", "vit_small_patch14_reg4_dinov2", 0, input_size=56, family="vit",
                 weight_source="random (tests only)", timm_kwargs={"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2},
                 description="tiny DINOv2-layout ViT/14 with 4 register tokens for tests"))
_add(EncoderSpec("test_vit_swiglu", "vit_huge_patch14_224", 0, input_size=56, family="vit", weight_source="random (tests only)",
                 pool="cls_mean", timm_kwargs={"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 1e-5,
                                               "mlp_ratio": 5.3375, "reg_tokens": 4, "dynamic_img_size": True, **_SWIGLU},
                 description="tiny Virchow2-layout ViT/14 (SwiGLU, 4 register tokens, class + mean patch token) for tests"))
# Giga-SSL's tile features (Lazard et al. 2023): ResNet-18 truncated after layer3, average-pooled 256-d.
_add(EncoderSpec("resnet18_layer3", "resnet18", 256, hub="hf-hub:timm/resnet18.a1_in1k",
                 weight_source="ImageNet (timm) from local cache", timm_kwargs={"out_stage": 3},
                 description="ResNet-18 truncated after layer3, average-pooled 256-d (Giga-SSL's tile features)"))

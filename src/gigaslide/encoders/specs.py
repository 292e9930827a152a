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
                 weight_source="Phikon iBOT ViT-B/16 (Filiot et al. 2023)"))
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
# Giga-SSL's tile features (Lazard et al. 2023): ResNet-18 truncated after layer3, average-pooled 256-d.
_add(EncoderSpec("resnet18_layer3", "resnet18", 256, hub="hf-hub:timm/resnet18.a1_in1k",
                 weight_source="ImageNet (timm) from local cache", timm_kwargs={"out_stage": 3},
                 description="ResNet-18 truncated after layer3, average-pooled 256-d (Giga-SSL's tile features)"))

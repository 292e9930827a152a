"""Stage 3 — encoders: a registry of tile encoders (CNNs, ViTs, own or third-party weights)."""

from gigaslide.encoders.model import (Encoder, build_encoder, create_trunk, export_encoder, load_weights_into, trunk_width,
                                      with_embed_dim)
from gigaslide.encoders.specs import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from gigaslide.encoders.weights import read_state_dict, resolve_hub_weights

__all__ = ["ENCODERS", "IMAGENET_MEAN", "IMAGENET_STD", "Encoder", "EncoderSpec", "build_encoder", "create_trunk",
           "export_encoder", "load_weights_into", "read_state_dict", "resolve_hub_weights", "trunk_width", "with_embed_dim"]

"""Tile-level self-supervised pre-training (Kang et al. 2023; Roth et al. 2024)."""

from gigaslide.ssl.tile import dinov2 as _dinov2  # noqa: F401  (registers --method dinov2 in SSL_METHODS)

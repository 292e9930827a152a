"""Tile-level self-supervised pre-training (Kang et al. 2023; Roth et al. 2024)."""

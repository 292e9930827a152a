"""Stages 5-6 — self-supervised learning: ``ssl.tile`` (tile encoders: MoCo v2, SwAV, Barlow Twins,
DINO, SimCLR; foundation-model continuation) and ``ssl.slide`` (slide encoders: Giga-SSL, SLPD)."""

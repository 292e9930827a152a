"""Slide-level supervised learning: MIL models, training, mosaic benchmark slides, heatmaps."""

"""Stage 4 — features: batched tile encoding into one HDF5 file per slide (CLAM/TRIDENT layout)."""

from gigaslide.features.store import FeatureFile, check_consistent, list_feature_files, load, load_dir, save

__all__ = ["FeatureFile", "check_consistent", "list_feature_files", "load", "load_dir", "save"]

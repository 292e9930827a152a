"""One evaluation protocol for every tile- and slide-level result of gigaslide.

* :mod:`gigaslide.evaluation.metrics` -- AUC (one-vs-rest), balanced accuracy, macro-F1, bootstrap CIs.
* :mod:`gigaslide.evaluation.splits` -- labels.csv validation, patient-grouped stratified folds,
  validation splits inside training folds, few-shot repeated draws.
* :mod:`gigaslide.evaluation.tiles` -- linear / k-NN / few-shot probes on frozen tile features.
* :mod:`gigaslide.evaluation.slides` -- reads per-fold slide prediction CSVs (the contract every
  slide-level method writes) and reports AUC / balanced accuracy with bootstrap CIs.
* :mod:`gigaslide.evaluation.compare` -- paired comparisons of two results on the same test items (tiles by
  fingerprint, slides by id), the one way gigaslide says one model beats another.
"""

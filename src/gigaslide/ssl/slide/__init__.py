"""Slide-level self-supervised learning: Giga-SSL (Lazard et al. 2023) and SLPD (Yu et al. 2023).

* :mod:`.sparse` — submanifold sparse convolution over the tile grid (plain PyTorch);
* :mod:`.encoders` — ``SLIDE_ENCODERS`` registry: ``sparseconvmil``, ``abmil``, ``mean``;
* :mod:`.cache` / :mod:`.views` — the augmented-view feature cache (``gigaslide augment-cache``);
* :mod:`.gigassl` — SimCLR over cached views (``gigaslide pretrain-slides --method gigassl``);
* :mod:`.regions`, :mod:`.prototypes`, :mod:`.slpd` — SLPD (``--method slpd``);
* :mod:`.embed` — ``gigaslide embed-slides`` (HDF5 ``slide_ids`` + ``embeddings``);
* :mod:`.sampling` — Giga-SSL per-step views and the view-retrieval monitor;
* :mod:`.export` — run folders on :mod:`gigaslide.runs` (safetensors export, config, feature checks).

Imports are lazy: ``import gigaslide.ssl.slide.gigassl`` etc.
"""

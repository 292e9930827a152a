"""embed-slides records its run by the same name however --model is spelled (relative, '.', absolute)."""

from __future__ import annotations

import h5py

from gigaslide.features import store
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.slpd import pretrain_slpd

SLPD = dict(epochs=1, region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
            head_dim=64, n_local=2)


def test_model_given_as_dot_records_the_run_and_names_the_region_encoder(tmp_path, make_fake_cache, monkeypatch):
    """`--model .` (inside the run folder) recorded run '.' and named the region encoder 'slpd:' (an empty name)."""
    data = make_fake_cache(tmp_path / "cache", n_slides=2, n_tiles=36)
    run = tmp_path / "slpd_run"
    pretrain_slpd(data, run, device="cpu", log=lambda *a: None, **SLPD)
    embed_slides(run, data, tmp_path / "abs.h5", regions_out=tmp_path / "regions", device="cpu")
    monkeypatch.chdir(run)
    e = embed_slides(".", data, tmp_path / "dot.h5", regions_out=tmp_path / "regions_dot", device="cpu")
    assert e.attrs["run"] == str(run.resolve())
    with h5py.File(tmp_path / "dot.h5") as f:
        assert f.attrs["run"] == str(run.resolve())
    a = store.load(tmp_path / "regions" / "features" / "slide0.h5")
    b = store.load(tmp_path / "regions_dot" / "features" / "slide0.h5")
    assert b.encoder == a.encoder == "slpd:slpd_run"
    assert b.attrs["run"] == a.attrs["run"] == str(run.resolve())

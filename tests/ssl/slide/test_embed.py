"""embed-slides: the provenance of what it writes."""
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.provenance import file_sha256
from gigaslide.ssl.slide.embed import embed_slides
from gigaslide.ssl.slide.slpd import pretrain_slpd

SLPD = dict(region_size=256, region_mpp=0.5, prototypes=2, warmup=1, batch_size=16, dim=16, depth=1, heads=2,
            head_dim=32, n_local=2, device="cpu", log=lambda *a: None)


def test_region_files_of_two_slpd_runs_name_their_own_model_and_do_not_mix(tmp_path, make_fake_cache):
    """Region embeddings are the SLPD run's features: their weights hash is the run's model (not the tile encoder's,
    which two runs share), with the run's seed; a folder mixing two runs' region files -- runs with the same folder
    name, so the same encoder name -- is refused instead of feeding MIL two models' embeddings."""
    feats = make_fake_cache(tmp_path / "f", n_slides=4, n_tiles=36)
    for name, seed in (("a", 0), ("b", 1)):
        pretrain_slpd(feats, tmp_path / name / "slpd", epochs=1, seed=seed, **SLPD)
        embed_slides(tmp_path / name / "slpd", feats, tmp_path / f"{name}.h5", regions_out=tmp_path / f"reg_{name}")
    ff = store.load(tmp_path / "reg_b" / "features" / "slide0.h5")
    p = ff.provenance
    assert p.encoder == "slpd:slpd" and p.seed == 1 and p.mpp == 0.5 and p.tile_size == 256
    assert p.encoder_weights_sha256 == file_sha256(tmp_path / "b" / "slpd" / "model.safetensors")
    assert ff.attrs["tile_encoder"] == "fake" and ff.attrs["tile_encoder_weights_sha256"] == "x"
    mixed = tmp_path / "mixed" / "features"
    mixed.mkdir(parents=True)
    for name, sids in (("a", (0, 1)), ("b", (2, 3))):
        for s in sids:
            (mixed / f"slide{s}.h5").write_bytes((tmp_path / f"reg_{name}" / "features" / f"slide{s}.h5").read_bytes())
    with pytest.raises(GigaslideError, match="encoder_weights_sha256"):
        store.load_dir(tmp_path / "mixed")

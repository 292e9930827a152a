"""Per-tile cluster ids of slide-SSL runs (the viewer's cluster layer): SLPD prototypes, Giga-SSL tile states."""
import numpy as np
import pytest
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.ssl.slide.assign import gigassl_tile_states, tile_clusters
from gigaslide.ssl.slide.gigassl import load_encoder as load_gigassl, pretrain_gigassl
from gigaslide.ssl.slide.slpd import pretrain_slpd

def test_slpd_tiles_get_their_regions_planted_prototype(tmp_path, planted_slide):
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    means = rng.normal(scale=3.0, size=(2, 12))
    kinds = {f"s{s}": planted_slide(tmp_path / "f" / f"s{s}.h5", f"s{s}", [r % 2 for r in range(8)], 12, means, rng)
             for s in range(4)}
    planted_slide(tmp_path / "small" / "t.h5", "t", [0, 1], 12, means, rng)  # 2 regions: too few for 2 prototypes
    pretrain_slpd(tmp_path / "f", tmp_path / "run", epochs=2, region_size=256, region_mpp=0.5, prototypes=2, warmup=1,
                  batch_size=16, dim=16, depth=1, heads=2, head_dim=64, n_local=2, log=lambda *a: None)
    for sid, kind in kinds.items():
        ff = store.load(tmp_path / "f" / f"{sid}.h5")
        c = tile_clusters(tmp_path / "run", ff)
        assert c.method == "slpd" and c.k == 2 and set(c.ids.tolist()) == {0, 1}
        assert adjusted_rand_score(kind, c.ids) == pytest.approx(1.0)  # every tile: its region's planted type
        assert all(len(set(c.ids[r * 16:(r + 1) * 16])) == 1 for r in range(8))  # one id per region
    with pytest.raises(GigaslideError, match="2 regions; SLPD gives prototypes to slides with at least 4"):
        tile_clusters(tmp_path / "run", store.load(tmp_path / "small" / "t.h5"))
    other = tmp_path / "o.h5"
    store.save(other, np.zeros((16, 12), np.float32), np.zeros((16, 2)), attrs={"encoder": "another", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": 64, "slide_id": "o"},
               coords_attrs={"patch_size_level0": 64.0, "level0_mpp": 0.5})
    with pytest.raises(GigaslideError, match="another"):
        tile_clusters(tmp_path / "run", store.load(other))


def test_gigassl_clusters_of_per_tile_states_separate_planted_tile_types(tmp_path, make_fake_cache, planted_slide):
    cache = make_fake_cache(tmp_path / "cache", n_slides=4, dim=8, n_tiles=16)
    pretrain_gigassl(cache, tmp_path / "run", epochs=1, out_dim=16, hidden=16, proj_dim=8, batch_size=4,
                     tiles_per_step=4, blocks=1, warmup_epochs=1, log=lambda *a: None)
    rng = np.random.default_rng(1)
    kind = planted_slide(tmp_path / "s.h5", "s", [0, 1, 0, 1, 1, 0, 1, 0], 8, rng.normal(scale=8.0, size=(2, 8)), rng)
    ff = store.load(tmp_path / "s.h5")
    c = tile_clusters(tmp_path / "run", ff)
    assert c.method == "gigassl" and c.k == 8 and c.ids.shape == (len(ff),) and c.ids.min() >= 0 and c.ids.max() < 8
    assert all(len(set(kind[c.ids == i])) == 1 for i in set(c.ids.tolist()))  # no cluster mixes the two types
    # the states are the encoder's own: its tile reduction, then the sparse block over grid neighbours
    enc, _ = load_gigassl(tmp_path / "run")
    states = gigassl_tile_states(enc, ff)
    with torch.no_grad():
        reduced = enc.reduce(torch.from_numpy(ff.features))
    assert states.shape == (len(ff), 16) and not np.allclose(states, reduced.numpy())
    moved = store.load(tmp_path / "s.h5")
    moved.coords = moved.coords.copy()
    moved.coords[[0, 40]] = moved.coords[[40, 0]]  # swap two tiles' places: their neighbourhoods change
    assert not np.allclose(gigassl_tile_states(enc, moved)[0], states[0])

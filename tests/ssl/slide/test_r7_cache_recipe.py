"""Round 7, stage contracts: a slide cached with other weights / seed is not "finished" in another recipe's rebuild.

cache.json refuses a rebuild with other weights, but a cache without one (deleted, or built before it) skipped the
slides cached with the old weights and cached the new slides with the new ones: a mixed cache (refused only later, by
pretrain-slides) and a cache.json naming the new weights for every slide."""
import json

from gigaslide.features import store
from gigaslide.ssl.slide.cache import build_augment_cache
from gigaslide.testing import make_slide

KW = dict(encoder="test_resnet", weights="random", views=2, tiles_per_view=4, mpp=2.0, tile_size=32,
          log=lambda *a: None, device="cpu")


def test_a_rebuild_with_other_weights_recaches_the_slides_of_the_old_ones(tmp_path):
    slides = [str(make_slide(tmp_path / f"s{i}.tiff", (640, 448), mpp=2.0, seed=i)) for i in range(2)]
    build_augment_cache(slides[:1], tmp_path / "c", seed=0, **KW)
    (tmp_path / "c" / "cache.json").unlink()
    res = build_augment_cache(slides, tmp_path / "c", seed=1, **KW)  # random weights of seed 1: other weights
    assert res.done == ["s0", "s1"] and res.skipped == []
    want = json.loads((tmp_path / "c" / "cache.json").read_text())["encoder_weights_sha256"]
    for p in sorted((tmp_path / "c" / "features").glob("*.h5")):
        a = store.read_attrs(p)
        assert a["encoder_weights_sha256"] == want and a["seed"] == 1
    again = build_augment_cache(slides, tmp_path / "c", seed=1, **KW)  # the same recipe: nothing to redo
    assert again.skipped == ["s0", "s1"] and again.done == []

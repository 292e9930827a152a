import json

import numpy as np
import pytest
from PIL import Image

from gigaslide.encoders import build_encoder
from gigaslide.errors import GigaslideError
from gigaslide.features import store
from gigaslide.features.tiles import embed_arrays, embed_tile_folder


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "tiles" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "tiles" / c / f"{i}.png")
    return tmp_path / "tiles"


def test_folder_features_equal_array_features_and_carry_labels(folder, tmp_path):
    enc = build_encoder("test_resnet", "random", seed=0)
    s = embed_tile_folder(enc, folder, tmp_path / "f.h5", batch_size=3, max_per_class=4)
    ff = store.load(tmp_path / "f.h5")
    assert s["n"] == 8 and not s["reused"] and np.bincount(ff.labels).tolist() == [4, 4]
    assert json.loads(ff.attrs["classes"]) == ["a", "b"] and ff.attrs["encoder_weights_sha256"] == enc.weights_id
    imgs = [np.asarray(Image.open(folder / c / f"{i}.png")) for c in "ab" for i in range(5)]
    ref = embed_arrays(enc, np.stack(imgs))
    # every stored row equals the direct embedding of one of the folder's images
    d = np.abs(ff.features[:, None] - ref[None]).max(-1)
    assert (d.min(1) < 1e-5).all()


def test_same_encoder_reuses_the_file_other_weights_rewrite_it(folder, tmp_path):
    enc = build_encoder("test_resnet", "random", seed=0)
    embed_tile_folder(enc, folder, tmp_path / "f.h5")
    assert embed_tile_folder(enc, folder, tmp_path / "f.h5")["reused"]
    other = build_encoder("test_resnet", "random", seed=1)
    assert other.weights_id != enc.weights_id
    assert not embed_tile_folder(other, folder, tmp_path / "f.h5")["reused"]
    assert store.load(tmp_path / "f.h5").attrs["encoder_weights_sha256"] == other.weights_id


def test_the_same_weights_under_another_entry_are_embedded_again(folder, tmp_path):
    """One weights file under two registry entries with other preprocessing (vit_small: ImageNet mean / std,
    lunit_dino_vits16: Lunit's) gives other features: the file of the first is not 'reused' for the second."""
    import dataclasses

    from gigaslide.encoders import ENCODERS
    from gigaslide.encoders.model import Encoder

    enc = build_encoder("test_resnet", "random", seed=0)
    lunit = dataclasses.replace(enc.spec, name="test_resnet_lunit", mean=ENCODERS.get("lunit_dino_vits16").mean,
                                std=ENCODERS.get("lunit_dino_vits16").std)
    other = Encoder(lunit, enc.trunk, enc.weights_id).eval()  # the same weights, other normalisation
    embed_tile_folder(enc, folder, tmp_path / "f.h5")
    s = embed_tile_folder(other, folder, tmp_path / "f.h5")
    ff = store.load(tmp_path / "f.h5")
    assert not s["reused"] and ff.attrs["encoder"] == "test_resnet_lunit"
    assert ff.attrs["precision"] == "fp32"  # on a CPU; on a GPU autocast's bf16 / fp16, recorded as encode does
    imgs = np.stack([np.asarray(Image.open(folder / c / f"{i}.png")) for c in "ab" for i in range(5)])
    d = np.abs(ff.features[:, None] - embed_arrays(other, imgs)[None]).max(-1)
    assert (d.min(1) < 1e-5).all()


def test_an_unreadable_tile_is_named_and_left_out_and_the_job_goes_on(folder, tmp_path):
    """A batch job reports a broken item and goes on: the file holds the readable tiles with their own labels,
    and its fingerprint is that of those tiles, so it still pairs with another encoder's file of the folder."""
    a, b = build_encoder("test_resnet", "random", seed=0), build_encoder("test_resnet", "random", seed=1)
    clean = embed_tile_folder(a, folder, tmp_path / "clean.h5")
    (folder / "a" / "2b.png").write_bytes(b"broken")  # sorts among a's tiles, so labels after it would shift
    s = embed_tile_folder(b, folder, tmp_path / "f.h5", batch_size=3)
    assert list(s["skipped"]) == ["a/2b.png"] and "cannot" in s["skipped"]["a/2b.png"] and s["n"] == clean["n"] == 10
    ff, ref = store.load(tmp_path / "f.h5"), store.load(tmp_path / "clean.h5")
    assert ff.labels.tolist() == ref.labels.tolist() == [0] * 5 + [1] * 5
    assert ff.attrs["tiles_fingerprint"] == ref.attrs["tiles_fingerprint"] and ff.attrs["n_skipped"] == 1
    assert json.loads(ff.attrs["skipped_files"]) == s["skipped"]
    again = embed_tile_folder(b, folder, tmp_path / "f.h5")  # resumed: reused, and it still names the broken tile
    assert again["reused"] and again["skipped"] == s["skipped"]
    for f in folder.rglob("*.png"):
        f.write_bytes(b"broken")
    with pytest.raises(GigaslideError, match="none of the 11 images could be read"):
        embed_tile_folder(a, folder, tmp_path / "none.h5")
    assert not (tmp_path / "none.h5").exists()


def test_provenance_records_the_tiles_read_not_the_encoder(folder, tmp_path):
    enc = build_encoder("test_resnet", "random", seed=0)  # input size 64; the tiles are 40 px, mpp unknown
    embed_tile_folder(enc, folder, tmp_path / "f.h5")
    attrs = store.load(tmp_path / "f.h5").attrs
    assert attrs["tile_size"] == 40 and "mpp" not in attrs
    embed_tile_folder(enc, folder, tmp_path / "g.h5", mpp=0.97)
    assert store.load(tmp_path / "g.h5").attrs["mpp"] == pytest.approx(0.97)


def test_the_file_records_which_tiles_it_holds_and_a_changed_tile_is_re_embedded(folder, tmp_path):
    """The tiles' fingerprint (names, labels, content) is what paired comparisons check: same folder -> same
    fingerprint whatever the encoder; one tile's pixels changed under the same name -> another one, not reused."""
    a, b = build_encoder("test_resnet", "random", seed=0), build_encoder("test_resnet", "random", seed=1)
    embed_tile_folder(a, folder, tmp_path / "a.h5")
    embed_tile_folder(b, folder, tmp_path / "b.h5")
    fp = store.load(tmp_path / "a.h5").attrs["tiles_fingerprint"]
    assert fp == store.load(tmp_path / "b.h5").attrs["tiles_fingerprint"]
    embed_tile_folder(a, folder, tmp_path / "few.h5", max_per_class=4)
    assert store.load(tmp_path / "few.h5").attrs["tiles_fingerprint"] != fp  # other tiles
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "a" / "0.png")
    assert not embed_tile_folder(a, folder, tmp_path / "a.h5")["reused"]
    assert store.load(tmp_path / "a.h5").attrs["tiles_fingerprint"] != fp


def test_a_folder_with_an_unreadable_tile_hashes_each_file_once_and_still_sees_a_changed_one(folder, tmp_path,
                                                                                            monkeypatch):
    """With a broken tile, the kept tiles' fingerprint comes from the digests already taken (each file's bytes are
    read once per run for hashing, not twice); a resume reads each once (the listing's check) and reuses; a kept
    tile changed under its name is still seen (embedded again, another fingerprint: that of the tiles now)."""
    from collections import Counter
    from pathlib import Path

    from gigaslide.tiling.folders import labelled_images, tiles_fingerprint

    (folder / "a" / "2b.png").write_bytes(b"broken")
    enc = build_encoder("test_resnet", "random", seed=0)
    reads: Counter = Counter()
    read_bytes = Path.read_bytes

    def counted(self):  # noqa: ANN001, ANN202
        reads[self.relative_to(folder).as_posix()] += 1
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counted)
    s = embed_tile_folder(enc, folder, tmp_path / "f.h5", batch_size=4)
    assert list(s["skipped"]) == ["a/2b.png"] and s["n"] == 10
    assert sum(reads.values()) == 11 and set(reads.values()) == {1}
    reads.clear()
    assert embed_tile_folder(enc, folder, tmp_path / "f.h5", batch_size=4)["reused"]
    assert sum(reads.values()) == 11 and set(reads.values()) == {1}
    monkeypatch.undo()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "b" / "3.png")
    again = embed_tile_folder(enc, folder, tmp_path / "f.h5", batch_size=4)
    assert not again["reused"] and again["skipped"] == s["skipped"]
    files, labels, _ = labelled_images(folder)
    keep = [i for i, f in enumerate(files) if f.name != "2b.png"]
    want = tiles_fingerprint(folder, [files[i] for i in keep], labels[keep])
    assert store.load(tmp_path / "f.h5").attrs["tiles_fingerprint"] == want

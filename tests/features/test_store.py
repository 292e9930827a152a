from __future__ import annotations

import h5py
import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.features import store


def test_roundtrip_with_provenance(tmp_path):
    f = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    c = np.arange(10).reshape(5, 2)
    store.save(tmp_path / "s.h5", f, c, attrs={"encoder": "resnet18", "mpp": 0.5, "tile_size": 224, "slide_id": "s"},
               coords_attrs={"patch_size": 224, "patch_size_level0": 448}, labels=np.array([0, 1, 0, 1, 1]))
    ff = store.load(tmp_path / "s.h5")
    np.testing.assert_array_equal(ff.features, f)
    np.testing.assert_array_equal(ff.coords, c)
    assert ff.encoder == "resnet18" and ff.mpp == 0.5 and ff.tile_size_level0 == 448 and ff.slide_id == "s"
    assert ff.attrs["format_version"] == 1 and "gigaslide_version" in ff.attrs
    assert ff.labels.tolist() == [0, 1, 0, 1, 1]
    assert not list(tmp_path.glob(".tmp-*"))


def test_reads_clam_and_trident_files(tmp_path):
    with h5py.File(tmp_path / "clam.h5", "w") as h:  # CLAM: features [N, D], coords [N, 2]
        h["features"] = np.ones((3, 4), np.float32)
        h["coords"] = np.zeros((3, 2), np.int64)
        h["coords"].attrs["patch_size"] = 256
    with h5py.File(tmp_path / "trident.h5", "w") as h:  # TRIDENT-style [1, N, D]
        h["features"] = np.ones((1, 3, 4), np.float32)
        h["coords"] = np.zeros((3, 2), np.int32)
        h["coords"].attrs["patch_size_level0"] = 512
    a, b = store.load(tmp_path / "clam.h5"), store.load(tmp_path / "trident.h5")
    assert a.features.shape == b.features.shape == (3, 4)
    assert a.slide_id == "clam" and b.tile_size_level0 == 512 and b.coords.dtype == np.int64


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(GigaslideError, match="not found"):
        store.load(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(GigaslideError, match="cannot read HDF5"):
        store.load(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "nofeat.h5", "w") as h:
        h["coords"] = np.zeros((1, 2))
    with pytest.raises(GigaslideError, match="no 'features'"):
        store.load(tmp_path / "nofeat.h5")


def test_load_dir_refuses_mixed_encoders(tmp_path):
    store.save(tmp_path / "a.h5", np.zeros((2, 8), np.float32), attrs={"encoder": "resnet18", "slide_id": "a"})
    store.save(tmp_path / "b.h5", np.zeros((2, 16), np.float32), attrs={"encoder": "vit_small", "slide_id": "b"})
    with pytest.raises(GigaslideError, match=r"a.h5 and b.h5 differ in encoder \('resnet18' vs 'vit_small'\)"):
        store.load_dir(tmp_path)
    with pytest.raises(GigaslideError, match="no feature files"):
        store.list_feature_files(tmp_path / "nothing")  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "a", "b"), [("encoder_weights_sha256", "aa11", "bb22"), ("mpp", 0.5, 1.0),
                                             ("tile_size", 224, 256)])
def test_load_dir_refuses_files_from_other_weights_mpp_or_tile_size(tmp_path, key, a, b):
    base = {"encoder": "resnet18", "encoder_weights_sha256": "aa11", "mpp": 0.5, "tile_size": 224}
    store.save(tmp_path / "s1.h5", np.zeros((2, 8), np.float32), attrs={**base, key: a, "slide_id": "s1"})
    store.save(tmp_path / "s2.h5", np.zeros((2, 8), np.float32), attrs={**base, "slide_id": "s2"})
    store.save(tmp_path / "s3.h5", np.zeros((2, 8), np.float32), attrs={**base, key: b, "slide_id": "s3"})
    with pytest.raises(GigaslideError, match=rf"s1.h5 and s3.h5 differ in {key}") as e:
        store.load_dir(tmp_path)
    assert "--out" in str(e.value)


def test_same_encoder_other_dimension_is_refused(tmp_path):
    store.save(tmp_path / "a.h5", np.zeros((2, 8), np.float32), attrs={"encoder": "x"})
    store.save(tmp_path / "b.h5", np.zeros((2, 4), np.float32), attrs={"encoder": "x"})
    with pytest.raises(GigaslideError, match=r"differ in feature dimension \(4 vs 8\)"):
        store.load_dir(tmp_path)


def test_missing_mpp_is_absent_and_legacy_zero_reads_as_absent(tmp_path):
    store.save(tmp_path / "a.h5", np.zeros((2, 8), np.float32), attrs={"encoder": "x", "mpp": None})
    store.save(tmp_path / "b.h5", np.zeros((2, 8), np.float32), attrs={"encoder": "x", "mpp": 0.0})
    a, b = store.load(tmp_path / "a.h5"), store.load(tmp_path / "b.h5")
    assert "mpp" not in a.attrs and a.mpp is None and b.mpp is None and b.provenance.mpp is None
    store.load_dir(tmp_path)  # both unknown: compatible


def test_tile_size_level0_from_attrs_or_coordinate_step(tmp_path):
    c = np.array([[0, 0], [448, 0], [0, 448]])
    store.save(tmp_path / "a.h5", np.zeros((3, 2), np.float32), c, attrs={"mpp": 0.5, "tile_size": 224},
               coords_attrs={"level0_mpp": 0.25})
    store.save(tmp_path / "b.h5", np.zeros((3, 2), np.float32), c)
    store.save(tmp_path / "c.h5", np.zeros((1, 2), np.float32), c[:1])
    assert store.load(tmp_path / "a.h5").tile_size_level0 == 448.0
    assert store.load(tmp_path / "b.h5").tile_size_level0 == 448.0
    with pytest.raises(GigaslideError, match="cannot tell the tile size"):
        store.load(tmp_path / "c.h5").require_tile_size_level0()


def test_lazy_loads_read_clam_and_trident_layouts_and_name_a_file_damaged_after_opening(tmp_path):
    with h5py.File(tmp_path / "trident.h5", "w") as h:  # TRIDENT-style [1, N, D]
        h["features"] = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
        h["coords"] = np.zeros((3, 2), np.int32)
    lazy = store.load(tmp_path / "trident.h5", arrays=False)
    assert isinstance(lazy.features, store.LazyFeatures) and lazy.dim == 4 and len(lazy) == 3
    np.testing.assert_array_equal(np.asarray(lazy.features), store.load(tmp_path / "trident.h5").features)
    np.testing.assert_array_equal(lazy.features.read(own_mapping=True), np.arange(12).reshape(3, 4))
    eager = store.load(tmp_path / "trident.h5")
    assert eager.loaded() is eager and isinstance(lazy.loaded().features, np.ndarray)
    np.testing.assert_array_equal(lazy.loaded().features, eager.features)
    x = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32)
    store.save(tmp_path / "s.h5", x, attrs={"encoder": "e", "slide_id": "s"})
    ff = store.load(tmp_path / "s.h5", arrays=False)
    with h5py.File(tmp_path / "s.h5", "r") as h:
        offset = h["features"].id.get_chunk_info(0).byte_offset  # the first stored chunk of features
    raw = bytearray((tmp_path / "s.h5").read_bytes())
    raw[offset + 100] ^= 0xFF  # one flipped byte: the Fletcher-32 checksum no longer matches
    (tmp_path / "s.h5").write_bytes(bytes(raw))
    with pytest.raises(GigaslideError, match=r"s\.h5: cannot read HDF5"):
        np.asarray(ff.features)


def test_grid_cells_undo_fractional_strides_and_overlap(tmp_path):
    """Cells are the tiling's (column, row) indices from the file's top-left tile: a floored fractional stride and
    an overlap (step < tile side) map back to whole cells; a subset of the tiles (a view) keeps the file's origin."""
    cols, rows = np.meshgrid(np.arange(0, 300, 7), np.arange(3, 40, 3))
    k = np.stack([cols.ravel(), rows.ravel()], 1)
    tile0, ts, ov = 193.7, 224, 32  # level-0 tile side, tile px, overlap px: stride 193.7 * 192 / 224 = 166.03
    stride = tile0 * (ts - ov) / ts
    coords = np.floor(k * stride + 1e-9).astype(np.int64) + 1000
    store.save(tmp_path / "a.h5", np.zeros((len(k), 4), np.float32), coords,
               attrs={"tile_size": ts, "overlap": ov}, coords_attrs={"patch_size_level0": tile0})
    ff = store.load(tmp_path / "a.h5")
    np.testing.assert_array_equal(ff.grid_cells(), k - k.min(0))
    view = np.array([[5, 9], [40, 2]])  # [V, T] tile indices: cells keep their shape and the file's origin
    np.testing.assert_array_equal(ff.grid_cells(coords[view]), (k - k.min(0))[view])
    store.save(tmp_path / "b.h5", np.zeros((5, 4), np.float32))  # a tile folder: no positions
    assert store.load(tmp_path / "b.h5").grid_cells() is None
    store.save(tmp_path / "c.h5", np.zeros((1, 4), np.float32), np.array([[512, 256]]))  # one tile: its own cell 0
    np.testing.assert_array_equal(store.load(tmp_path / "c.h5").grid_cells(), [[0, 0]])


def test_grid_cells_of_a_trident_file_read_the_overlap_from_the_coords_attrs(tmp_path):
    """TRIDENT writes patch_size / overlap only as attrs of `coords`: overlapping tiles must still get one cell each."""
    coords = np.array([[x * 192, y * 192] for y in range(3) for x in range(8)])  # 256-px tiles, 64 px overlap
    store.save(tmp_path / "t.h5", np.zeros((len(coords), 4), np.float32), coords, attrs={"slide_id": "t"},
               coords_attrs={"patch_size": 256, "patch_size_level0": 256, "overlap": 64})
    cells = store.load(tmp_path / "t.h5").grid_cells()
    np.testing.assert_array_equal(cells, coords // 192)


def test_load_dir_refuses_two_files_of_one_slide(tmp_path):
    for name in "ab":
        store.save(tmp_path / f"{name}.h5", np.zeros((2, 4), np.float32), [[0, 0], [256, 0]],
                   attrs={"slide_id": "s"}, coords_attrs={"patch_size_level0": 256})
    with pytest.raises(GigaslideError, match="a.h5 and b.h5 both hold slide 's'"):
        store.load_dir(tmp_path)


def test_a_file_of_a_newer_format_is_refused_in_one_line(tmp_path):
    from gigaslide.provenance import FORMAT_VERSION

    store.save(tmp_path / "new.h5", np.zeros((2, 4), np.float32), [[0, 0], [256, 0]],
               attrs={"format_version": FORMAT_VERSION + 1})
    with pytest.raises(GigaslideError, match=f"format version {FORMAT_VERSION + 1}") as e:
        store.load(tmp_path / "new.h5")
    assert "new.h5" in str(e.value) and "upgrade" in e.value.one_line()
    store.save(tmp_path / "old.h5", np.zeros((2, 4), np.float32), [[0, 0], [256, 0]],
               attrs={"format_version": FORMAT_VERSION})
    assert len(store.load(tmp_path / "old.h5")) == 2


def test_load_dir_reads_a_clam_feature_folder(tmp_path):
    """CLAM's extract_features writes FEAT_DIR/h5_files/<slide>.h5 (and pt_files/): passing FEAT_DIR loads its .h5
    files as an encode output's features/ folder is loaded (it was 'no feature files (*.h5) here')."""
    (tmp_path / "clam" / "h5_files").mkdir(parents=True)
    (tmp_path / "clam" / "pt_files").mkdir()
    for sid in ("a", "b"):
        with h5py.File(tmp_path / "clam" / "h5_files" / f"{sid}.h5", "w") as h:
            h["features"] = np.full((2, 4), ord(sid), np.float32)
            h["coords"] = np.array([[0, 0], [256, 0]], np.int64)
    got = store.load_dir(tmp_path / "clam")
    assert sorted(got) == ["a", "b"] and got["b"].features[0, 0] == ord("b")


def test_load_dir_names_every_unreadable_file_in_one_line(tmp_path):
    """A folder with several damaged feature files named only the first: a cohort with k of them took k runs to
    find. Every one is named now (one alone keeps its own message)."""
    x = np.zeros((3, 4), np.float32)
    for i in range(4):
        store.save(tmp_path / f"s{i}.h5", x, np.zeros((3, 2), np.int64), attrs={"encoder": "e", "slide_id": f"s{i}"})
    (tmp_path / "s1.h5").write_bytes(b"")
    (tmp_path / "s3.h5").write_bytes((tmp_path / "s2.h5").read_bytes()[:300])
    with pytest.raises(GigaslideError, match=r"2 feature files cannot be read: s1\.h5: .*; s3\.h5: "):
        store.load_dir(tmp_path)
    (tmp_path / "s3.h5").unlink()
    with pytest.raises(GigaslideError, match="s1.h5") as one:
        store.load_dir(tmp_path)
    assert "cannot be read:" not in str(one.value)

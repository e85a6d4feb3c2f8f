"""The store's key and content index (vitok.storage.index, Store opened through it): the same answers as the
sidecars give, a cache that is reused while the store is unchanged and rebuilt when it changes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import vitok
from vitok.bench.store import synthetic_store
from vitok.storage import index as index_module
from vitok.storage.index import CATALOG, INDEX_DIR, StoreIndex, sources_digest
from vitok.storage.store import IndexedStore


def both(out):
    return vitok.open(out, index=True), vitok.open(out, index=False)


@pytest.mark.parametrize(("fmt", "rows"), [("hdf5", 1), ("hdf5", 5), ("npy", 3), ("wds", 2)])
def test_indexed_store_answers_as_the_sidecars_do(tmp_path, fmt, rows):
    out = tmp_path / "store"
    synthetic_store(out, 23, rows, 8, fmt, per_shard=10)  # 3 shards, the last partly filled
    fast, slow = both(out)
    with fast, slow:
        assert isinstance(fast, IndexedStore) and not isinstance(slow, IndexedStore)
        assert fast.keys() == slow.keys() and len(fast) == len(slow) == 23
        for key in slow.keys():
            assert key in fast
            np.testing.assert_array_equal(fast[key], slow[key])
            assert fast.info(key) == slow.info(key)
        assert "nope" not in fast
        with pytest.raises(KeyError, match="not in this store"):
            fast["nope"]
        for (k1, a1, o1), (k2, a2, o2) in zip(fast.iter_shards(), slow.iter_shards()):
            np.testing.assert_array_equal(o1, o2)
            assert k1 == k2
            np.testing.assert_array_equal(a1, a2)
    assert (out / INDEX_DIR / CATALOG).exists()


def test_hdf5_rows_across_chunk_boundaries_read_by_byte_range(tmp_path):
    out = tmp_path / "store"
    synthetic_store(out, 40, 30, 520, "hdf5", per_shard=40)  # 1200 rows; chunks of 1008 rows (1 MB / 1040 bytes)
    fast, slow = both(out)
    with fast, slow:
        for key in slow.keys():
            np.testing.assert_array_equal(fast[key], slow[key])
        assert len(fast._layouts[0]["merged"][3]) == 2  # read by byte range from the two chunks, not through h5py


def test_cached_index_is_reused_and_rebuilt_when_a_shard_commits(tmp_path, monkeypatch):
    out = tmp_path / "store"
    synthetic_store(out, 15, 1, 4, "npy", per_shard=5)
    aside = tmp_path / "aside"
    aside.mkdir()
    late = [p for p in (out / "shards").iterdir() if p.name.startswith("shard-000002")]
    for path in late:  # the last shard is committed after the index was built
        os.replace(path, aside / path.name)
    vitok.open(out).close()  # builds and caches
    import vitok.storage.store as store_module

    def no_sidecars(*args, **kwargs):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(store_module, "iter_sidecars", no_sidecars)
    with vitok.open(out) as store:
        assert len(store) == 10
        assert store.info("img00000003")["row"] == 3  # info() reads that one shard's sidecar
    monkeypatch.undo()
    stale = sources_digest(out)
    for path in late:
        os.replace(aside / path.name, out / "shards" / path.name)
    digest = sources_digest(out)
    assert digest != stale and StoreIndex.load(out, digest) is None
    with vitok.open(out) as store:
        assert len(store) == 15 and store["img00000014"].shape == (1, 4)
    current = StoreIndex.load(out, digest)
    assert current is not None
    assert len([p for p in (out / INDEX_DIR).iterdir() if p.suffix == ".npy"]) == len(current.arrays)


def test_a_store_that_cannot_be_written_is_indexed_in_memory(tmp_path, monkeypatch):
    out = tmp_path / "store"
    synthetic_store(out, 5, 1, 4, "hdf5")

    def read_only(self, root):
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr(StoreIndex, "save", read_only)
    with vitok.open(out) as store:
        assert len(store) == 5 and store["img00000004"].shape == (1, 4)
    assert not (out / INDEX_DIR).exists()


def test_colliding_key_hashes_still_find_the_right_key(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "key_hash", lambda data: len(data) % 2)  # everything collides
    out = tmp_path / "store"
    synthetic_store(out, 9, 1, 4, "npy")
    fast, slow = both(out)
    with fast, slow:
        for key in slow.keys():
            np.testing.assert_array_equal(fast[key], slow[key])
        assert "img99999999" not in fast


def test_content_index_finds_images_by_pixels(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    vitok.extract([str(src)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    with vitok.open(tmp_path / "out") as store:
        for key in store.keys():
            assert store.find_content(store.info(key)["content_id"]) == key
        assert store.find_content("00" * 32) is None


def test_tokens_read_through_the_index_are_writable_arrays(tmp_path):
    out = tmp_path / "store"
    synthetic_store(out, 3, 2, 4, "npy")
    from vitok.storage.records import RunHeader

    header = json.loads((out / "vitok.json").read_text())
    header["settings"]["store_dtype"] = "float32"  # a float32 store: rows come back without a conversion
    for path in (out / "shards").glob("*/meta.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "vitok_dtype": "float32"}))
    for path in (out / "shards").glob("*/merged.npy"):
        data = np.load(path)
        np.save(path, data.astype(np.float32))
    (out / "vitok.json").write_text(json.dumps(RunHeader.from_json(header).to_json()))
    with vitok.open(out) as store:
        tokens = store["img00000001"]
        assert tokens.dtype == np.float32 and tokens.flags.writeable
        tokens[...] = 0  # the caller's array, not the store's memory map
        assert store["img00000001"].any()


@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_deepstack_levels_read_by_byte_range(tmp_path, fmt):
    from helpers import make_folder

    folder = make_folder(tmp_path / "imgs", count=5, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0, format=fmt, shard_size=3,
                  features=["merged", "deepstack"], store_dtype="bfloat16")
    fast, slow = both(out)
    with fast, slow:
        assert all("deepstack" in layout for layout in fast._layouts)
        for key in slow.keys():
            for feature in ("merged", "deepstack"):
                np.testing.assert_array_equal(fast.get(key, feature), slow.get(key, feature))
            embeds, grid = fast.image_embeds(key)
            assert embeds.shape[0] == fast.info(key)["tokens"]["merged"]


def test_a_rewritten_data_file_invalidates_the_byte_offsets(tmp_path):
    """The index records where rows sit in each data file: a data file rewritten in place (repacked, restored from
    elsewhere) must not be read at the old offsets."""
    out = tmp_path / "store"
    synthetic_store(out, 4, 1, 4, "hdf5")
    vitok.open(out).close()
    data = next((out / "shards").glob("*.h5"))
    import h5py

    with h5py.File(data, "r") as handle:  # the same tables, the rows written again at other addresses
        copy = {name: handle[name][()] for name in handle}
        attrs = dict(handle["merged"].attrs)
    tokens = copy["merged"] + 1
    with h5py.File(data, "w") as handle:
        handle.create_dataset("padding", data=np.zeros(4096, dtype=np.uint8))
        for name, value in copy.items():
            handle.create_dataset(name, data=tokens if name == "merged" else value)
        handle["merged"].attrs.update(attrs)
    with vitok.open(out) as store:
        np.testing.assert_array_equal(store["img00000002"], tokens[2:3].astype(np.float32))

"""vitok.integrations.ray's callable class on its own (no Ray instance): what a Dataset.map_batches call computes."""

from __future__ import annotations

import numpy as np
from conftest import PHOTOS

import vitok


def test_token_encoder_gives_each_row_the_tokens_of_extract_and_an_error_for_bad_bytes(tmp_path):
    from vitok.integrations.ray import TokenEncoder

    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:2]
    options = dict(model="qwen3-vl-tiny", store_dtype="float32", features=("merged",), dtype="float32",
                   token_budget=1)
    encoder = TokenEncoder(**options)
    images = np.empty(3, dtype=object)
    images[:] = [photos[0].read_bytes(), b"not an image", photos[1].read_bytes()]
    result = encoder({"key": np.array(["a", "bad", "b"]), "image": images})
    assert list(result["key"]) == ["a", "bad", "b"] and "image" not in result
    assert result["vitok_error"][0] == "" and result["vitok_error"][2] == ""
    assert result["vitok_error"][1] and result["merged"][1].shape[0] == 0
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).write_bytes(photo.read_bytes())
    vitok.extract([str(folder)], tmp_path / "out", workers=0, **options)
    store = vitok.open(tmp_path / "out")
    for row, photo in ((0, photos[0]), (2, photos[1])):
        np.testing.assert_array_equal(result["merged"][row], store[photo.name])
        assert list(result["grid"][row]) == store.info(photo.name)["grid_thw"]


def test_write_store_records_a_key_holding_nul_as_skipped_and_writes_the_rest(tmp_path):
    from vitok.integrations.ray import TokenEncoder, write_store

    photo = next(p for p in sorted(PHOTOS.iterdir()) if p.suffix.lower() in (".jpg", ".png"))
    options = dict(model="qwen3-vl-tiny", store_dtype="float32", features=("merged",), dtype="float32")
    images = np.empty(3, dtype=object)
    images[:] = [photo.read_bytes()] * 3
    batch = TokenEncoder(**options)({"key": np.array(["a", "x\x00y", "b"], dtype=object), "image": images})
    for fmt in ("hdf5", "npy", "wds"):
        assert write_store([batch], tmp_path / fmt, format=fmt, **options) == 1
        with vitok.open(tmp_path / fmt) as store:
            assert store.keys() == ["a", "b"]
            assert "NUL" in store.skipped["x\x00y"]
            np.testing.assert_array_equal(store["a"], batch["merged"][0])


def test_write_store_into_a_bucket_equals_a_local_one_and_a_second_writer_is_refused(s3, tmp_path, monkeypatch):
    """``write_store(dataset, "s3://...")`` (any iterable of batches: the driver writes, the rows come from
    wherever): the same shards as into a folder, the endpoint from ``storage_options`` alone."""
    import pytest
    from s3server import BUCKET

    from vitok.errors import UsageError
    from vitok.integrations.ray import TokenEncoder, write_store

    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:3]
    options = dict(model="qwen3-vl-tiny", store_dtype="float32", features=("merged",), dtype="float32",
                   token_budget=1)
    images = np.empty(4, dtype=object)
    images[:] = [p.read_bytes() for p in photos] + [b"not an image"]
    batch = TokenEncoder(**options)({"key": np.array(["a", "b", "c", "bad"]), "image": images})
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    remote, endpoint = f"s3://{BUCKET}/written", {"endpoint_url": s3.endpoint}
    assert write_store([batch], remote, shard_size=2, storage_options=endpoint, **options) == 2
    assert write_store([batch], tmp_path / "local", shard_size=2, **options) == 2
    with pytest.raises(UsageError, match="already holds a store"):
        write_store([batch], remote, shard_size=2, storage_options=endpoint, **options)
    assert len(s3.keys("written/shards/")) == 4  # two shards, two sidecars: nothing added by the refused writer
    with vitok.open(remote, storage_options=endpoint) as theirs, vitok.open(tmp_path / "local") as mine:
        assert theirs.keys() == mine.keys() == ["a", "b", "c"] and "not an image" in theirs.skipped["bad"]
        for key in mine.keys():
            np.testing.assert_array_equal(theirs[key], mine[key])
            assert {k: v for k, v in theirs.info(key).items() if k != "shard"} == \
                {k: v for k, v in mine.info(key).items() if k != "shard"}
    assert vitok.verify(remote, storage_options=endpoint).clean

"""`vitok extract` end to end: real subprocesses, formats, round trips, resume after SIGKILL, refusals."""

from __future__ import annotations

import errno
import json

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY, all_tokens, make_folder, vitok_killed_at
from helpers import vitok as run_vitok

import vitok
from vitok.encoder.inference import load_encoder
from vitok.errors import SettingsMismatchError, UsageError, VitokError
from vitok.inputs.preprocess import Preprocessor

FEATURES = ["--features", "patch,merged,deepstack"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imgs") / "imgs")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hdf5", "npy"])
def test_cli_round_trip_every_token(folder, tmp_path, fmt):
    out = tmp_path / "out"
    result = run_vitok("extract", str(folder), "-o", str(out), *TINY, *FEATURES, "--format", fmt,
                       "--shard-size", "4", "--store-dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    store = vitok.open(out)
    assert summary["ok"] == len(store) and summary["skipped"] == len(store.skipped) >= 5
    assert "odd/empty.jpg" in store.skipped and "empty" in store.skipped["odd/empty.jpg"]
    assert store.meta["settings"]["features"] == ["patch", "merged", "deepstack"]
    assert store.meta["settings"]["model"]["weights"] == "seeded-random:0"
    # every stored token equals a direct encode of the same file
    encoder = load_encoder("qwen3-vl-tiny", device="cpu")
    pre = Preprocessor(encoder.preprocess)
    for key in store.keys():
        info = store.info(key)
        prepared = pre.load(info["source"])
        direct = encoder.encode([prepared], ("patch", "merged", "deepstack")).split()[0]
        assert info["grid_thw"] == list(prepared.grid_thw)
        for feature in ("patch", "merged", "deepstack"):
            np.testing.assert_allclose(store.get(key, feature), direct[feature].numpy(), rtol=1e-4, atol=1e-5)
    assert run_vitok("verify", str(out)).returncode == 0


def test_stores_are_readable_without_vitok(folder, tmp_path):
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0, store_dtype="bfloat16", shard_size=100)
    shard = next((out / "shards").glob("*.h5"))
    with h5py.File(shard) as handle:
        keys = [k.decode() for k in handle["keys"][()]]
        offsets = handle["merged_offsets"][()]
        raw = handle["merged"][offsets[0]:offsets[1]]
        assert handle["merged"].attrs["vitok_dtype"] == "bfloat16" and raw.dtype == np.uint16
    widened = (raw.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(widened, vitok.open(out)[keys[0]])
    sidecar = json.loads(next((out / "shards").glob("*.json")).read_text())
    record = next(r for r in sidecar["records"] if r["status"] == "ok")
    assert {"key", "source", "status", "row", "grid", "size", "tokens"} <= set(record)
    assert [r["key"] for r in sidecar["records"]] == sorted(r["key"] for r in sidecar["records"])


def test_pooling_and_dataset_view(folder, tmp_path):
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0, pool="mean", features=["merged", "deepstack"])
    store = vitok.open(out)
    key = store.keys()[0]
    assert store[key].shape == (1, 96)
    assert store.get(key, "deepstack").shape == (1, 1, 96)
    dataset = store.torch_dataset()
    name, tensor = dataset[0]
    assert name == key and tensor.shape == (1, 96) and len(dataset) == len(store)


def test_stdin_source_and_nothing_matched(folder, tmp_path):
    paths = "\n".join(str(p) for p in sorted(folder.rglob("*.png")))
    result = run_vitok("extract", "-", "-o", str(tmp_path / "out"), *TINY, input=paths)
    assert result.returncode == 0, result.stderr
    assert len(vitok.open(tmp_path / "out")) >= 6
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    result = run_vitok("extract", str(empty), "-o", str(tmp_path / "out2"), *TINY)
    assert result.returncode == 2 and "no images found" in result.stderr


@pytest.mark.slow
def test_settings_change_is_refused_naming_the_difference(folder, tmp_path):
    out = tmp_path / "out"
    assert run_vitok("extract", str(folder), "-o", str(out), *TINY).returncode == 0
    result = run_vitok("extract", str(folder), "-o", str(out), *TINY, "--pool", "max")
    assert result.returncode == 2 and "pool: 'none' -> 'max'" in result.stderr
    with pytest.raises(SettingsMismatchError, match="store_dtype"):
        vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0, store_dtype="float32")
    assert run_vitok("extract", str(folder), "-o", str(out), *TINY, "--pool", "max", "--overwrite").returncode == 0


def test_unavailable_feature_is_a_usage_error(folder, tmp_path):
    result = run_vitok("extract", str(folder), "-o", str(tmp_path / "o"), "--size", "small", "--features", "merged",
                       "--quiet")
    assert result.returncode == 2 and "offers: patch" in result.stderr


@pytest.mark.slow
def test_resume_after_sigkill_redoes_nothing_finished(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=16, with_odd=False)
    out = tmp_path / "out"
    args = ["extract", str(folder), "-o", str(out), "--size", "small", "--workers", "0", "--shard-size", "2",
            "--quiet", "--store-dtype", "float32"]
    killed = vitok_killed_at("vitok.storage.shards:commit", 3, *args)  # as the third shard is committed
    assert killed.returncode == -9, killed.stderr
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 1 <= len(done_before) < 8, "the kill should land part-way"
    assert run_vitok("verify", str(out)).returncode == 1  # incomplete
    result = run_vitok(*args, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shards_already_done"] == len(done_before)
    assert summary["ok"] == 16 - summary["already_done"]
    for name, mtime in done_before.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    store = vitok.open(out)
    assert sorted(store.keys()) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("img*"))
    assert run_vitok("verify", str(out)).returncode == 0


@pytest.mark.slow
def test_token_budget_batching_equals_one_image_at_a_time(folder, tmp_path):
    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", features=["patch", "merged"])
    vitok.extract([str(folder)], tmp_path / "one", token_budget=1, **common)
    vitok.extract([str(folder)], tmp_path / "many", token_budget=100_000, **common)
    for feature in ("patch", "merged"):
        one, many = all_tokens(tmp_path / "one", feature), all_tokens(tmp_path / "many", feature)
        assert one.keys() == many.keys()
        for key in one:
            np.testing.assert_allclose(many[key], one[key], rtol=1e-5, atol=1e-5)


def test_float16_overflow_is_counted_in_each_record(tmp_path, caplog):
    """Through the real path: a checkpoint whose merger output exceeds float16's range, stored as float16."""
    from vitok.encoder.checkpoint import save_tower
    from vitok.encoder.model import VisionEncoder, init_random_weights
    from vitok.encoder.presets import get_preset

    config = get_preset("qwen3-vl-tiny").encoder
    model = VisionEncoder(config)
    init_random_weights(model, 0)
    with torch.no_grad():
        model.merger.linear_fc2.weight.mul_(1e7)
    save_tower(model, tmp_path / "loud.safetensors", config)
    folder = make_folder(tmp_path / "imgs", count=2, with_odd=False)
    out = tmp_path / "out"
    vitok.extract([str(folder)], out, model=str(tmp_path / "loud.safetensors"), workers=0, store_dtype="float16")
    store = vitok.open(out)
    for key in store.keys():
        overflow = store.info(key)["float16_overflow"]
        assert overflow > 0 and np.isinf(store[key]).sum() == overflow
    assert "exceed float16 range" in caplog.text


def test_nan_and_inf_are_counted_per_image():
    from vitok.pipeline.cast import count_nonfinite, nonfinite_per_row_group

    tokens = torch.zeros(2, 9, 4)  # (levels, rows, dim): three images of 3, 2 and 4 rows
    tokens[0, 3, 1] = float("nan")
    tokens[1, 4, :] = float("inf")
    tokens[1, 8, 0] = float("-inf")
    assert int(count_nonfinite(tokens)) == 6
    assert nonfinite_per_row_group(tokens, [3, 2, 4]) == [0, 5, 1]


def test_disk_full_is_a_clear_error_with_nothing_listed(folder, tmp_path, monkeypatch):
    from vitok.storage.hdf5 import Hdf5Writer

    def no_space(self, feature, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Hdf5Writer, "append", no_space)
    out = tmp_path / "out"
    with pytest.raises(VitokError, match="no space left"):
        vitok.extract([str(folder)], out, model="qwen3-vl-tiny", workers=0)
    shards = out / "shards"  # the run had begun a shard when the disk filled: nothing of it may stay, or be listed
    assert shards.is_dir() and not list(shards.glob("*.json")) and not list(shards.glob(".*.tmp"))


def test_keys_from_two_folders_are_prefixed(tmp_path):
    a = make_folder(tmp_path / "x" / "one", count=2, with_odd=False)
    b = make_folder(tmp_path / "y" / "two", count=2, with_odd=False)
    vitok.extract([str(a), str(b)], tmp_path / "out", model="qwen3-vl-tiny", workers=0)
    keys = vitok.open(tmp_path / "out").keys()
    assert {k.split("/")[0] for k in keys} == {"one", "two"} and len(keys) == 4
    same = make_folder(tmp_path / "z" / "one", count=1, with_odd=False)
    with pytest.raises(UsageError, match="same key"):
        vitok.extract([str(a), str(same)], tmp_path / "out2", model="qwen3-vl-tiny", workers=0)


@pytest.mark.slow
def test_multiworker_loader_gives_the_same_tokens(folder, tmp_path):
    common = dict(model="qwen3-vl-tiny", store_dtype="float32")
    vitok.extract([str(folder)], tmp_path / "w0", workers=0, **common)
    vitok.extract([str(folder)], tmp_path / "w2", workers=2, **common)
    w0, w2 = all_tokens(tmp_path / "w0"), all_tokens(tmp_path / "w2")
    assert w0.keys() == w2.keys()
    for key in w0:
        np.testing.assert_array_equal(w0[key], w2[key])


@pytest.mark.slow
def test_out_of_memory_batch_is_split_without_losing_the_batch_in_flight(folder, tmp_path, monkeypatch):
    """A batch that runs out of memory is retried image by image; the batch launched before it still lands."""
    from vitok.encoder.inference import Encoder

    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", token_budget=2000)
    vitok.extract([str(folder)], tmp_path / "plain", **common)
    encode = Encoder.encode
    calls = []

    def encode_or_oom(self, images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) % 2 == 0 and len(images) > 1:  # every other multi-image batch "runs out of memory"
            raise torch.OutOfMemoryError("simulated")
        return encode(self, images, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", encode_or_oom)
    summary = vitok.extract([str(folder)], tmp_path / "oom", **common)
    assert any(n > 1 for n in calls[1::2]), calls  # the simulated failure happened after a launched batch
    plain, oom = all_tokens(tmp_path / "plain"), all_tokens(tmp_path / "oom")
    assert plain.keys() == oom.keys() and summary.ok == len(plain)
    for key in plain:
        np.testing.assert_allclose(oom[key], plain[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3])
def test_deeper_pipeline_commits_every_shard_with_the_same_tokens(folder, tmp_path, monkeypatch, depth):
    """Batches still queued when a shard ends: the shard is committed once they finish, nothing lost or mixed up."""
    from vitok.pipeline import device as device_stage

    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", shard_size=3, token_budget=600)
    vitok.extract([str(folder)], tmp_path / "one", **common)
    monkeypatch.setattr(device_stage, "pipeline_depth", lambda device: depth)
    summary = vitok.extract([str(folder)], tmp_path / "deep", **common)
    report = vitok.verify(tmp_path / "deep")
    assert report.clean and report.shards_ok == summary.shards_written > 3
    one, deep = all_tokens(tmp_path / "one"), all_tokens(tmp_path / "deep")
    assert one.keys() == deep.keys()
    for key in one:
        np.testing.assert_array_equal(deep[key], one[key])


@pytest.mark.slow
def test_progress_counts_the_tokens_of_every_image_by_the_last_event(folder, tmp_path):
    """Batches finish after later images are read: the progress must still count every image's tokens."""
    events = []
    summary = vitok.extract([str(folder)], tmp_path / "out", model="qwen3-vl-tiny", workers=0, progress=events.append)
    assert events[-1].images_done == events[-1].images_total
    assert summary.patches > 0 and events[-1].patches_done == summary.patches


@pytest.mark.slow
def test_out_of_memory_batch_gives_back_one_batch_so_no_shard_is_committed_early(folder, tmp_path, monkeypatch):
    """The committer counts a unit's batches in and out: the image-by-image retry of a batch that ran out of memory
    must come back as one batch, or a shard is committed before its last images (which then go missing)."""
    from vitok.encoder.inference import Encoder
    from vitok.pipeline import device as device_stage

    common = dict(model="qwen3-vl-tiny", workers=0, store_dtype="float32", shard_size=100, token_budget=600)
    vitok.extract([str(folder)], tmp_path / "plain", **common)
    encode = Encoder.encode
    multi_image_calls = []

    def first_multi_image_batch_runs_out_of_memory(self, images, *args, **kwargs):
        if len(images) > 1:
            multi_image_calls.append(len(images))
            if len(multi_image_calls) == 1:
                raise torch.OutOfMemoryError("simulated")
        return encode(self, images, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", first_multi_image_batch_runs_out_of_memory)
    monkeypatch.setattr(device_stage, "pipeline_depth", lambda device: 2)
    summary = vitok.extract([str(folder)], tmp_path / "oom", **common)
    report = vitok.verify(tmp_path / "oom")
    assert report.clean, report
    plain, oom = vitok.open(tmp_path / "plain"), vitok.open(tmp_path / "oom")
    assert len(multi_image_calls) > 1 and summary.ok == len(plain.keys())  # batches of the unit came after it
    assert list(oom.keys()) == list(plain.keys())  # rows in input order in each shard, like an uneventful run
    for key in plain.keys():
        np.testing.assert_allclose(oom[key], plain[key], rtol=1e-5, atol=1e-5)

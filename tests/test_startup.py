"""Start-up: the model is built without default initialisation yet equals the eagerly built one, a
warm-up batch changes no token, and the decode workers start before the first chunk is asked for."""

from __future__ import annotations

import os

import pytest
import torch

from vitok.encoder.checkpoint import resolve_model, save_tower
from vitok.encoder.inference import load_encoder
from vitok.encoder.model import VisionEncoder, init_random_weights
from vitok.inputs.preprocess import PreparedImage


def eager(seed: int = 0) -> VisionEncoder:
    model = VisionEncoder(resolve_model("qwen3-vl-tiny").encoder)
    init_random_weights(model, seed)
    return model


def assert_same(model: VisionEncoder, expected: VisionEncoder) -> None:
    got = dict(model.named_buffers()) | dict(model.state_dict())
    want = dict(expected.named_buffers()) | dict(expected.state_dict())
    assert got.keys() == want.keys()
    for name in want:
        assert not got[name].is_meta and torch.equal(got[name], want[name]), name


def test_random_and_checkpoint_weights_load_into_a_model_built_without_default_init_unchanged(tmp_path):
    expected = eager(seed=3)
    assert_same(load_encoder("qwen3-vl-tiny", "cpu", "float32", seed=3).model, expected)
    save_tower(expected, tmp_path / "tower.safetensors", expected.config)
    loaded = load_encoder(str(tmp_path / "tower.safetensors"), "cpu", "float32")
    assert_same(loaded.model, expected)  # the rotary's frequencies (not in the checkpoint) included
    assert {"weights_read", "weights_on_device"} <= set(loaded.load_seconds)


def test_a_warm_up_batch_changes_no_token():
    encoder = load_encoder("qwen3-vl-tiny", "cpu", "float32")
    generator = torch.Generator().manual_seed(0)
    image = PreparedImage(torch.randint(0, 256, (8 * 12, 3, 16, 16), dtype=torch.uint8, generator=generator),
                          (1, 8, 12), (192, 128))
    before = encoder.encode([image], ("merged",)).features["merged"].clone()
    encoder.warm_up(("merged",))
    assert torch.equal(encoder.encode([image], ("merged",)).features["merged"], before)


def test_decode_workers_start_when_the_loader_is_made_and_stop_on_close_before_any_chunk(tmp_path):
    from PIL import Image

    from vitok.inputs.preprocess import Preprocessor
    from vitok.inputs.readers import ReaderOptions
    from vitok.inputs.sources import list_inputs
    from vitok.pipeline.workers import load_units
    from vitok.storage.plan import load_plan, write_generation

    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48), "red").save(tmp_path / "in" / "a.jpg")
    write_generation(tmp_path / "out", list_inputs([str(tmp_path / "in")]), 10, 0, 0, [], "test")
    chunks = load_units(load_plan(tmp_path / "out").units, "files", ReaderOptions(),
                        Preprocessor(resolve_model("qwen3-vl-tiny").preprocess), workers=1)
    workers = chunks._iterator._workers
    assert len(workers) == 1 and workers[0].is_alive()  # started before any chunk was asked for
    chunks.close()
    workers[0].join(timeout=10)
    assert not workers[0].is_alive()


def test_on_a_cpu_the_warm_up_runs_only_while_workers_start_and_the_kernels_were_never_timed(tmp_path, monkeypatch):
    from vitok.encoder import kernel_choice, kernels

    if not kernels.onednn_linear_available():  # no choice to time on this machine: never a warm-up
        assert not load_encoder("qwen3-vl-tiny", "cpu", "float32").needs_warm_up(4)
        return
    monkeypatch.setenv("VITOK_CACHE_DIR", str(tmp_path))
    kernel_choice.forget()
    try:
        encoder = load_encoder("qwen3-vl-tiny", "cpu", "float32")
        assert not encoder.needs_warm_up(0)  # nothing to overlap with: the first batch times them
        assert encoder.needs_warm_up(2)
        encoder.warm_up(("merged",))  # times the choices on real-sized rows and caches them on disk
        assert not encoder.needs_warm_up(2)
        kernel_choice.forget()
        assert not encoder.needs_warm_up(2)  # a later process reads them from the disk cache
    finally:
        kernel_choice.forget()


def test_the_prefetch_reads_the_towers_bytes_and_never_the_language_models(tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    from vitok.encoder.checkpoint import prefetch_weights, tower_byte_ranges

    tower = {"model.visual." + k: v for k, v in eager().state_dict().items()}
    language = {"model.language_model.embed_tokens.weight": torch.ones(1024, 1024),  # 4 MB: not read
                "lm_head.weight": torch.ones(1024, 1024)}
    file = tmp_path / "model.safetensors"
    save_file(tower | language, str(file))
    source = replace(resolve_model("qwen3-vl-tiny"), weight_files=[file], prefix="model.visual.")

    ranges = tower_byte_ranges(source)
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = __import__("json").loads(handle.read(length))
    spans = {name: (8 + length + e["data_offsets"][0], 8 + length + e["data_offsets"][1])
             for name, e in header.items() if name != "__metadata__"}
    covered = lambda a, b: any(f == file and start <= a and b <= end for f, start, end in ranges)  # noqa: E731
    assert all(covered(*spans[name]) for name in tower)
    overlaps = lambda a, b: any(start < b and a < end for _, start, end in ranges)  # noqa: E731
    assert not any(overlaps(*spans[name]) for name in language)
    assert len(ranges) <= 3  # adjacent tensors are read as one range

    assert prefetch_weights(replace(source, weight_files=[])) is None  # seeded random weights: nothing to read
    prefetch_weights(source).result()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 8 + b"not safetensors")
    assert prefetch_weights(replace(source, weight_files=[damaged])) is None  # the load proper reports it
    assert resolve_model(str(file)).weight_files == [file]  # what prepare() hands the prefetch


def test_a_checkpoint_is_hashed_once_per_machine_until_its_files_change(tmp_path):
    file = tmp_path / "tower.safetensors"
    save_tower(eager(seed=1), file, resolve_model("qwen3-vl-tiny").encoder)
    first = load_encoder(str(file), "cpu", "float32")
    assert "weights_hash_wait" in first.load_seconds  # computed
    again = load_encoder(str(file), "cpu", "float32")
    assert "weights_hash_wait" not in again.load_seconds and again.weights_hash == first.weights_hash

    save_tower(eager(seed=2), file, resolve_model("qwen3-vl-tiny").encoder)  # other weights, same path
    changed = load_encoder(str(file), "cpu", "float32")
    assert "weights_hash_wait" in changed.load_seconds and changed.weights_hash != first.weights_hash
    os.utime(file, ns=(1, 1))  # same bytes, other time: hashed again, same digest
    touched = load_encoder(str(file), "cpu", "float32")
    assert "weights_hash_wait" in touched.load_seconds and touched.weights_hash == changed.weights_hash

    size, inode = file.stat().st_size, file.stat().st_ino
    with open(file, "r+b") as handle:  # other weights written in place, same size, then the old time put back
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x00\x80\x3f")  # the last float becomes 1.0
    os.utime(file, ns=(1, 1))
    assert (file.stat().st_size, file.stat().st_ino, file.stat().st_mtime_ns) == (size, inode, 1)
    rewritten = load_encoder(str(file), "cpu", "float32")
    assert rewritten.weights_hash != changed.weights_hash  # never the remembered digest of the old bytes


def test_resolving_a_checkpoint_reads_names_and_shapes_without_importing_torch(tmp_path):
    import subprocess
    import sys

    import torch

    model = eager()
    save_tower(model, tmp_path / "tower.safetensors", model.config)  # architecture in its metadata
    bare = tmp_path / "bare"
    bare.mkdir()
    from safetensors.torch import save_file

    save_file({"visual." + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
              str(bare / "model.safetensors"))
    (bare / "config.json").write_text(__import__("json").dumps({"vision_config": model.config.to_dict()}))
    code = ("import sys; from vitok.encoder.checkpoint import resolve_model; "
            "[resolve_model(p) for p in sys.argv[1:]]; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tower.safetensors"), str(bare)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_prefetch_computes_the_weights_hash_the_load_would_from_the_same_bytes(tmp_path, dtype):
    from safetensors.torch import save_file

    from vitok.encoder.checkpoint import WeightsPrefetch, read_tower_state_dict, weights_hash

    model = eager(seed=5)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    keys = sorted(state)
    folder = tmp_path / "released"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors":
              keys[len(keys) // 2 :]}
    weight_map = {}
    for number, (shard, names) in enumerate(shards.items()):
        tensors = {"model.visual." + k: state[k] for k in names}
        tensors[f"model.language_model.layers.{number}.weight"] = torch.ones(64, 64)  # never part of the hash
        save_file(tensors, str(folder / shard))
        weight_map |= {name: shard for name in tensors}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(__import__("json").dumps(
        {"model_type": "qwen3_vl", "vision_config": {**model.config.to_dict(), "model_type": "qwen3_vl"}}))
    source = resolve_model(str(folder))

    prefetch = WeightsPrefetch(source)
    assert prefetch.hashing and prefetch.result() == weights_hash(read_tower_state_dict(source))
    assert WeightsPrefetch.running_for(source) is prefetch
    loaded = load_encoder(source, "cpu", "float32")  # takes the prefetch's digest, and keeps it for later runs
    assert loaded.weights_hash == prefetch.result()
    assert not WeightsPrefetch(source).hashing  # known now: later prefetches only read

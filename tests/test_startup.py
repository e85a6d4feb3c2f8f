"""Start-up: the model is built without default initialisation yet equals the eagerly built one, a
warm-up batch changes no token, and the decode workers start before the first chunk is asked for."""

from __future__ import annotations

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

    from vitok.inputs.plan import load_plan, write_generation
    from vitok.inputs.preprocess import Preprocessor
    from vitok.inputs.readers import ReaderOptions
    from vitok.inputs.sources import list_inputs
    from vitok.pipeline.loader import load_units

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

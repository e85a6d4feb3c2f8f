"""CUDA paths (run by scripts/gpu_check.sh on a lent GPU machine; skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_model, rel_error, vitok_from_reference

from vitok.errors import UsageError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRIDS = [(1, 28, 28), (1, 30, 40), (1, 16, 16), (1, 28, 28), (1, 52, 50), (1, 2, 2)]


def _pair(dtype, attention, seed=0):
    reference, config = reference_model(seed=seed)
    model = vitok_from_reference(reference, config)
    reference = reference.to("cuda", dtype)
    model = model.to("cuda", dtype)
    model.set_attention(attention)
    return reference, model


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_cuda_parity_with_reference(dtype, tolerance, attention):
    reference, model = _pair(dtype, attention)
    n = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(n, model.config.patch_dim, device="cuda")
    with torch.no_grad():
        expected = reference(pixels, torch.tensor(GRIDS, device="cuda"))
        got = model(pixels, GRIDS, features=("patch", "merged", "deepstack")).features
    errors = {"patch": rel_error(got["patch"], expected.last_hidden_state),
              "merged": rel_error(got["merged"], expected.pooler_output)}
    for k, feature in enumerate(expected.deepstack_features):
        errors[f"deepstack{k}"] = rel_error(got["deepstack"][k], feature)
    print(f"{dtype} {attention}: {errors}")
    assert max(errors.values()) <= tolerance, errors


def test_device_selection():
    from vitok.encoder.inference import resolve_device, resolve_dtype
    from vitok.run.parallel import Part, device_for

    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert device_for(Part(0, 2, 0, "torchrun"), "auto") == "cuda:0"


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 3e-2), ("float32", 1e-4)])
def test_extract_on_cuda_matches_cpu(tmp_path, dtype, tolerance):
    """Pinned per-image copies into one device buffer, one batch in flight: the same tokens as the CPU."""
    from helpers import all_tokens, make_folder

    import vitok

    folder = make_folder(tmp_path / "imgs", count=12)
    common = dict(model="qwen3-vl-tiny", store_dtype="float32", workers=2, features=["merged"], token_budget=1500)
    vitok.extract([str(folder)], tmp_path / "cpu", device="cpu", **common)
    summary = vitok.extract([str(folder)], tmp_path / "gpu", device="cuda", dtype=dtype, **common)
    assert summary.skipped >= 5
    cpu, gpu = all_tokens(tmp_path / "cpu"), all_tokens(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        err = np.abs(cpu[key] - gpu[key]).max() / np.abs(cpu[key]).max()
        assert err <= tolerance, (key, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, head_dim", [(16, 64), (16, 72), (3, 20)])
def test_triton_rotary_equals_eager_rotary(dtype, heads, head_dim):
    pytest.importorskip("triton")
    from vitok import settings
    from vitok.encoder import kernels
    from vitok.encoder.attention import Rotary, apply_rotary

    assert kernels._triton_rotary() is not None, "the Triton rotary failed its self-check (see the log)"
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(3000, 3, heads, head_dim, generator=generator).to("cuda", dtype)
    angles = (torch.rand(3000, head_dim // 2, generator=generator) * 40).cuda()
    rotary = Rotary(angles.cos(), angles.sin())
    with torch.inference_mode():
        fused = apply_rotary(qkv[:, :2], rotary)
        with settings.override(triton="off"):
            eager = apply_rotary(qkv[:, :2], rotary)
    equal = (fused == eager).float().mean().item()
    error = rel_error(fused, eager)
    print(f"rotary {dtype} {heads}x{head_dim}: equal {equal:.4f}, max rel error {error:.2e}")
    assert fused.shape == eager.shape and fused.dtype == dtype
    # both compute in float32 and may differ by a fused multiply-add in the last float32 bit, which the single
    # rounding to half precision hides almost always
    assert error <= {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if dtype != torch.float32:
        assert equal >= 0.98


@pytest.mark.parametrize("sizes", [[(64, 64), (64, 64)], [(64, 64), (96, 64), (64, 64)]])
def test_encoding_a_batch_never_waits_for_the_gpu(sizes):
    """Queuing a batch (normalise, encoder, pooling, store cast, copy to pinned memory) issues no synchronising CUDA
    call, so the runner queues the next batch while the GPU works on this one (uniform: sdpa; mixed: varlen)."""
    import time
    import traceback
    import warnings

    from PIL import Image

    from vitok.encoder.inference import load_encoder
    from vitok.inputs.preprocess import Preprocessor
    from vitok.pipeline.device import DevicePipeline
    from vitok.pipeline.types import Batch, Item
    from vitok.storage.records import ImageRecord

    encoder = load_encoder("qwen3-vl-tiny", device="cuda", dtype="bfloat16")
    preprocessor = Preprocessor(encoder.preprocess)
    images = [preprocessor.prepare(Image.new("RGB", size, (i * 40, 90, 200))).pin_memory() for i, size in
              enumerate(sizes)]
    pipeline = DevicePipeline(encoder, ("merged", "patch"), "mean", "float16", depth=8)

    def queue_batch():  # the device stage's launch: encoder, pooling, stored-dtype cast, copies to pinned memory
        items = [Item(ImageRecord(f"k{i}", "ok", "x"), image) for i, image in enumerate(images)]
        launched = pipeline._launch(Batch(0, items))
        return launched.host["merged"], launched.overflow["merged"]

    queue_batch()  # the first batch of a grid builds its tables
    torch.cuda.synchronize()
    stacks: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_sync_debug_mode's own notice that it is a prototype
        torch.cuda.set_sync_debug_mode("warn")
        warnings.simplefilter("always")
        warnings.showwarning = lambda *args, **kwargs: stacks.append("".join(traceback.format_stack(limit=10)))
        try:
            torch.cuda._sleep(1_000_000_000)  # keep the GPU busy for a while: a hidden wait would show in the time
            start = time.perf_counter()
            host, overflow = queue_batch()
            queued = time.perf_counter() - start
        finally:
            torch.cuda.set_sync_debug_mode("default")
    start = time.perf_counter()
    torch.cuda.synchronize()
    drained = time.perf_counter() - start
    print(f"{len(sizes)} images queued in {queued * 1e3:.1f} ms, GPU done {drained * 1e3:.1f} ms later")
    assert not stacks, "synchronising CUDA calls while queuing:\n" + "\n---\n".join(stacks)
    assert queued < drained
    assert host.shape == (len(sizes), encoder.config.out_hidden_size) and int(overflow) == 0


def test_decode_gpu_run_is_close_to_the_exact_run_and_names_its_decoder(tmp_path):
    """--decode gpu end to end: baseline JPEGs decoded by nvJPEG, a PNG and a progressive JPEG by the exact path."""
    from PIL import Image

    import vitok

    folder = tmp_path / "in"
    folder.mkdir()
    y, x = np.mgrid[0:300, 0:400]
    for i in range(6):
        smooth = np.stack([np.sin(x / (8 + i) + c) * np.cos(y / (9 + c)) for c in range(3)], -1) * 100 + 128
        image = Image.fromarray(smooth.astype(np.uint8))
        kwargs = {"progressive": True} if i == 4 else {}
        image.save(folder / f"{i}.{'png' if i == 5 else 'jpg'}", **kwargs)
    common = dict(model="qwen3-vl-tiny", device="cuda", store_dtype="float32", pool="mean")
    vitok.extract([str(folder)], tmp_path / "exact", **common)
    vitok.extract([str(folder)], tmp_path / "gpu", decode="gpu", **common)
    exact, gpu = vitok.open(tmp_path / "exact"), vitok.open(tmp_path / "gpu")
    assert list(exact.keys()) == list(gpu.keys()) and len(gpu) == 6
    for key in exact.keys():
        a, b = torch.from_numpy(exact[key]).float(), torch.from_numpy(gpu[key]).float()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
        print(f"{key}: token cosine gpu vs exact decode {cosine:.5f}")
        assert cosine > 0.99
    decoders = {key: gpu.info(key).get("decoder") for key in gpu.keys()}
    assert [decoders[k] for k in ("0.jpg", "1.jpg", "2.jpg", "3.jpg")] == ["nvjpeg"] * 4
    assert decoders["4.jpg"] != "nvjpeg" and decoders["5.png"] != "nvjpeg"


def test_device_decoding_never_writes_memory_queued_kernels_still_read():
    """pytorch/vision#9606: torchvision's CUDA decoder allocates on the current stream and writes from a private one
    that does not wait for it, so it could be handed a block that queued kernels were still going to read (the run
    queues the previous batches' encoder before decoding the next batch). The cause of a 0.53-cosine token in a
    batched --decode gpu run. Deterministic: fill blocks, queue a long kernel then reads of them, free them, decode,
    and check the reads."""
    import io

    from PIL import Image

    from vitok.inputs.gpu_decode import _decode

    buffer = io.BytesIO()
    Image.fromarray(np.full((480, 640, 3), 200, np.uint8)).save(buffer, "JPEG", quality=90)
    jpeg = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    size = 3 * 480 * 640
    corrupted = 0
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(10):
        blocks = [torch.full((size,), 7, dtype=torch.uint8, device="cuda") for _ in range(8)]
        torch.cuda.synchronize()
        for _ in range(8):  # a long-running kernel ahead of the reads
            big = big @ big / 64
        sums = [block.sum(dtype=torch.int64) for block in blocks]
        del blocks  # freed on the current stream while the reads are still queued
        decoded = _decode([jpeg] * 8, torch.device("cuda"))
        torch.cuda.synchronize()
        corrupted += sum(int(s) != 7 * size for s in sums)
        assert all(int(image.float().mean()) in range(190, 211) for image in decoded)
    assert corrupted == 0


def test_run_stats_read_the_device_time_from_events_without_waiting_for_them(tmp_path):
    import time

    from PIL import Image

    import vitok
    from vitok.run.run_stats import StageMeter

    meter = StageMeter(torch.device("cuda"), workers=2)
    start = meter.events()
    torch.cuda._sleep(500_000_000)  # a batch that keeps the GPU busy for a while
    meter.batch_launched(4, 0.0, *meter.close_events(start))
    began = time.perf_counter()
    meter.batch_done()  # its end event has not completed: not read, not waited for
    assert time.perf_counter() - began < 0.05 and meter.device_busy == 0.0
    meter.rates(0.0, 0, 0.0)  # at the end of a run: read
    assert meter.device_busy > 0.05 and meter.encoded_images == 4
    # a whole run on the GPU: warm-up while the workers start, the device's busy share from events
    (tmp_path / "in").mkdir()
    for i in range(6):
        Image.new("RGB", (96 + 16 * i, 80), (40 * i, 90, 200)).save(tmp_path / "in" / f"{i}.jpg")
    summary = vitok.extract([str(tmp_path / "in")], tmp_path / "out", model="qwen3-vl-tiny", device="cuda",
                            workers=1, token_budget=200)
    assert summary.ok == 6 and "warm_up" in summary.phases and 0 < summary.stages["encoder_busy"] <= 1
    assert summary.bottleneck

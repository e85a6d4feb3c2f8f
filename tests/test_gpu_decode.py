"""--decode gpu: which images go to the device decoder (decided from the header), and what it gives. The decoding
itself runs here on the CPU through the same torchvision call; tests/test_gpu.py runs the CUDA pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitok.errors import UsageError
from vitok.inputs.gpu_decode import decode_on_device, gpu_route
from vitok.inputs.preprocess import Preprocessor
from vitok.inputs.preprocess_config import PreprocessConfig

CONFIG = PreprocessConfig(min_pixels=32 * 32, max_pixels=160 * 160)


def photo(width=200, height=150, seed=0) -> Image.Image:
    """Smooth content, so JPEG decoders differ by little (random noise would exaggerate the IDCT differences)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    channels = [np.sin(x / rng.uniform(5, 20) + c) * np.cos(y / rng.uniform(5, 20)) for c in range(3)]
    return Image.fromarray((np.stack(channels, -1) * 100 + 128).astype(np.uint8))


def encoded(image: Image.Image, fmt="JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_baseline_rgb_and_grayscale_jpegs_go_to_the_device_with_their_final_grid():
    for image in (photo(), photo().convert("L")):
        routed = gpu_route(encoded(image), CONFIG)
        assert routed is not None and routed.patches is None and routed.decoder == "nvjpeg"
        assert routed.grid_thw == Preprocessor(CONFIG).load(encoded(image)).grid_thw
        assert routed.original_size == (200, 150)


@pytest.mark.parametrize("case", ["progressive", "cmyk", "png", "exif_rotated", "not_an_image", "too_large"])
def test_images_the_device_decoder_gets_wrong_stay_on_the_exact_path(case):
    image = photo()
    data = {
        "progressive": lambda: encoded(image, progressive=True),
        "cmyk": lambda: encoded(image.convert("CMYK")),
        "png": lambda: encoded(image, "PNG"),
        "exif_rotated": lambda: encoded(image, exif=_exif_orientation(6)),
        "not_an_image": lambda: b"not an image at all",
        "too_large": lambda: encoded(image),
    }[case]()
    config = CONFIG.replace(max_image_pixels=100 * 100) if case == "too_large" else CONFIG
    assert gpu_route(data, config) is None
    loaded = Preprocessor(config.replace(decode="gpu")).load(data) if case not in ("not_an_image", "too_large") \
        else None
    if loaded is not None:  # the exact path decoded it: patches ready, decoder named
        assert loaded.patches is not None and loaded.jpeg is None and loaded.decoder != "nvjpeg"


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_device_decoding_fills_in_patches_close_to_the_exact_path():
    images = [photo(seed=seed) for seed in range(3)] + [photo(64, 96, seed=3).convert("L")]
    data = [encoded(image, quality=95) for image in images]
    routed = [Preprocessor(CONFIG.replace(decode="gpu")).load(d) for d in data]
    assert all(image.jpeg is not None for image in routed)
    reasons = decode_on_device(routed, CONFIG, torch.device("cpu"))
    assert reasons == [None] * len(data)
    for image, raw in zip(routed, data):
        exact = Preprocessor(CONFIG).load(raw)
        assert image.jpeg is None and image.grid_thw == exact.grid_thw and image.patches.dtype == torch.uint8
        assert image.patches.shape == exact.patches.shape
        assert (image.patches.float() - exact.patches.float()).abs().mean() < 2.0


def test_a_jpeg_the_device_decoder_refuses_is_decoded_exactly_and_a_broken_one_is_skipped_with_a_reason():
    good = encoded(photo())
    truncated = good[: len(good) // 2]
    routed = [gpu_route(good, CONFIG), gpu_route(truncated, CONFIG)]
    assert routed[1] is not None  # the header alone looks fine
    reasons = decode_on_device(routed, CONFIG, torch.device("cpu"))
    assert reasons[0] is None and routed[0].patches is not None
    assert reasons[1] is not None and "truncated" in reasons[1].lower()


def test_decode_gpu_without_cuda_is_a_usage_error(tmp_path):
    import vitok

    (tmp_path / "in").mkdir()
    photo().save(tmp_path / "in" / "a.jpg")
    with pytest.raises(UsageError, match="--decode gpu needs a CUDA device"):
        vitok.extract([str(tmp_path / "in")], tmp_path / "out", model="qwen3-vl-tiny", device="cpu", decode="gpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_run_with_device_decoding_keeps_every_image_in_order(tmp_path, monkeypatch, workers):
    """The whole route on the CPU (the device check lifted): routed JPEGs cross the loader without patches and
    are decoded in the device stage; the others arrive decoded; a broken JPEG is skipped with its reason."""
    import vitok
    from vitok.run import job

    monkeypatch.setattr(job, "check_decode", lambda decode, device: None)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(encoded(photo(120 + 16 * i, 90, seed=i), quality=95))
    (folder / "5.png").write_bytes(encoded(photo(), "PNG"))
    (folder / "6.jpg").write_bytes(encoded(photo(), progressive=True))
    (folder / "7.jpg").write_bytes(encoded(photo())[:700])
    common = dict(model="qwen3-vl-tiny", workers=workers, store_dtype="float32", pool="mean", token_budget=300)
    vitok.extract([str(folder)], tmp_path / "exact", **common)
    summary = vitok.extract([str(folder)], tmp_path / "gpu", decode="gpu", **common)
    exact, gpu = vitok.open(tmp_path / "exact"), vitok.open(tmp_path / "gpu")
    assert summary.ok == 7 and list(gpu.keys()) == list(exact.keys())
    assert "7.jpg" in gpu.skipped and "7.jpg" in exact.skipped
    decoders = {key: gpu.info(key)["decoder"] for key in gpu.keys()}
    assert {decoders[f"{i}.jpg"] for i in range(5)} == {"nvjpeg"} and decoders["5.png"] != "nvjpeg"
    assert decoders["6.jpg"] != "nvjpeg"
    for key in exact.keys():
        cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(exact[key]), torch.from_numpy(gpu[key]),
                                                       dim=-1).min()
        assert cosine > 0.99, key
        if decoders[key] != "nvjpeg":
            np.testing.assert_array_equal(gpu[key], exact[key])


@pytest.mark.slow
def test_the_decode_gpu_harness_runs_on_the_cpu_through_the_cli_and_finds_no_difference(tmp_path):
    """The harness scripts/gpu_check.sh runs over 600 JPEGs with nvJPEG, here over 8 with torchvision's CPU decoder
    standing in: same libjpeg-turbo decoding, so any difference would come from the routing or the batched device
    stage, not from the decoder. Grayscale, CMYK, progressive and EXIF-rotated files are among the 8."""
    from argparse import Namespace

    from vitok.bench import decode_check

    paths = decode_check.make_folder(tmp_path / "jpegs", 8, max_side=200)
    names = " ".join(p.name for p in paths)
    assert "_L_" in names and "_CMYK_" in names and "_prog_" in names and "_o3" in names and "_o7" in names
    args = Namespace(device="cpu", model="qwen3-vl-tiny", dtype=None, max_pixels=200704, token_budget=500,
                     workers=0)
    summary = decode_check.run(tmp_path / "jpegs", tmp_path, args)
    assert summary["images"] == 8 and not summary["keys_differ"] and not summary["skipped_differ"]
    assert summary["routed_to_device"] >= 4 and summary["exact_path"] >= 3  # CMYK, progressive, rotated stay exact
    assert summary["exact_path_identical"] == summary["exact_path"]
    assert summary["worst_token_cosine"] > 0.9999 and summary["pixel_max_abs"] <= 1


def test_the_device_stage_runs_the_injected_decode_step_before_it_encodes():
    """The device stage does not decode itself: ``DeviceDecode`` is handed to it. Routed JPEGs come out encoded
    with their records completed; a broken one leaves the batch as a skipped record with its reason."""
    import types as pytypes

    from vitok.inputs.gpu_decode import DeviceDecode, device_decode
    from vitok.pipeline.device import DevicePipeline
    from vitok.pipeline.types import Batch, EncodedBatch, Item
    from vitok.storage.records import ImageRecord

    class SumEncoder:
        device, preprocess = torch.device("cpu"), CONFIG

        def encode(self, images, features, token_order, chunk_rows=None):
            packed = torch.cat([im.patches.float().flatten(1).sum(1, keepdim=True) for im in images])
            rows = {"patch": [im.num_patches for im in images]}
            return pytypes.SimpleNamespace(features={"patch": packed}, rows=rows)

    assert device_decode(CONFIG, torch.device("cpu")) is None
    assert isinstance(device_decode(CONFIG.replace(decode="gpu"), torch.device("cpu")), DeviceDecode)
    good, broken = encoded(photo()), encoded(photo(seed=1))
    items = [Item(ImageRecord(key, "ok", key), gpu_route(data, CONFIG))
             for key, data in (("good", good), ("broken", broken[: len(broken) // 2]))]
    pipeline = DevicePipeline(SumEncoder(), ("patch",), "none", "float32", depth=1,
                              decode=DeviceDecode(CONFIG, torch.device("cpu")))
    events = pipeline.submit(Batch(0, items)) + pipeline.drain()
    batches = [e for e in events if isinstance(e, EncodedBatch)]
    assert [r.key for b in batches for r in b.records] == ["good"]
    assert batches[0].records[0].decoder == "nvjpeg" and batches[0].records[0].grid == list(items[0].image.grid_thw)
    skipped = [r for b in batches for r in b.skipped]
    assert [r.key for r in skipped] == ["broken"] and skipped[0].status == "skipped" and skipped[0].reason

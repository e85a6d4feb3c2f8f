"""Decoding: images/s per worker from loose files and from tars, exact and ``--fast-decode``; what fast decoding
changes (pixels, token cosine)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import make_jpegs, make_tars, row, sync


def decode_rate(paths: list[Path], kind: str, workers: int, max_pixels: int, fast: bool = False) -> float:
    """Images/s the decode workers deliver with nothing else running (the public loader, as a run uses it)."""
    import tempfile

    from ..inputs.preprocess import Preprocessor
    from ..inputs.preprocess_config import PreprocessConfig
    from ..inputs.readers import ReaderOptions
    from ..inputs.sources import list_inputs
    from ..pipeline.workers import load_units
    from ..storage.plan import load_plan, write_generation

    with tempfile.TemporaryDirectory() as tmp:
        listing = list_inputs([str(p) for p in paths], input_format=kind)
        write_generation(Path(tmp), listing, 256, 0, 0, [], "bench")
        units = load_plan(Path(tmp)).units
        preprocessor = Preprocessor(PreprocessConfig(max_pixels=max_pixels, fast_decode=fast))
        start = time.perf_counter()
        count = sum(len(chunk.items) for chunk in load_units(units, listing.kind if kind != "files" else "files",
                                                             ReaderOptions(), preprocessor, workers))
        return count / (time.perf_counter() - start)


def run(args, device, folder: Path) -> None:
    from ..encoder.inference import load_encoder
    from ..inputs.preprocess import Preprocessor
    from ..inputs.preprocess_config import PreprocessConfig

    paths = make_jpegs(folder / "data", args.data_images, args.jpeg_size)
    decode_rate(paths[:4], "files", 0, args.max_pixels)  # warm-up: imports, first-call kernel set-up
    # fast decoding only changes anything when the target is at most half the JPEG's size: a quarter of its area
    quarter = args.jpeg_size[0] * args.jpeg_size[1] // 4
    for max_pixels in (args.max_pixels, quarter):
        rates = {label: decode_rate(paths, "files", 0, max_pixels, fast)
                 for label, fast in (("exact", False), ("fast", True))}
        row("data", f"decode+preprocess ({args.jpeg_size[0]}x{args.jpeg_size[1]} JPEG, max_pixels {max_pixels}), "
            "exact vs --fast-decode, in the main process", exact_img_s=rates["exact"], fast_img_s=rates["fast"],
            ratio=rates["fast"] / rates["exact"])
    # tars vs loose files of the JPEGs most users have (img2dataset: 384-512 px)
    small = make_jpegs(folder / "small", args.tar_images, (512, 384))
    tars = make_tars(folder / "tars", args.tar_images, (512, 384), per_tar=max(1, args.tar_images // 4))
    for workers in (1, 2):
        loose = decode_rate(small, "files", workers, args.max_pixels)
        archived = decode_rate(tars, "wds", workers, args.max_pixels)
        row("data", f"{args.tar_images} JPEGs 512x384, {workers} worker(s): tars vs loose files",
            loose_img_s=loose, tar_img_s=archived, ratio=archived / loose)
    # what fast decoding changes: merged tokens of a random-weight tower (cosine similarity)
    encoder = load_encoder("qwen3-vl-2b" if device.type == "cuda" else "qwen3-vl-tiny", str(device), "float32")
    exact = Preprocessor(PreprocessConfig(max_pixels=quarter))
    fast = Preprocessor(PreprocessConfig(max_pixels=quarter, fast_decode=True))
    sims, pixel_diffs = [], []
    for path in paths[:6]:
        a, b = exact.load(path), fast.load(path)
        pixel_diffs.append((a.patches.float() - b.patches.float()).abs().mean().item())
        ta = encoder.encode([a], ("merged",)).features["merged"].float()
        tb = encoder.encode([b], ("merged",)).features["merged"].float()
        sims.append(torch.nn.functional.cosine_similarity(ta, tb, dim=-1).mean().item())
    row("data", f"fast-decode vs exact at max_pixels {quarter}",
        mean_abs_pixel_diff_uint8=sum(pixel_diffs) / len(pixel_diffs), min_token_cosine=min(sims),
        mean_token_cosine=sum(sims) / len(sims))
    if device.type == "cuda":
        device_decoding(paths, args.max_pixels, device, encoder)


def device_decoding(paths: list[Path], max_pixels: int, device: torch.device, encoder) -> None:
    """--decode gpu against the exact CPU path: images/s of each (the GPU's side: header routing on the host, then
    batches of 16 decoded, resized and cut into patches on the device), pixel and token differences."""
    from ..inputs.gpu_decode import decode_on_device
    from ..inputs.preprocess import Preprocessor
    from ..inputs.preprocess_config import PreprocessConfig

    config = PreprocessConfig(max_pixels=max_pixels)
    exact, routing = Preprocessor(config), Preprocessor(config.replace(decode="gpu"))
    data = [p.read_bytes() for p in paths]

    def on_device():
        images = [routing.load(d) for d in data]
        for start in range(0, len(images), 16):
            decode_on_device(images[start:start + 16], config, device)
        sync(device)
        return images

    on_device()  # warm-up: nvJPEG handles, kernels
    start = time.perf_counter()
    images = on_device()
    gpu_rate = len(data) / (time.perf_counter() - start)
    start = time.perf_counter()
    reference = [exact.load(d) for d in data]
    cpu_rate = len(data) / (time.perf_counter() - start)
    routed = sum(image.decoder == "nvjpeg" for image in images)
    diffs, sims = [], []
    for image, expected in zip(images, reference):
        diffs.append((image.patches.float().cpu() - expected.patches.float()).abs().mean().item())
        a = encoder.encode([expected], ("merged",)).features["merged"].float()
        b = encoder.encode([image], ("merged",)).features["merged"].float()
        sims.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item())
    row("data", f"--decode gpu vs exact ({len(data)} JPEGs, max_pixels {max_pixels}, one process)",
        exact_img_s=cpu_rate, gpu_img_s=gpu_rate, ratio=gpu_rate / cpu_rate, routed_to_gpu=routed,
        mean_abs_pixel_diff_uint8=sum(diffs) / len(diffs), min_token_cosine=min(sims))


"""JPEG decoders alone, images/s on the same 2-megapixel class JPEGs: vitok's exact decode (Pillow / simplejpeg) on
every core, torchvision's batched ``decode_jpeg`` (what ``--decode gpu`` calls: nvJPEG on CUDA, libjpeg-turbo on the
CPU), and, where ``nvidia.nvimgcodec`` imports on a CUDA machine, nvImageCodec with each backend it offers, the
hardware JPEG engines (``HW_GPU_ONLY``) among them, which torchvision does not reach. Each decoder's pixels are
compared with exact decode (mean and largest absolute difference over all pixels), so a fast decoder that decodes
differently shows it beside its speed.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .common import make_jpegs, row, sync

BATCH = 64  # images per batched decode call


def _exact(path: str) -> np.ndarray:
    from ..inputs.decode import decode_image

    decoded = decode_image(path)
    return decoded.pixels if decoded.pixels is not None else np.asarray(decoded.image)


def _exact_shape(path: str) -> tuple[int, ...]:
    return _exact(path).shape  # (the pixels themselves would cost more to send back than to decode)


def _exact_rate(paths: list[Path], workers: int) -> float:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_exact_shape, map(str, paths[:workers])))  # workers started and imports done
        start = time.perf_counter()
        for _ in pool.map(_exact_shape, map(str, paths), chunksize=4):
            pass
        return len(paths) / (time.perf_counter() - start)


def _timed(decode, batches: list, device: torch.device) -> tuple[float, list]:
    decode(batches[0])  # first call: library and device set-up
    sync(device)
    start = time.perf_counter()
    out = []
    for batch in batches:
        out += decode(batch)
    sync(device)
    return sum(map(len, batches)) / (time.perf_counter() - start), out


def _difference(decoded: list, reference: list[np.ndarray]) -> dict:
    """Mean and largest absolute pixel difference against exact decode (HWC uint8), and how many shapes differ."""
    total, count, largest, shapes = 0.0, 0, 0, 0
    for got, want in zip(decoded, reference):
        got = np.asarray(got)
        if got.shape != want.shape:
            shapes += 1
            continue
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        total, count, largest = total + float(diff.sum()), count + diff.size, max(largest, int(diff.max()))
    return {"pixel_mean_abs": total / max(count, 1), "pixel_max_abs": largest, "shape_differs": shapes}


def _torchvision(datas: list[bytes], device: torch.device):
    from ..inputs.gpu_decode import _decode

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]

    def decode(batch):
        return _decode(batch, device)

    batches = [tensors[i : i + BATCH] for i in range(0, len(tensors), BATCH)]
    rate, out = _timed(decode, batches, device)
    return rate, [t.permute(1, 2, 0).cpu().numpy() for t in out]


def _import_nvimgcodec():
    """``nvidia.nvimgcodec``, also from a folder of its own (``$VITOK_BENCH_NVIDIA_PATH``, its ``nvidia`` folder):
    its wheel ships ``nvidia/__init__.py``, which installed first on the path would hide torch's own ``nvidia``
    packages (its CUDA libraries), so scripts/gpu_check.sh installs it apart and it is joined here."""
    extra = os.environ.get("VITOK_BENCH_NVIDIA_PATH")
    if extra:
        try:
            import nvidia

            if extra not in list(nvidia.__path__):
                nvidia.__path__.append(extra)
        except ImportError:
            sys.path.append(str(Path(extra).parent))
    from nvidia import nvimgcodec

    return nvimgcodec


def _nvimgcodec(datas: list[bytes], device: torch.device, kind_name: str):
    nvimgcodec = _import_nvimgcodec()

    kind = getattr(nvimgcodec.BackendKind, kind_name)
    decoder = nvimgcodec.Decoder(device_id=device.index or 0, backends=[nvimgcodec.Backend(kind)],
                                 options=":fancy_upsampling=1")  # as libjpeg-turbo (Pillow) upsamples chroma

    def decode(batch):
        images = decoder.decode(batch)
        return [torch.as_tensor(image, device=device) if image is not None else None for image in images]

    batches = [datas[i : i + BATCH] for i in range(0, len(datas), BATCH)]
    rate, out = _timed(decode, batches, device)
    return rate, [t.cpu().numpy() if t is not None else np.zeros((0,), np.uint8) for t in out]


def run(args, device: torch.device, folder: Path) -> None:
    width, height = args.jpeg_size
    paths = make_jpegs(folder / "decoder-jpegs", args.decoder_images, (width, height))
    datas = [p.read_bytes() for p in paths]
    reference = [_exact(str(p)) for p in paths[: min(32, len(paths))]]
    what = f"{len(paths)} JPEGs {width}x{height}"
    workers = os.cpu_count() or 1
    exact = _exact_rate(paths, workers)
    row("decoders", f"{what}: exact decode (vitok's, Pillow/simplejpeg), {workers} processes", images_per_s=exact)

    rate, out = _torchvision(datas, device)
    row("decoders", f"{what}: torchvision decode_jpeg on {device.type} (--decode gpu's call), batches of {BATCH}",
        images_per_s=rate, vs_exact=rate / exact, **_difference(out, reference))
    if device.type != "cuda":
        return
    try:
        nvimgcodec = _import_nvimgcodec()
    except Exception as exc:  # not installed, or its CUDA libraries missing
        row("decoders", f"{what}: nvImageCodec", unavailable=f"{type(exc).__name__}: {str(exc)[:120]}")
        return
    for kind_name in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"):
        if not hasattr(nvimgcodec.BackendKind, kind_name):
            continue
        try:
            rate, out = _nvimgcodec(datas, device, kind_name)
        except Exception as exc:  # e.g. no hardware JPEG engine on this GPU
            row("decoders", f"{what}: nvImageCodec {kind_name}", unavailable=f"{type(exc).__name__}: {exc}"[:160])
            continue
        missing = sum(o.size == 0 for o in out)
        row("decoders", f"{what}: nvImageCodec {kind_name}, batches of {BATCH}", images_per_s=rate,
            vs_exact=rate / exact, not_decoded=missing, **_difference(out, reference))

"""Shared pieces of the benchmark: the result table, timing, FLOP counts, matmul rates and test inputs."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from ..encoder.config import EncoderConfig

ROWS: list[dict] = []


JSON_PATH: list[Path] = []  # where the rows go as they come (a benchmark cut short by a timeout keeps them)


def row(section: str, name: str, **values) -> None:
    ROWS.append({"section": section, "name": name, **values})
    for path in JSON_PATH:
        path.write_text(json.dumps(ROWS, indent=2))
    text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{section}] {name}: {text}", flush=True)


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def encoder_flops(config: EncoderConfig, grids) -> float:
    """Multiply-adds x 2 of one forward: patch embedding, blocks (GEMMs and attention), mergers."""
    d, i = config.hidden_size, config.intermediate_size
    mlp = 3 * d * i if getattr(config, "mlp", "gelu") == "swiglu" else 2 * d * i
    flops = 0.0
    for t, h, w in grids:
        n = t * h * w
        flops += 2 * n * config.patch_dim * d
        flops += config.depth * (2 * n * (4 * d * d + mlp) + 4 * n * n * d)
        if config.out_hidden_size:
            wide = d * config.spatial_merge_size**2
            mergers = 1 + len(config.deepstack_visual_indexes)
            flops += mergers * 2 * (n / 4) * (wide * wide + wide * config.out_hidden_size)
    return flops


def matmul_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Best FLOP/s of each GEMM kernel vitok can use here, over a square matmul and the encoder's two MLP shapes
    (the MFU denominator is the best of all): a single square shape can run below what the encoder's shapes get."""
    from .. import settings
    from ..encoder import kernels

    if device.type == "cuda":
        shapes, iters = [(8192, 8192, 8192)], 10
    else:
        shapes, iters = [(2048, 2048, 2048), (4096, 1024, 4096), (4096, 4096, 1024)], 3
    rates: dict[str, float] = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2 * m * k * n
        rates["torch_mm"] = max(rates.get("torch_mm", 0.0), flops / timeit(lambda a=a, b=b: a @ b, device, 2, iters))
        if device.type == "cpu":
            weight = b.t().contiguous()  # (out, in), as a Linear holds it
            with torch.inference_mode(), settings.override(onednn="on"):
                if kernels.onednn_linear_available():
                    rate = flops / timeit(lambda a=a, w=weight: kernels.linear(a, w, None), device, 2, iters)
                    rates["onednn"] = max(rates.get("onednn", 0.0), rate)
    return rates


def _photos() -> list:
    """The bundled sample photos in a source checkout; else photo-like synthetic images (smooth fields + noise)."""
    from PIL import Image

    folder = Path(__file__).resolve().parents[2] / "examples" / "images"
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*")) if p.suffix in (".png", ".jpg")]
    if photos:
        return photos
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((800, 600), Image.Resampling.BICUBIC), dtype=np.float32)
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    return images


def jpeg_bytes(count: int, size: tuple[int, int], distinct: int = 16) -> list[bytes]:
    """``count`` JPEG files' bytes: ``distinct`` photos resized and re-encoded, then repeats (same decoding cost)."""
    from PIL import Image

    photos = _photos()
    unique = []
    for i in range(min(count, distinct)):
        source = photos[i % len(photos)]
        if i >= len(photos):  # another orientation, so the distinct files differ
            source = source.rotate(90 * (i // len(photos)), expand=True)
        buffer = io.BytesIO()
        source.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        unique.append(buffer.getvalue())
    return [unique[i % len(unique)] for i in range(count)]


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(jpeg_bytes(count, size)):
        path = folder / f"photo{i:05d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def make_tars(folder: Path, count: int, size: tuple[int, int], per_tar: int = 256) -> list[Path]:
    """img2dataset-like webdataset tars: KEY.jpg, KEY.txt and KEY.json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    images = jpeg_bytes(count, size)
    tars = []
    for shard, start in enumerate(range(0, count, per_tar)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(count, start + per_tar)):
                key = f"{shard:05d}{i:04d}"
                members = {"jpg": images[i], "txt": f"a photo {i}".encode(),
                           "json": json.dumps({"key": key, "status": "success"}).encode()}
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tars.append(path)
    return tars

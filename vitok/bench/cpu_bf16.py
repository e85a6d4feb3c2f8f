"""bf16 on a CPU: ``--dtype bfloat16 --device cpu`` against float32, the encoder in-process and whole processes, each
the median of alternating runs (a noisy neighbour hurts both alike), with the CPU features the figures come from.
bf16 GEMMs need ``amx_bf16`` (Sapphire Rapids and later) or ``avx512_bf16`` (Cooper Lake, Zen 4) to beat float32."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import make_jpegs, row, timeit
from .encoder import shallow

FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_features() -> str:
    from ..environment import cpu_flags

    flags = set(cpu_flags())
    return " ".join(f for f in FEATURES if f in flags) or "none of " + ",".join(FEATURES)


def run(args, tmp: Path) -> None:
    from ..encoder.model import VisionEncoder, init_random_weights

    features = cpu_features()
    config = shallow(args.preset, args.depth)
    grids = [(1, 32, 46)] * 2 + [(1, 24, 32)] * 2  # 4 images, 4,480 patches
    fp32 = VisionEncoder(config).eval()
    init_random_weights(fp32)
    bf16 = VisionEncoder(config).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, config.patch_dim)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for model in (fp32, bf16):
            model(pixels, grids, features=("merged",))  # warm-up: kernel choices, packing
        for _ in range(max(3, args.iters)):
            for model, name in ((fp32, "float32"), (bf16, "bfloat16")):
                times[name].append(timeit(lambda m=model: m(pixels, grids, features=("merged",)), cpu, 0, 1))
        a = fp32(pixels, grids, features=("merged",)).features["merged"]
        b = bf16(pixels, grids, features=("merged",)).features["merged"].float()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    f32, b16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    row("bf16", f"encoder in-process, {args.preset} width at depth {config.depth}, {len(grids)} images {n} patches, "
        f"median of {len(times['float32'])}", cpu_features=features, fp32_ms=f32 * 1e3, bf16_ms=b16 * 1e3,
        speedup=f32 / b16, min_token_cosine=cosine)
    # whole processes: what a user waits for
    folder = make_jpegs(tmp / "bf16-jpegs", 16, args.jpeg_size)[0].parent
    walls: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    depth_model = tmp / "bf16-model.safetensors"
    if not depth_model.exists():
        from ..encoder.checkpoint import save_tower

        save_tower(fp32, depth_model, config)
    for _ in range(max(1, args.process_repeats)):
        for name in ("float32", "bfloat16"):
            cmd = [sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp / f"bf16-out-{name}"),
                   "--model", str(depth_model), "--device", "cpu", "--dtype", name, "--overwrite", "--quiet",
                   "--features", "merged"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            walls[name].append(time.perf_counter() - start)
    f32, b16 = statistics.median(walls["float32"]), statistics.median(walls["bfloat16"])
    row("bf16", f"whole processes, 16 JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]}, median of "
        f"{len(walls['float32'])} alternating", cpu_features=features, fp32_s=f32, bf16_s=b16, speedup=f32 / b16,
        fp32_runs=" ".join(f"{s:.1f}" for s in walls["float32"]),
        bf16_runs=" ".join(f"{s:.1f}" for s in walls["bfloat16"]))

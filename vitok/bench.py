#!/usr/bin/env python
"""vitok benchmark: vitok vs the transformers reference in one process, same weights, same inputs, printed as ratios.

    python scripts/bench.py                          # CPU: 2B width at depth 2, the targets of the speed issue
    python scripts/bench.py --device cuda --full     # GPU: full 2B tower, bf16, MFU and peak memory
    python scripts/bench.py --json results.json      # also write the table as JSON

Sections:
  machine   the fp32/bf16 matmul rate of each GEMM kernel available (the best is the MFU denominator)
  encoder   vitok vs transformers Qwen3VLVisionModel (default SDPA), a packed batch of same- and mixed-size images;
            on CPU also vitok on torch's default GEMM, to show what the oneDNN kernels add
  e2e       vitok vs the loop a user writes (reference processor + model, a batch at a time) on a folder of JPEGs.
            CPU: whole processes timed start to finish (`python -m vitok extract` vs the loop as a script).
            GPU: the run loops in one process, plus the share of the encoder-only rate vitok keeps end to end,
            exact decoding and --fast-decode.
  data      decode + preprocess images/s in one process (one worker), exact vs --fast-decode, token difference
  memory    (CUDA) peak memory of small/base/large at 224x224, batch 1
Needs the test extra (transformers) for the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitok import kernels
from vitok.config import EncoderConfig
from vitok.model import VisionEncoder
from vitok.presets import get_preset

ROWS: list[dict] = []


def row(section: str, name: str, **values) -> None:
    ROWS.append({"section": section, "name": name, **values})
    text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{section}] {name}: {text}", flush=True)


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
    d, i = config.hidden_size, config.intermediate_size
    flops = 0.0
    for t, h, w in grids:
        n = t * h * w
        flops += 2 * n * config.patch_dim * d
        flops += config.depth * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)
        if config.out_hidden_size:
            wide = d * config.spatial_merge_size**2
            mergers = 1 + len(config.deepstack_visual_indexes)
            flops += mergers * 2 * (n / 4) * (wide * wide + wide * config.out_hidden_size)
    return flops


def matmul_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """FLOP/s of a large square matmul on each GEMM kernel vitok can use here (the MFU denominator is the best)."""
    from vitok import kernels

    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    iters = 10 if device.type == "cuda" else 3
    rates = {"torch_mm": 2 * size**3 / timeit(lambda: a @ b, device, 2, iters)}
    if device.type == "cpu" and kernels.onednn_linear_available():
        with torch.inference_mode():
            rates["onednn"] = 2 * size**3 / timeit(lambda: kernels.linear(a, b, None), device, 2, iters)
    return rates


def reference_and_vitok(config: EncoderConfig, device, dtype, attention="auto"):
    from transformers import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    hf_config = Qwen3VLVisionConfig(
        depth=config.depth, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_heads=config.num_heads, out_hidden_size=config.out_hidden_size,
        num_position_embeddings=config.num_position_embeddings,
        deepstack_visual_indexes=list(config.deepstack_visual_indexes),
    )
    with torch.device(device):
        reference = Qwen3VLVisionModel(hf_config).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=generator)
    reference = reference.to(dtype)
    with torch.device(device):
        model = VisionEncoder(config)
    model.load_state_dict(reference.state_dict())
    model = model.to(device=device, dtype=dtype).eval()
    if attention == "auto":
        attention = "varlen" if device.type == "cuda" and dtype != torch.float32 else "sdpa"
    model.set_attention(attention)
    return reference, model


def bench_encoder(args, device, dtype, full: bool, grid_sets) -> None:
    preset = get_preset(args.preset).encoder
    depth = preset.depth if full else args.depth
    config = EncoderConfig.from_dict({**preset.to_dict(), "depth": depth,
                                      "deepstack_visual_indexes": [i for i in preset.deepstack_visual_indexes
                                                                   if i < depth]})
    reference, model = reference_and_vitok(config, device, dtype, args.attention)
    for label, grids in grid_sets:
        n = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(n, config.patch_dim, device=device, dtype=dtype)
        grid_tensor = torch.tensor(grids, device=device)
        with torch.inference_mode():
            ref_time = timeit(lambda: reference(pixels, grid_tensor), device, args.warmup, args.iters)
            features = ("merged", "deepstack") if config.deepstack_visual_indexes else ("merged",)
            vitok_time = timeit(lambda: model(pixels, grids, features=features), device, args.warmup, args.iters)
            expected = reference(pixels, grid_tensor).pooler_output.float()
            got = model(pixels, grids, features=("merged",)).features["merged"].float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        flops = encoder_flops(config, grids)
        values = dict(depth=depth, images=len(grids), patches=n, ref_ms=ref_time * 1e3, vitok_ms=vitok_time * 1e3,
                      ratio=ref_time / vitok_time, vitok_tok_s=n / vitok_time, ref_tok_s=n / ref_time,
                      vitok_tflops=flops / vitok_time / 1e12, ref_tflops=flops / ref_time / 1e12, rel_err=error)
        if args.peak_flops:
            values["vitok_mfu"] = flops / vitok_time / args.peak_flops
            values["ref_mfu"] = flops / ref_time / args.peak_flops
        row("encoder", f"{args.preset} {label} {str(dtype).removeprefix('torch.')}", **values)
        if device.type == "cpu" and kernels.onednn_linear_available():
            with torch.inference_mode(), torch_default_gemm():
                default_time = timeit(lambda: model(pixels, grids, features=features), device, args.warmup, args.iters)
            row("encoder", f"{args.preset} {label}, vitok on torch's default CPU GEMM (VITOK_ONEDNN=0)",
                ref_ms=ref_time * 1e3, vitok_ms=default_time * 1e3, ratio=ref_time / default_time)
    del reference, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def torch_default_gemm():
    from vitok import kernels

    available = kernels.onednn_linear_available
    kernels.onednn_linear_available = lambda: False
    try:
        yield
    finally:
        kernels.onednn_linear_available = available


def _grid_sets(args, device):
    if device.type == "cuda":
        return [("448x448 x32", [(1, 28, 28)] * 32),
                ("mixed x24 (448,640x480,256,1024x768)", [(1, 28, 28), (1, 30, 40), (1, 16, 16), (1, 48, 64)] * 6)]
    return [("4x768-patch", [(1, 24, 32)] * 4), ("mixed x4", [(1, 24, 32), (1, 16, 16), (1, 30, 40), (1, 20, 20)])]


def make_jpegs(folder: Path, count: int, size: tuple[int, int], distinct: int = 16) -> list[Path]:
    """``count`` JPEGs: ``distinct`` photos resized and re-encoded, then copies of them (decoding costs the same)."""
    from PIL import Image

    photos = sorted((ROOT / "examples" / "images").glob("*.*"))
    photos = [p for p in photos if p.suffix in (".png", ".jpg")]
    paths = []
    for i in range(count):
        path = folder / f"photo{i:05d}.jpg"
        if i < distinct:
            source = Image.open(photos[i % len(photos)]).convert("RGB")
            if i >= len(photos):  # a different crop, so the distinct files differ
                source = source.rotate(90 * (i // len(photos)), expand=True)
            source.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
        else:
            shutil.copyfile(paths[i % distinct], path)
        paths.append(path)
    return paths


def bench_data(args, folder: Path) -> None:
    from vitok.config import PreprocessConfig
    from vitok.preprocess import Preprocessor

    paths = sorted(folder.glob("*.jpg"))[: args.data_images]
    for label, config in (("exact", PreprocessConfig(max_pixels=args.max_pixels)),
                          ("fast-decode", PreprocessConfig(max_pixels=args.max_pixels, fast_decode=True))):
        pre = Preprocessor(config)
        pre.load(paths[0])
        start = time.perf_counter()
        for path in paths:
            pre.load(path)
        seconds = time.perf_counter() - start
        row("data", f"decode+preprocess {label} ({args.jpeg_size[0]}x{args.jpeg_size[1]} JPEG, max_pixels "
            f"{args.max_pixels})", images_per_s_per_worker=len(paths) / seconds,
            ms_per_image=seconds / len(paths) * 1e3)
    # token difference of fast decoding: merged tokens of a random-weight tower (cosine similarity)
    from vitok.inference import load_encoder

    device = torch.device(args.device)
    encoder = load_encoder("qwen3-vl-2b" if device.type == "cuda" else "qwen3-vl-tiny", str(device), "float32")
    exact, fast = Preprocessor(PreprocessConfig(max_pixels=args.max_pixels)), \
        Preprocessor(PreprocessConfig(max_pixels=args.max_pixels, fast_decode=True))
    sims, pixel_diffs = [], []
    for path in paths[:6]:
        a, b = exact.load(path), fast.load(path)
        pixel_diffs.append((a.patches.float() - b.patches.float()).abs().mean().item())
        ta = encoder.encode([a], ("merged",)).features["merged"].float()
        tb = encoder.encode([b], ("merged",)).features["merged"].float()
        sims.append(torch.nn.functional.cosine_similarity(ta, tb, dim=-1).mean().item())
    row("data", "fast-decode vs exact", mean_abs_pixel_diff_uint8=sum(pixel_diffs) / len(pixel_diffs),
        min_token_cosine=min(sims), mean_token_cosine=sum(sims) / len(sims))


NAIVE_LOOP = """
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

checkpoint, folder, batch, device, dtype, out = sys.argv[1:7]
batch, dtype = int(batch), getattr(torch, dtype)
model = Qwen3VLVisionModel.from_pretrained(checkpoint).to(device, dtype).eval()
processor = Qwen2VLImageProcessor.from_pretrained(checkpoint)
paths = sorted(Path(folder).glob("*.jpg"))
tokens = []
with torch.inference_mode():
    for start in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch]]
        inputs = processor(images=images, return_tensors="pt")
        output = model(inputs["pixel_values"].to(device, dtype), inputs["image_grid_thw"].to(device))
        tokens.extend(t.numpy() for t in output.pooler_output.float().cpu().split(
            (inputs["image_grid_thw"].prod(-1) // 4).tolist()))
np.save(out, np.concatenate(tokens))
"""


def _e2e_models(args, device, dtype, tmp: Path):
    """Reference + vitok with the same random weights, and a checkpoint folder both can load."""
    from transformers import Qwen2VLImageProcessor

    preset = get_preset(args.preset).encoder
    depth = preset.depth if args.full else args.depth
    config = EncoderConfig.from_dict({**preset.to_dict(), "depth": depth, "deepstack_visual_indexes": []})
    reference, model = reference_and_vitok(config, device, dtype)
    size = {"shortest_edge": 65536, "longest_edge": args.max_pixels}
    processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, size=size)
    checkpoint = tmp / "checkpoint"
    reference.float().save_pretrained(checkpoint)  # config.json (the vision config) + model.safetensors
    reference.to(dtype)
    processor.save_pretrained(checkpoint)  # preprocessor_config.json, read by both
    return config, reference, model, processor, checkpoint


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def bench_e2e_processes(args, device, dtype, folder: Path, tmp: Path) -> None:
    """Whole processes, start to finish (imports, model load, decode, encode, write): what a user waits for."""
    config, _, _, _, checkpoint = _e2e_models(args, device, dtype, tmp)
    paths = sorted(folder.glob("*.jpg"))
    dtype_name = str(dtype).removeprefix("torch.")
    naive = [sys.executable, "-c", NAIVE_LOOP, str(checkpoint), str(folder), str(args.naive_batch), str(device),
             dtype_name, str(tmp / "naive.npy")]
    vitok_cli = [sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp / "vitok-out"), "--model",
                 str(checkpoint), "--device", str(device), "--dtype", dtype_name, "--features", "merged", "--quiet",
                 "--overwrite"] + (["--workers", str(args.workers)] if args.workers is not None else [])
    naive_s = min(_wall(naive) for _ in range(args.process_repeats))
    vitok_s = min(_wall(vitok_cli) for _ in range(args.process_repeats))
    row("e2e", f"whole processes: {len(paths)} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]}, {args.preset} depth "
        f"{config.depth}, best of {args.process_repeats}", naive_s=naive_s, vitok_s=vitok_s, ratio=naive_s / vitok_s,
        naive_img_s=len(paths) / naive_s, vitok_img_s=len(paths) / vitok_s)


def bench_e2e_inprocess(args, device, dtype, folder: Path, tmp: Path) -> None:
    """Steady-state throughput of the run loop (model loaded), against the encoder alone on the same image size."""
    from PIL import Image

    import vitok
    from vitok.config import PreprocessConfig
    from vitok.preprocess import Preprocessor

    config, reference, model, processor, checkpoint = _e2e_models(args, device, dtype, tmp)
    paths = sorted(folder.glob("*.jpg"))
    naive_paths = paths[: args.naive_images]
    batch = args.naive_batch

    def naive(subset) -> None:
        with torch.inference_mode():
            for start in range(0, len(subset), batch):
                images = [Image.open(p).convert("RGB") for p in subset[start:start + batch]]
                inputs = processor(images=images, return_tensors="pt")
                out = reference(inputs["pixel_values"].to(device, dtype), inputs["image_grid_thw"].to(device))
                out.pooler_output.float().cpu()

    naive(naive_paths[:batch])  # warm up
    sync(device)
    start = time.perf_counter()
    naive(naive_paths)
    sync(device)
    naive_img_s = len(naive_paths) / (time.perf_counter() - start)
    del reference

    # the encoder alone, on batches of the size the runner forms for these images
    grid = Preprocessor(PreprocessConfig(max_pixels=args.max_pixels)).load(paths[0]).grid_thw
    budget = args.token_budget or (32768 if device.type == "cuda" else 4096)
    per_batch = max(1, budget // (grid[0] * grid[1] * grid[2]))
    grids = [grid] * per_batch
    pixels = torch.randn(per_batch * grid[0] * grid[1] * grid[2], config.patch_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = timeit(lambda: model(pixels, grids, features=("merged",)), device, args.warmup, args.iters)
    encoder_img_s = per_batch / seconds
    del model

    options = dict(model=str(checkpoint), device=str(device), dtype=str(dtype).removeprefix("torch."),
                   features=["merged"], workers=args.workers, token_budget=args.token_budget,
                   shard_size=args.shard_size)
    vitok.extract([str(p) for p in paths[: 2 * per_batch]], tmp / "warm", **options)  # kernels, allocator
    for label, fast in (("exact decode", False), ("--fast-decode", True)):
        supply = loader_supply(paths, args, fast)
        summary = vitok.extract([str(folder)], tmp / f"out-{fast}", fast_decode=fast, **options)
        vitok_img_s = summary.ok / summary.seconds  # the run loop, model loading excluded as for the naive loop
        row("e2e", f"{len(paths)} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]} -> grid {grid[1]}x{grid[2]}, "
            f"{args.preset} depth {config.depth}, {label}, shards of {args.shard_size}", naive_img_s=naive_img_s,
            vitok_img_s=vitok_img_s, ratio=vitok_img_s / naive_img_s, encoder_only_img_s=encoder_img_s,
            share_of_encoder_only=vitok_img_s / encoder_img_s, loader_alone_img_s=supply,
            data_wait_share=summary.data_wait_seconds / summary.seconds,
            device_wait_share=summary.device_wait_seconds / summary.seconds,
            encode_share=summary.encode_seconds / summary.seconds, seconds=summary.seconds,
            workers=args.workers if args.workers is not None else -1)


def loader_supply(paths, args, fast: bool) -> float:
    """Images/s the run's DataLoader delivers with nothing else running: the ceiling of an end-to-end run."""
    from vitok.config import PreprocessConfig
    from vitok.preprocess import Preprocessor
    from vitok.runner import LOADER_CHUNK, _Chunk, _Images, default_workers

    workers = args.workers if args.workers is not None else default_workers(torch.device("cuda"))
    dataset = _Images(list(enumerate(map(str, paths))), Preprocessor(PreprocessConfig(max_pixels=args.max_pixels,
                                                                                      fast_decode=fast)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_CHUNK, num_workers=workers, prefetch_factor=2,
                                         collate_fn=_Chunk.collate, pin_memory=torch.cuda.is_available())
    start = time.perf_counter()
    count = sum(len(chunk.indices) for chunk in loader)
    return count / (time.perf_counter() - start)


def bench_memory(device) -> None:
    from PIL import Image

    from vitok.inference import load_encoder
    from vitok.preprocess import Preprocessor

    for name in ("small", "base", "large"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        encoder = load_encoder(name, device=str(device), dtype="float32")
        prepared = Preprocessor(encoder.preprocess).prepare(Image.new("RGB", (224, 224)))
        encoder.encode([prepared])
        sync(device)
        row("memory", f"{name} 224x224 batch 1 fp32", peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
            params_m=encoder.config.num_parameters() / 1e6)
        del encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitok bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--preset", default="qwen3-vl-2b")
    parser.add_argument("--depth", type=int, default=2, help="tower depth when not --full")
    parser.add_argument("--full", action="store_true", help="full-depth tower")
    parser.add_argument("--sections", default="encoder,encoder-full,data,e2e,memory",
                        help="comma list of: encoder, encoder-full (CPU: full depth, one image), data, e2e, memory")
    parser.add_argument("--images", type=int, default=16, help="JPEGs for e2e (16 distinct, the rest copies)")
    parser.add_argument("--data-images", type=int, default=16, help="JPEGs timed in the data section")
    parser.add_argument("--naive-images", type=int, default=256, help="JPEGs timed for the in-process naive loop")
    parser.add_argument("--process-repeats", type=int, default=2, help="CPU e2e: best of this many process runs")
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=256, help="e2e (GPU): images per shard")
    parser.add_argument("--jpeg-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(800, 600))
    parser.add_argument("--max-pixels", type=int, default=16777216)
    parser.add_argument("--naive-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sections = args.sections.split(",")
    print(f"# torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    rates = matmul_rates(device, dtype)
    args.peak_flops = max(rates.values())
    row("machine", f"measured {str(dtype).removeprefix('torch.')} matmul rate (MFU uses the best)",
        **{f"{name}_tflops": rate / 1e12 for name, rate in rates.items()})
    if "encoder" in sections:
        bench_encoder(args, device, dtype, args.full, _grid_sets(args, device))
    if "encoder-full" in sections and device.type == "cpu" and not args.full:
        # the full-depth target on a CPU: one 448x448 image through all 24 blocks
        bench_encoder(args, device, dtype, True, [("448x448 x1", [(1, 28, 28)])])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        if "data" in sections or "e2e" in sections:
            make_jpegs(folder, args.images, args.jpeg_size)
        if "data" in sections:
            bench_data(args, folder)
        if "e2e" in sections:
            if device.type == "cpu":
                bench_e2e_processes(args, device, dtype, folder, Path(tmp))
            else:
                bench_e2e_inprocess(args, device, dtype, folder, Path(tmp))
    if "memory" in sections and device.type == "cuda":
        bench_memory(device)
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""vitok benchmark: vitok vs the transformers reference in one process, same weights, same inputs, printed as ratios.

    python scripts/bench.py                          # CPU: 2B width at depth 2, the targets of the speed issue
    python scripts/bench.py --device cuda --full     # GPU: full 2B tower, bf16, MFU and peak memory
    python scripts/bench.py --json results.json      # also write the table as JSON

Sections:
  encoder   vitok vs transformers Qwen3VLVisionModel (default SDPA), a packed batch of mixed-size images
  e2e       vitok.extract on a folder of large JPEGs vs the loop a user writes (reference processor + model)
  data      decode + preprocess images/s in one process (one worker), exact vs --fast-decode, token difference
  memory    (CUDA) peak memory of small/base/large at 224x224, batch 1
Needs the test extra (transformers) for the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vitok.config import EncoderConfig  # noqa: E402
from vitok.model import VisionEncoder  # noqa: E402
from vitok.presets import get_preset  # noqa: E402

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
            flops += (1 + len(config.deepstack_visual_indexes)) * 2 * (n / 4) * (wide * wide + wide * config.out_hidden_size)
    return flops


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1536
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, 2, 10 if device.type == "cuda" else 3)
    return 2 * size**3 / seconds


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


def bench_encoder(args, device, dtype) -> None:
    preset = get_preset(args.preset).encoder
    depth = preset.depth if args.full else args.depth
    config = EncoderConfig.from_dict({**preset.to_dict(), "depth": depth,
                                      "deepstack_visual_indexes": [i for i in preset.deepstack_visual_indexes
                                                                   if i < depth]})
    reference, model = reference_and_vitok(config, device, dtype, args.attention)
    for label, grids in _grid_sets(args, device):
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
    del reference, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _grid_sets(args, device):
    if device.type == "cuda":
        return [("448x448 x32", [(1, 28, 28)] * 32),
                ("mixed x24 (448,640x480,256,1024x768)", [(1, 28, 28), (1, 30, 40), (1, 16, 16), (1, 48, 64)] * 6)]
    return [("4x768-patch", [(1, 24, 32)] * 4), ("mixed x4", [(1, 24, 32), (1, 16, 16), (1, 30, 40), (1, 20, 20)])]


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    photos = sorted((ROOT / "examples" / "images").glob("*.*"))
    photos = [p for p in photos if p.suffix in (".png", ".jpg")]
    paths = []
    for i in range(count):
        image = Image.open(photos[i % len(photos)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        path = folder / f"photo{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def bench_data(args, folder: Path) -> None:
    from vitok.config import PreprocessConfig
    from vitok.preprocess import Preprocessor

    paths = sorted(folder.glob("*.jpg"))
    for label, config in (("exact", PreprocessConfig(max_pixels=args.max_pixels)),
                          ("fast-decode", PreprocessConfig(max_pixels=args.max_pixels, fast_decode=True))):
        pre = Preprocessor(config)
        pre.load(paths[0])
        start = time.perf_counter()
        for path in paths:
            pre.load(path)
        seconds = time.perf_counter() - start
        row("data", f"decode+preprocess {label} ({args.jpeg_size[0]}x{args.jpeg_size[1]} JPEG, max_pixels "
            f"{args.max_pixels})", images_per_s_per_worker=len(paths) / seconds, ms_per_image=seconds / len(paths) * 1e3)
    # token difference of fast decoding: merged tokens of a random-weight tower (cosine similarity)
    from vitok.runtime import load_encoder

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


def bench_e2e(args, device, dtype, folder: Path) -> None:
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    import vitok

    preset = get_preset(args.preset).encoder
    depth = preset.depth if args.full else args.depth
    config = EncoderConfig.from_dict({**preset.to_dict(), "depth": depth, "deepstack_visual_indexes": []})
    reference, model = reference_and_vitok(config, device, dtype)
    processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": args.max_pixels})
    paths = sorted(folder.glob("*.jpg"))
    batch = args.naive_batch

    def naive() -> None:
        with torch.inference_mode():
            for start in range(0, len(paths), batch):
                images = [Image.open(p).convert("RGB") for p in paths[start:start + batch]]
                inputs = processor(images=images, return_tensors="pt")
                out = reference(inputs["pixel_values"].to(device, dtype), inputs["image_grid_thw"].to(device))
                out.pooler_output.float().cpu()

    naive()  # warm caches
    sync(device)
    start = time.perf_counter()
    naive()
    sync(device)
    naive_seconds = time.perf_counter() - start
    # vitok with the same weights: save them as a tower file and extract through the real runner
    from vitok.checkpoint import save_tower

    with tempfile.TemporaryDirectory() as tmp:
        tower = Path(tmp) / "tower.safetensors"
        save_tower(model.float().cpu(), tower, config)
        del model
        options = dict(model=str(tower), device=str(device), dtype=str(dtype).removeprefix("torch."),
                       features=["merged"], max_pixels=args.max_pixels, workers=args.workers)
        vitok.extract([str(folder)], Path(tmp) / "warm", **options)
        start = time.perf_counter()
        summary = vitok.extract([str(folder)], Path(tmp) / "out", **options)
        vitok_seconds = summary.seconds  # the run loop, model loading excluded as for the naive loop
    row("e2e", f"{len(paths)} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]}, {args.preset} depth {depth}",
        naive_img_s=len(paths) / naive_seconds, vitok_img_s=len(paths) / vitok_seconds,
        ratio=naive_seconds / vitok_seconds, data_wait_share=summary.data_wait_seconds / max(summary.seconds, 1e-9),
        workers=args.workers if args.workers is not None else -1)


def bench_memory(device) -> None:
    from PIL import Image

    from vitok.preprocess import Preprocessor
    from vitok.runtime import load_encoder

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--preset", default="qwen3-vl-2b")
    parser.add_argument("--depth", type=int, default=2, help="tower depth when not --full")
    parser.add_argument("--full", action="store_true", help="full-depth tower")
    parser.add_argument("--sections", default="encoder,data,e2e,memory")
    parser.add_argument("--images", type=int, default=16, help="JPEGs for e2e/data")
    parser.add_argument("--jpeg-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(800, 600))
    parser.add_argument("--max-pixels", type=int, default=16777216)
    parser.add_argument("--naive-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sections = args.sections.split(",")
    print(f"# torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}", flush=True)
    args.peak_flops = matmul_rate(device, dtype)
    row("machine", f"measured {str(dtype).removeprefix('torch.')} matmul rate", tflops=args.peak_flops / 1e12)
    if "encoder" in sections:
        bench_encoder(args, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "data" in sections or "e2e" in sections:
            make_jpegs(folder, args.images, args.jpeg_size)
        if "data" in sections:
            bench_data(args, folder)
        if "e2e" in sections:
            bench_e2e(args, device, dtype, folder)
    if "memory" in sections and device.type == "cuda":
        bench_memory(device)
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2))


if __name__ == "__main__":
    main()

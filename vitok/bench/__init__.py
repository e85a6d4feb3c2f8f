"""vitok benchmark: vitok against the transformers reference (same weights, same inputs) and against its own
ceilings, printed as ratios measured in the same run. Runs from an installed wheel (``vitok bench``); the reference
comparisons need transformers (the test extra) and are skipped without it.

    vitok bench                                  # CPU: 2B width at depth 2
    vitok bench --device cuda --full             # GPU: the full 2B tower in bf16, MFU and peak memory
    vitok bench --sections plan,rss --json out.json

Sections:
  machine       matmul rate of each GEMM kernel available here (the best is the MFU denominator)
  encoder       vitok vs transformers' tower (default SDPA), a batch of same- and mixed-size images; on CPU also
                vitok on torch's default GEMM; encoder-full: the full-depth tower, one image (CPU)
  families      the same, one row per model family (--families)
  data          decode + preprocess images/s: exact vs --fast-decode, tars vs loose files with 1 and 2 workers
  e2e           vitok vs the naive loop: whole processes on CPU (median of alternating runs), run loops on GPU
  loop          whole processes over --loop-images JPEGs: vitok (exact; --decode gpu on CUDA) vs the DataLoader loop
                a competent user writes (transformers, 'AutoImageProcessor' in a DataLoader, pinned memory)
  startup       time to the first batch of whole `vitok extract` processes and its phases (tiny model on CPU;
                the full tower from a checkpoint on CUDA)
  bf16          (CPU) --dtype bfloat16 vs float32: the encoder in-process and whole processes, with CPU features
  attention     (CUDA) the encoder with each attention kernel available (varlen flash, SDPA flash/cuDNN/efficient)
  decoders      JPEG decoders alone on --jpeg-size JPEGs: exact decode on every core, torchvision's decode_jpeg
                (--decode gpu's call), nvImageCodec's backends where it imports on CUDA (the hardware JPEG engines
                among them); images/s and pixel differences against exact decode
  plan          `vitok plan` over --plan-paths listed paths: seconds and peak memory; a part's start-up
  rss           peak memory of one run with shards of 10 and of --rss-images images
  reads         reading a 100,000-image pooled store and a 10,000-image store of 64 tokens each, key by key vs
                whole shards; random keys through the key index vs without it
  index         opening a store of --index-keys keys: building its key index, then mapping the cached one;
                random key lookups through it
  train         a training step of a tiny Qwen3-VL on cached image features vs on pixels (CPU)
  memory        (CUDA) peak memory of small/base/large at 224x224, batch 1
  s3            (not run by default) a store written into S3 (--s3-url, else moto's server on loopback): requests
                and bytes per committed shard, the commit's MB/s against a plain upload of the same bytes
  ray           (not run by default; needs ray[data]) --engine ray on a local Ray instance vs the local engine,
                whole runs on the same JPEGs; on CUDA, the GPU's node alone vs with a CPU-only node added
  video         (not run by default; needs the video extra and transformers) decode + preprocess of --video-clips
                clips with each decoder vs transformers' video processor, and vitok.extract vs the transformers loop
                (processor + tower per clip): videos/s and sampled frames/s per core, largest differences
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .common import ROWS, have_transformers, matmul_rates, row

SECTIONS = ("machine", "encoder", "encoder-full", "families", "data", "e2e", "loop", "startup", "bf16", "attention",
            "decoders", "plan", "rss", "reads", "index", "train", "memory", "s3", "ray", "video")  # as the docstring
            # lists them
DEFAULT_SECTIONS = "machine,encoder,encoder-full,data,e2e,memory"


def sections(value: str) -> set[str]:
    """``--sections``: a comma list of known sections (an unknown one is a usage error naming them all)."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(SECTIONS))
    if unknown or not names:
        what = f"unknown section(s) {', '.join(repr(n) for n in unknown)}" if unknown else "no section named"
        raise argparse.ArgumentTypeError(f"{what}; sections: {', '.join(SECTIONS)}")
    return names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error is one line and exit 2, as every vitok command's (``--help`` shows the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vitok bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--preset", default="qwen3-vl-2b")
    p.add_argument("--families", default="qwen2-vl-2b,qwen2.5-vl-7b,qwen3-vl-2b,qwen3.5-27b",
                   help="presets for the families section")
    p.add_argument("--depth", type=int, default=2, help="tower depth when not --full")
    p.add_argument("--full", action="store_true", help="full-depth tower")
    p.add_argument("--sections", type=sections, default=DEFAULT_SECTIONS,
                   help=f"comma list of: {', '.join(SECTIONS)}; default {DEFAULT_SECTIONS}")
    p.add_argument("--images", type=int, default=16, help="JPEGs for e2e (16 distinct, the rest repeats)")
    p.add_argument("--data-images", type=int, default=16, help="JPEGs timed in the data section")
    p.add_argument("--decoder-images", type=int, default=256, help="JPEGs timed in the decoders section")
    p.add_argument("--tar-images", type=int, default=64, help="512x384 JPEGs in tars (data; e2e on GPU; 0 = none)")
    p.add_argument("--naive-images", type=int, default=256, help="JPEGs timed for the in-process naive loop")
    p.add_argument("--process-repeats", type=int, default=3, help="CPU e2e: alternating runs of each, median")
    p.add_argument("--plan-paths", type=int, default=10_000_000)
    p.add_argument("--rss-images", type=int, default=200)
    p.add_argument("--read-pooled", type=int, default=100_000, help="reads: images of the pooled store")
    p.add_argument("--read-tokens", type=int, default=10_000, help="reads: images of the token store")
    p.add_argument("--index-keys", type=int, default=1_000_000, help="index: keys of the store opened")
    p.add_argument("--token-budget", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=256, help="e2e (GPU): images per shard")
    p.add_argument("--jpeg-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(800, 600))
    p.add_argument("--max-pixels", type=int, default=16777216)
    p.add_argument("--naive-batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--attention", default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--ray-images", type=int, default=64, help="ray: JPEGs through both engines")
    p.add_argument("--ray-model", default="small", help="ray: the preset both engines run")
    p.add_argument("--ray-repeats", type=int, default=2, help="ray: alternating runs of each engine, median")
    p.add_argument("--ray-jpeg-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(512, 384))
    p.add_argument("--loop-images", type=int, default=3072, help="loop: JPEGs of the whole-process comparison")
    p.add_argument("--loop-workers", type=int, default=12, help="loop: the DataLoader loop's workers")
    p.add_argument("--s3-url", default=None, help="s3: a bucket prefix to write into [default: moto on loopback]")
    p.add_argument("--s3-shards", type=int, default=6, help="s3: shards committed")
    p.add_argument("--s3-shard-mb", type=float, default=96.0, help="s3: MB per shard (multipart above 64 MiB)")
    p.add_argument("--video-clips", type=int, default=4, help="video: h264 clips encoded for the section")
    p.add_argument("--video-frames", type=int, default=120, help="video: frames per clip (24 fps)")
    p.add_argument("--video-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(640, 360))
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..environment import cpu_description
    from .cpu_bf16 import cpu_features

    args = parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"# torch {torch.__version__}, device {device}{gpu}, CPU {cpu_description()} "
          f"[{cpu_features()}], threads {torch.get_num_threads()}", flush=True)
    args.peak_flops = None
    if args.sections & {"machine", "encoder", "encoder-full", "families", "attention"}:
        rates = matmul_rates(device, dtype)
        args.peak_flops = max(rates.values())
        row("machine", f"measured {str(dtype).removeprefix('torch.')} matmul rate (MFU uses the best)",
            **{f"{name}_tflops": rate / 1e12 for name, rate in rates.items()})
    reference = have_transformers()
    if not reference:
        print("# transformers is not installed: the reference comparisons (encoder, families, e2e) are skipped",
              flush=True)
    from . import attention, cpu_bf16, data, decoders, e2e, encoder, objstore, ray, startup, store, train
    from .common import JSON_PATH

    if args.json:
        JSON_PATH[:] = [Path(args.json)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if reference:
            encoder.run(args, device, dtype)
        if "data" in args.sections:
            data.run(args, device, tmp_path)
        if "decoders" in args.sections:
            decoders.run(args, device, tmp_path)
        if "attention" in args.sections and device.type == "cuda":
            attention.run(args, device, dtype)
        if args.sections & {"e2e", "loop"} and reference:
            e2e.run(args, device, dtype, tmp_path / "jpegs", tmp_path)
        if "startup" in args.sections:  # (reuses the loop's checkpoint folder when there is one)
            startup.run(args, device, dtype, tmp_path)
        if "bf16" in args.sections and device.type == "cpu":
            cpu_bf16.run(args, tmp_path)
        if "train" in args.sections and reference:
            train.run(args, tmp_path)
        store.run(args, device, tmp_path)
        if "s3" in args.sections:
            objstore.run(args, tmp_path)
        if "ray" in args.sections:
            ray.run(args, device, tmp_path)
        if "video" in args.sections and reference:
            from . import video

            video.run(args, device, dtype, tmp_path)
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=2))
    return 0

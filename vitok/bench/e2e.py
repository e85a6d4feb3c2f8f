"""End to end: ``vitok extract`` against the loop a user writes without vitok (the reference image processor and
model, a batch at a time). On a CPU both run as whole processes, start to finish; on a GPU the two run loops are
timed in one process, beside the encoder alone (the ceiling) and the decode workers alone (the other ceiling)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..pipeline.batcher import default_budget
from .common import make_jpegs, make_tars, row, sync, timeit
from .data import decode_rate
from .encoder import reference_and_vitok, shallow

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


DATALOADER_LOOP = """
import json, sys, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

checkpoint, folder, batch, device, dtype, workers = sys.argv[1:7]
batch, dtype, workers = int(batch), getattr(torch, dtype), int(workers)
started = time.perf_counter()
model = Qwen3VLVisionModel.from_pretrained(checkpoint, attn_implementation="sdpa").to(device, dtype).eval()
processor = AutoImageProcessor.from_pretrained(checkpoint)
paths = sorted(Path(folder).glob("*.jpg"))


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)

    def __getitem__(self, i):
        return Image.open(paths[i]).convert("RGB")


def collate(images):
    inputs = processor(images=images, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_grid_thw"]


loader = torch.utils.data.DataLoader(Images(), batch_size=batch, num_workers=workers, pin_memory=True,
                                     collate_fn=collate)
tokens, first, steady_from, count = [], None, None, 0
with torch.inference_mode():
    for pixel_values, grid in loader:
        out = model(pixel_values.to(device, dtype, non_blocking=True), grid.to(device))
        tokens.extend(out.pooler_output.float().cpu().split((grid.prod(-1) // 4).tolist()))
        count += len(grid)
        if first is None:
            first, steady_from = time.perf_counter() - started, time.perf_counter()
            count = 0
end = time.perf_counter()
print(json.dumps({"first_batch_s": first, "steady_img_s": count / max(end - steady_from, 1e-9),
                  "loop_s": end - started, "images": len(tokens)}))
"""


def loop_baseline(args, device, dtype, tmp: Path) -> None:
    """Whole processes over ``--loop-images`` JPEGs: vitok exact, vitok --decode gpu (CUDA) and the DataLoader loop
    a competent user writes (transformers' tower in SDPA, the auto image processor in a DataLoader with
    ``--loop-workers`` workers, batches of ``--naive-batch``, pinned memory, merged tokens kept on the host)."""
    import json

    config, _, _, _, checkpoint = checkpoint_pair(args, device, dtype, tmp)
    folder = tmp / "loop-jpegs"
    make_jpegs(folder, args.loop_images, args.jpeg_size)
    dtype_name = str(dtype).removeprefix("torch.")
    cmd = [sys.executable, "-c", DATALOADER_LOOP, str(checkpoint), str(folder), str(args.naive_batch), str(device),
           dtype_name, str(args.loop_workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    loop_wall = time.perf_counter() - start
    loop = json.loads(done.stdout.strip().splitlines()[-1])
    decodes = ["exact", "gpu"] if device.type == "cuda" else ["exact"]
    for decode in decodes:
        cli = [sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp / f"loop-vitok-{decode}"),
               "--model", str(checkpoint), "--device", str(device), "--dtype", dtype_name, "--features", "merged",
               "--quiet", "--overwrite", "--json", "--max-pixels", str(args.max_pixels), "--decode", decode] + (
            ["--workers", str(args.workers)] if args.workers is not None else [])
        start = time.perf_counter()
        done = subprocess.run(cli, check=True, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - start
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        phases, stages = summary["phases"], summary["stages"]
        startup = phases.get("imports", 0.0) + phases.get("first_batch_done", 0.0)
        steady = summary["stages"]["images"] / stages["seconds"] if stages["seconds"] else 0.0
        projected = {n: ((loop["first_batch_s"] + n / loop["steady_img_s"]) / (startup + n / steady))
                     if steady and loop["steady_img_s"] else None for n in (20_000,)}
        row("e2e", f"whole processes, {args.loop_images} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]}, max_pixels "
            f"{args.max_pixels}, {args.preset} depth {config.depth}: vitok --decode {decode} vs the DataLoader loop "
            f"({args.loop_workers} workers, batch {args.naive_batch})", loop_s=loop_wall, vitok_s=wall,
            ratio=loop_wall / wall, loop_first_batch_s=loop["first_batch_s"], loop_steady_img_s=loop["steady_img_s"],
            vitok_first_batch_s=startup, vitok_steady_img_s=steady, decode_busy=stages["decode_busy"],
            encoder_busy=stages["encoder_busy"], projected_ratio_20000=projected[20_000],
            bottleneck=summary["bottleneck"])


def checkpoint_pair(args, device, dtype, tmp: Path):
    """Reference + vitok with the same random weights, and a checkpoint folder both load."""
    from transformers import Qwen2VLImageProcessor

    config = shallow(args.preset, None if args.full else args.depth)
    config = type(config).from_dict({**config.to_dict(), "deepstack_visual_indexes": []})
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
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
    return time.perf_counter() - start


def whole_processes(args, device, dtype, folder: Path, tmp: Path) -> None:
    """What a user waits for (imports, model load, decode, encode, write), median of alternating runs."""
    config, _, _, _, checkpoint = checkpoint_pair(args, device, dtype, tmp)
    paths = make_jpegs(folder, args.images, args.jpeg_size)
    dtype_name = str(dtype).removeprefix("torch.")
    naive = [sys.executable, "-c", NAIVE_LOOP, str(checkpoint), str(folder), str(args.naive_batch), str(device),
             dtype_name, str(tmp / "naive.npy")]
    vitok_cli = [sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(tmp / "vitok-out"), "--model",
                 str(checkpoint), "--device", str(device), "--dtype", dtype_name, "--features", "merged", "--quiet",
                 "--overwrite"] + (["--workers", str(args.workers)] if args.workers is not None else [])
    naive_s, vitok_s = [], []
    for _ in range(args.process_repeats):  # alternating, so a noisy neighbour hurts both alike
        naive_s.append(_wall(naive))
        vitok_s.append(_wall(vitok_cli))
    n, v = statistics.median(naive_s), statistics.median(vitok_s)
    row("e2e", f"whole processes: {len(paths)} JPEGs {args.jpeg_size[0]}x{args.jpeg_size[1]}, {args.preset} depth "
        f"{config.depth}, median of {args.process_repeats}", naive_s=n, vitok_s=v, ratio=n / v,
        naive_runs=" ".join(f"{s:.1f}" for s in naive_s), vitok_runs=" ".join(f"{s:.1f}" for s in vitok_s))


def in_process(args, device, dtype, folder: Path, tmp: Path) -> None:
    """Steady-state throughput of the run loop (model loaded), against the encoder alone on the same image size."""
    from PIL import Image

    import vitok

    from ..inputs.preprocess import Preprocessor
    from ..inputs.preprocess_config import PreprocessConfig

    config, reference, model, processor, checkpoint = checkpoint_pair(args, device, dtype, tmp)
    paths = make_jpegs(folder, args.images, args.jpeg_size)
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
    reference.to("meta")  # free its memory for the runs below

    grid = Preprocessor(PreprocessConfig(max_pixels=args.max_pixels)).load(paths[0]).grid_thw
    budget = args.token_budget or default_budget(device.type)
    per_batch = max(1, budget // (grid[0] * grid[1] * grid[2]))
    pixels = torch.randn(per_batch * grid[0] * grid[1] * grid[2], config.patch_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = timeit(lambda: model(pixels, [grid] * per_batch, features=("merged",)), device, args.warmup,
                         args.iters)
    encoder_img_s = per_batch / seconds
    model.to("meta")

    options = dict(model=str(checkpoint), device=str(device), dtype=str(dtype).removeprefix("torch."),
                   features=["merged"], workers=args.workers, token_budget=args.token_budget,
                   shard_size=args.shard_size)
    vitok.extract([str(p) for p in paths[: 2 * per_batch]], tmp / "warm", **options)  # kernels, allocator
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    cases = [("exact decode", folder, False, "files"), ("--fast-decode", folder, True, "files")]
    if args.tar_images:
        make_tars(tmp / "tars", args.tar_images, (512, 384))
        cases.append(("tars of 512x384 JPEGs, exact", tmp / "tars", False, "wds"))
    for label, source, fast, kind in cases:
        inputs = sorted(source.glob("*.jpg" if kind == "files" else "*.tar"))
        supply = decode_rate(inputs, kind, workers, args.max_pixels, fast)
        summary = vitok.extract([str(source)], tmp / f"out-{label}", fast_decode=fast, **options)
        vitok_img_s = summary.ok / summary.seconds
        row("e2e", f"{label}: {summary.ok} images, {args.preset} depth {config.depth}", naive_img_s=naive_img_s,
            vitok_img_s=vitok_img_s, ratio=vitok_img_s / naive_img_s, encoder_only_img_s=encoder_img_s,
            share_of_encoder_only=vitok_img_s / encoder_img_s, loader_alone_img_s=supply,
            data_wait_share=summary.data_wait_seconds / summary.seconds,
            device_wait_share=summary.device_wait_seconds / summary.seconds, seconds=summary.seconds,
            workers=workers)


def run(args, device, dtype, folder: Path, tmp: Path) -> None:
    if "loop" in args.sections:
        loop_baseline(args, device, dtype, tmp)
        if "e2e" not in args.sections:
            return
    if device.type == "cpu":
        whole_processes(args, device, dtype, folder, tmp)
    else:
        in_process(args, device, dtype, folder, tmp)

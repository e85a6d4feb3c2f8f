"""Start-up: time to the first batch of ``vitok extract`` as whole processes, with its phases (from the run's own
``--json`` summary, run.run_stats). Warm machine: one run first (page cache, kernel-choice cache, Triton cache),
then the median of ``--process-repeats`` runs.

    CPU   the tiny model over 8 small JPEGs (target: first batch back <= 2 s after the process started)
    CUDA  the full 2B tower from a checkpoint folder (random weights, bf16; target <= weights read + 3 s)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import make_jpegs, row

PHASES = ("imports", "torch_import", "plan", "weights_read", "weights_on_device", "weights_hash_wait", "workers_ready",
          "warm_up", "first_batch_ready", "first_batch_done")


def checkpoint_folder(preset: str, folder: Path, dtype) -> Path:
    """A preset's tower with seeded random weights written as a safetensors checkpoint vitok loads by path."""
    from ..encoder.checkpoint import save_tower
    from ..encoder.inference import load_encoder

    if not (folder / "model.safetensors").exists():
        encoder = load_encoder(preset, "cpu", dtype)
        folder.mkdir(parents=True, exist_ok=True)
        save_tower(encoder.model, folder / "model.safetensors", encoder.config)
    return folder / "model.safetensors"


def one_run(model: str, folder: Path, out: Path, device: str, dtype: str, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "vitok", "extract", str(folder), "-o", str(out), "--model", model, "--device",
           device, "--dtype", dtype, "--overwrite", "--quiet", "--json", "--features", "merged"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["wall"] = wall
    return summary


def run(args, device, dtype, tmp: Path) -> None:
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        shared = tmp / "checkpoint"  # the loop section's (transformers layout, float32), when it ran
        model = str(shared if (shared / "config.json").exists() else
                    checkpoint_folder(args.preset, tmp / "startup-checkpoint", dtype))
        label, target_extra = f"{args.preset} (checkpoint {Path(model).name})", 3.0
        images = make_jpegs(tmp / "startup-jpegs", 64, args.jpeg_size)
    else:
        model, label, target_extra = "qwen3-vl-tiny", "qwen3-vl-tiny", None
        images = make_jpegs(tmp / "startup-jpegs", 8, (320, 240))
    folder = images[0].parent
    one_run(model, folder, tmp / "startup-out", str(device), dtype_name, args.workers)  # warm the machine
    runs = [one_run(model, folder, tmp / "startup-out", str(device), dtype_name, args.workers)
            for _ in range(max(1, args.process_repeats))]
    phases = {name: statistics.median(r["phases"].get(name, 0.0) for r in runs) for name in PHASES}
    first_batch = statistics.median(r["phases"].get("imports", 0.0) + r["phases"]["first_batch_done"] for r in runs)
    target = 2.0 if target_extra is None else phases["weights_read"] + target_extra
    row("startup", f"time to first batch, {label} on {device}, median of {len(runs)} warm runs",
        first_batch_s=first_batch, target_s=target, met=first_batch <= target,
        whole_process_s=statistics.median(r["wall"] for r in runs), **{f"{k}_s": v for k, v in phases.items()},
        bottleneck=runs[-1]["bottleneck"].split(":")[0])

"""The ``ray`` section: ``--engine ray`` on a local Ray instance against the local engine, on the same machine.

CPU: the same JPEGs and settings through both engines, whole runs (model loading included; Ray's own start-up and
its first job, which starts the worker processes, are paid once per cluster and reported apart): the ratio is the
engine's overhead. CUDA: the decode rate the GPU's own node
gives, then with a second, CPU-only Ray node on the same machine (half the cores each), which is what adding
CPU-only nodes to a cluster does for a decode-bound job.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from .common import make_jpegs, row


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _timed_extract(folder: Path, out: Path, **options) -> tuple[float, int]:
    import vitok

    start = time.perf_counter()
    summary = vitok.extract([str(folder)], out, overwrite=True, **options)
    return time.perf_counter() - start, summary.ok


def run(args, device, tmp: Path) -> None:
    try:
        import ray
    except ImportError:
        print("# ray is not installed (pip install 'ray[data]'): the ray section is skipped", flush=True)
        return
    folder = tmp / "ray-jpegs"
    make_jpegs(folder, args.ray_images, args.ray_jpeg_size)
    cores = _cores()
    options = dict(model=args.ray_model, device="cuda" if device.type == "cuda" else "cpu", features=None,
                   shard_size=max(1, args.ray_images // max(2, cores)), store_dtype="float16")
    if args.token_budget:
        options["token_budget"] = args.token_budget
    if device.type == "cuda":
        _gpu(args, folder, tmp, options, cores)
        return
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    startup = time.perf_counter() - start
    runs: dict[str, list[float]] = {"local": [], "local_1_worker": [], "ray": []}
    try:
        # the cluster's first job starts its worker processes (imports included): paid once per cluster, as init is
        cold, _ = _timed_extract(folder, tmp / "ray-cold", engine="ray", **options)
        for _ in range(args.ray_repeats):  # alternating, so a noisy neighbour hurts all alike
            for name, extra in (("local", {}), ("local_1_worker", {"workers": 1}), ("ray", {"engine": "ray"})):
                seconds, ok = _timed_extract(folder, tmp / f"ray-{name}", **options, **extra)
                assert ok == args.ray_images, (name, ok)
                runs[name].append(seconds)
    finally:
        ray.shutdown()
    median = {name: statistics.median(values) for name, values in runs.items()}
    row("ray", f"{args.ray_images} JPEGs {args.ray_jpeg_size[0]}x{args.ray_jpeg_size[1]}, {args.ray_model} on CPU, "
        f"{cores} cores; whole runs (model load included), median of {args.ray_repeats}",
        **{f"{name}_img_s": args.ray_images / seconds for name, seconds in median.items()},
        ratio=median["local"] / median["ray"], ratio_1_worker=median["local_1_worker"] / median["ray"],
        ray_init_s=startup, ray_first_job_s=cold,
        **{f"{name}_runs": " ".join(f"{v:.1f}" for v in values) for name, values in runs.items()})


def _gpu(args, folder: Path, tmp: Path, options: dict, cores: int) -> None:
    """The GPU node alone (half the cores), then with a CPU-only node holding the other half."""
    from ray.cluster_utils import Cluster

    half = max(1, cores // 2)
    rates = {}
    for extra in (0, half):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": half, "num_gpus": 1,
                                                                "include_dashboard": False})
        if extra:
            cluster.add_node(num_cpus=extra, num_gpus=0)
        import ray

        ray.init(address=cluster.address)
        try:
            seconds, ok = _timed_extract(folder, tmp / f"ray-gpu-{extra}", engine="ray",
                                         **{**options, "device": "auto"})
        finally:
            ray.shutdown()
            cluster.shutdown()
        rates[extra] = ok / seconds
    row("ray", f"{args.ray_images} JPEGs {args.ray_jpeg_size[0]}x{args.ray_jpeg_size[1]}, {args.ray_model} on 1 GPU: "
        f"GPU node ({half} CPUs) alone vs with a CPU-only node ({half} CPUs)", gpu_node_img_s=rates[0],
        with_cpu_node_img_s=rates[half], ratio=rates[half] / rates[0])

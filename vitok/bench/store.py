"""The store side: planning millions of paths, memory against the shard size, reading stores back, and (CUDA) the
encoder's peak memory per preset. Each measured in a fresh process where memory is the figure."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from .common import row

# Peak memory from VmHWM: ru_maxrss keeps the parent's peak across fork + exec, so a child started by a big
# benchmark process would report the parent's size.
PEAK_MB = """
def peak_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
"""

PLAN_SCRIPT = PEAK_MB + """
import sys, time
from vitok.storage.plan import load_plan
from vitok.cli.app import main
listing, out = sys.argv[1:3]
start = time.perf_counter()
sys.argv = ["vitok", "plan", "--files-from", listing, "-o", out, "--shard-size", "1000"]
try:
    main()
except SystemExit:
    pass
planned = time.perf_counter() - start
start = time.perf_counter()
plan = load_plan(out)
mine = [u for u in plan.units if u.index % 64 == 5]
first = mine[0].files()
started = time.perf_counter() - start
print(planned, started, len(plan.units), len(mine), peak_mb())
"""

RSS_SCRIPT = PEAK_MB + """
import sys
import vitok
vitok.extract([sys.argv[1]], sys.argv[2], model=sys.argv[3], workers=0, features=["patch"], store_dtype="float16",
              shard_size=int(sys.argv[4]), min_pixels=2048 * 256, max_pixels=2048 * 256)
print(peak_mb())
"""


def _python(script: str, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False,
                            env=dict(os.environ))
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return result.stdout.splitlines()[-1].split()  # the script's own line, after what vitok printed


def plan_scale(args, tmp: Path) -> None:
    """``vitok plan`` over N listed paths (10M by default), then what part 5 of 64 reads to start."""
    count = args.plan_paths
    paths = [f"/data/laion/part-{i // 100_000:05d}/{i:09d}.jpg" for i in range(count)]
    random.Random(0).shuffle(paths)
    (tmp / "list.txt").write_text("\n".join(paths) + "\n")
    del paths
    planned, started, units, mine, rss = _python(PLAN_SCRIPT, str(tmp / "list.txt"), str(tmp / "planned"))
    row("plan", f"vitok plan --files-from: {count} paths, shards of 1000", seconds=float(planned),
        peak_rss_mb=int(rss), units=int(units))
    row("plan", "part 5 of 64 starting: load the plan, find its units, read its first unit",
        seconds=float(started), units_of_part=int(mine))


def rss_vs_shard_size(args, tmp: Path) -> None:
    """Peak memory of the same run with small and large shards (rows stream to disk as batches finish)."""
    from ..encoder.checkpoint import save_tower
    from ..encoder.config import EncoderConfig
    from ..encoder.model import VisionEncoder, init_random_weights
    from .common import make_jpegs

    config = EncoderConfig(name="wide", hidden_size=1024, depth=1, num_heads=16, intermediate_size=1024,
                           out_hidden_size=256, num_position_embeddings=2304)
    model = VisionEncoder(config)
    init_random_weights(model)
    save_tower(model, tmp / "wide.safetensors", config)
    make_jpegs(tmp / "rss-imgs", args.rss_images, (64, 48))  # each upscaled to 2048 patches
    peaks = {}
    for size in (10, args.rss_images):
        start = time.perf_counter()
        peaks[size] = int(_python(RSS_SCRIPT, str(tmp / "rss-imgs"), str(tmp / f"rss-{size}"),
                                  str(tmp / "wide.safetensors"), str(size))[-1])
        shard_mb = sum(p.stat().st_size for p in (tmp / f"rss-{size}" / "shards").glob("*.h5")) / 2**20
        row("memory", f"patch tokens of {args.rss_images} images x 2048 rows x 1024 (float16), shards of {size}",
            peak_rss_mb=peaks[size], largest_shard_mb=shard_mb / max(1, args.rss_images // size),
            seconds=time.perf_counter() - start)


def device_memory(device) -> None:
    import torch
    from PIL import Image

    from ..encoder.inference import load_encoder
    from ..inputs.preprocess import Preprocessor
    from .common import sync

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


INDEX_SCRIPT = PEAK_MB + """
import random, sys, time
import vitok.storage.store
out = sys.argv[1]
start = time.perf_counter()
store = vitok.storage.store.open_store(out)
opened = time.perf_counter() - start
keys = [f"img{i:08d}" for i in random.Random(0).sample(range(len(store)), min(20000, len(store)))]
start = time.perf_counter()
for key in keys:
    store[key]
lookup = (time.perf_counter() - start) / len(keys)
print(opened, lookup, len(store), "torch" in sys.modules, peak_mb())
"""


def index_scale(args, tmp: Path) -> None:
    """A million-key store (pooled, 16 dims: the open does not depend on the width): the first open builds its key
    index from the sidecars, later opens map it; random keys read through it. Each in a fresh process."""
    out = tmp / "index-scale"
    start = time.perf_counter()
    synthetic_store(out, args.index_keys, 1, 16, "hdf5")
    written = time.perf_counter() - start
    first = _python(INDEX_SCRIPT, str(out))
    again = _python(INDEX_SCRIPT, str(out))
    row("index", f"open a store of {int(again[2])} keys: first (builds the index from the sidecars)",
        seconds=float(first[0]), write_store_s=written)
    row("index", f"open a store of {int(again[2])} keys: cached index", seconds=float(again[0]),
        lookup_us=float(again[1]) * 1e6, torch_imported=again[3], peak_rss_mb=int(again[4]))


def run(args, device, tmp: Path) -> None:
    if "plan" in args.sections:
        plan_scale(args, tmp)
    if "rss" in args.sections:
        rss_vs_shard_size(args, tmp)
    if "memory" in args.sections and device.type == "cuda":
        device_memory(device)
    if "reads" in args.sections:
        bulk_reads(args, tmp)
    if "index" in args.sections:
        index_scale(args, tmp)


def synthetic_store(out: Path, images: int, rows: int, dim: int, fmt: str = "hdf5", per_shard: int = 1000,
                    store_dtype: str = "float16") -> None:
    """A store of random tokens written through the real sink (no encoder): for timing reads."""
    import time as clock

    import numpy as np

    from ..pipeline.sink import ShardSink
    from ..pipeline.types import EncodedBatch
    from ..storage import META_FILE, RunHeader, create_exclusive, get_format
    from ..storage.format import FeatureLayout
    from ..storage.layout import shard_name
    from ..storage.records import ImageRecord, ModelSettings, Settings, dumps
    from ..version import __version__

    settings = Settings(ModelSettings("synthetic", weights="none", config={"spatial_merge_size": 2}),
                        features=("merged",), pool="mean" if rows == 1 else "none", store_dtype=store_dtype,
                        format=fmt, token_order={"merged": "raster"})
    create_exclusive(out / META_FILE, dumps(RunHeader(settings, __version__, clock.strftime("%F")).to_json()))
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, images, per_shard)):
        count = min(per_shard, images - start)
        sink = ShardSink(out, get_format(fmt), shard_name(shard), {"merged": FeatureLayout(dim)}, store_dtype,
                         None, "bench")
        records = [ImageRecord(f"img{start + i:08d}", "ok", "synthetic", grid=[1, 2, 2 * rows])
                   for i in range(count)]
        tokens = rng.standard_normal((count * rows, dim), dtype=np.float32).astype(store_dtype)
        sink.add_batch(EncodedBatch(shard, records, {"merged": tokens}, {"merged": [rows] * count}))
        sink.commit(fingerprint=RunHeader(settings, "", "").fingerprint)


def bulk_reads(args, tmp: Path) -> None:
    """Reading a store back key by key against whole shards at a time; key by key through the key index
    (``vitok.storage.index``, the default) and through the sidecars and the format's reader (``index=False``)."""
    import vitok

    for label, images, rows in (("pooled", args.read_pooled, 1), ("tokens", args.read_tokens, 64)):
        for fmt in ("hdf5", "npy"):
            out = tmp / f"reads-{label}-{fmt}"
            synthetic_store(out, images, rows, 1024, fmt)
            keys = vitok.open(out).keys()
            random.Random(0).shuffle(keys)
            for index in (False, True):
                store = vitok.open(out, index=index)
                start = time.perf_counter()
                for key in keys:
                    store[key]
                seconds = time.perf_counter() - start
                store.close()
                row("reads", f"{images} images x {rows} rows x 1024 float16 ({label}, {fmt}): random keys, "
                    f"{'key index' if index else 'no index (sidecars + format reader)'}",
                    seconds=seconds, us_per_key=seconds / images * 1e6)
            store = vitok.open(out)
            start = time.perf_counter()
            for key in store.keys():
                store[key]
            by_key = time.perf_counter() - start
            start = time.perf_counter()
            if rows == 1:
                store.array()
            else:
                for _ in store.iter_shards():
                    pass
            bulk = time.perf_counter() - start
            store.close()
            row("reads", f"{images} images x {rows} rows x 1024 float16 ({label}, {fmt}): key by key vs bulk",
                by_key_s=by_key, bulk_s=bulk, ratio=by_key / bulk, bulk_images_per_s=images / bulk)

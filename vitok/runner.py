"""The runner: sources -> plan -> DataLoader (decode/preprocess in workers) -> token-budget batches -> encoder
-> pool -> shard writer (background thread) -> manifest. ``vitok extract`` is a thin layer over :func:`extract`.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import ImageError, UsageError, VitokError
from .manifest import (
    META_FILE,
    PLAN_FILE,
    SHARDS_DIR,
    Plan,
    iter_sidecars,
    read_plan,
    write_or_check_meta,
    write_or_check_plan,
)
from .parallel import Part, detect_part, device_for
from .pool import check_pool, pool_tokens
from .preprocess import PreparedImage, Preprocessor
from .runtime import Encoder, load_encoder
from .sources import list_sources
from .store import check_shard
from .writer import STORE_DTYPES, ShardWriter, stored_to_numpy, to_store_array, to_store_tensor

logger = logging.getLogger(__name__)

FORMATS = ("hdf5", "npy")
LOADER_CHUNK = 8  # images per DataLoader message


@dataclass
class ExtractOptions:
    """Everything ``vitok extract`` can be told; the CLI maps its flags one to one onto these fields."""

    model: str = "base"  # preset name, checkpoint folder, .safetensors file or HF repo id
    device: str = "auto"
    dtype: str = "auto"  # compute dtype: auto | float32 | bfloat16 | float16
    features: Sequence[str] | None = None  # default: merged for Qwen towers, patch for the ViT presets
    pool: str = "none"
    store_dtype: str = "float16"
    format: str = "hdf5"
    shard_size: int = 1000
    compression: str | None = None  # hdf5 only: gzip | lzf
    token_budget: int | None = None  # patches per encoder batch; default 4096 on CPU, 32768 on CUDA
    workers: int | None = None  # DataLoader workers; default from the CPU count
    token_order: str = "block"  # patch rows: block (reference) | raster
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_size: int | None = None
    backend: str | None = None  # torchvision | pil
    fast_decode: bool = False
    allow_truncated: bool = False
    max_image_pixels: int | None = None
    overwrite: bool = False
    part: int | None = None
    num_parts: int | None = None
    files_from: str | None = None
    seed: int = 0
    attention: str = "auto"
    progress: Callable[[ProgressEvent], None] | None = None


@dataclass
class ProgressEvent:
    images_done: int
    images_total: int
    tokens_done: int
    skipped: int
    elapsed: float


@dataclass
class ExtractSummary:
    out: str
    images_planned: int  # in this process's part
    ok: int
    skipped: int
    already_done: int  # images in shards a previous run completed
    shards_written: int
    shards_already_done: int
    seconds: float
    images_per_second: float
    tokens: int
    output_bytes: int
    data_wait_seconds: float  # time the loop waited for decoded images
    encode_seconds: float  # time the loop spent launching batches and finishing them (device waits included)
    device_wait_seconds: float  # of which: waiting for the device to finish a batch (the device was the bottleneck)
    part: str = "0/1"
    skipped_reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skipped_reasons"}


class _Images(torch.utils.data.Dataset):
    """Plan items -> (plan index, PreparedImage or None, skip reason or None). Never raises."""

    def __init__(self, items: list[tuple[int, str]], preprocessor: Preprocessor) -> None:
        self.items, self.preprocessor = items, preprocessor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        index, path = self.items[position]
        try:
            return index, self.preprocessor.load(path), None
        except ImageError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a bug or an exotic decoder failure must cost one image, not the run
            return index, None, f"internal error while decoding: {type(exc).__name__}: {exc}"


@dataclass
class _Chunk:
    """Consecutive plan items decoded by one worker, their patches in one tensor: one message and one pinned copy
    per chunk instead of per image, which keeps the loop that feeds the GPU short."""

    indices: list[int]
    reasons: list[str | None]
    images: list[PreparedImage | None]
    rows: list[int]  # patch rows of each decoded image, in order
    patches: torch.Tensor | None  # all images' patches, concatenated

    @classmethod
    def collate(cls, items: list[tuple[int, PreparedImage | None, str | None]]) -> _Chunk:
        images = [image for _, image, _ in items]
        present = [image.patches for image in images if image is not None]
        patches = torch.cat(present) if present else None
        for image in images:
            if image is not None:
                image.patches = None  # sent once, inside ``patches``
        rows = [len(p) for p in present]
        return cls([i for i, _, _ in items], [reason for _, _, reason in items], images, rows, patches)

    def pin_memory(self) -> _Chunk:
        if self.patches is not None:
            self.patches = self.patches.pin_memory()
        return self

    def __iter__(self):
        views = iter(self.patches.split(self.rows) if self.patches is not None else ())
        for index, image, reason in zip(self.indices, self.images, self.reasons):
            if image is not None:
                image.patches = next(views)
            yield index, image, reason


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return max(1, min(4, cpus // 2))  # on a CPU the encoder needs the cores too


def _settings(encoder: Encoder, options: ExtractOptions, features: tuple[str, ...]) -> dict[str, Any]:
    config = encoder.config.to_dict()
    config.pop("name")
    merged_order = "raster over the merged (h/m x w/m) grid"
    order = {"patch": "raster" if options.token_order == "raster" or encoder.config.spatial_merge_size == 1
             else "block2x2 (reference order: (r//2, c//2, r%2, c%2))"}
    order.update({f: merged_order for f in ("merged", "deepstack")})
    return {
        "model": {
            "name": encoder.source.name,
            "weights": encoder.weights_hash,
            "random_weights": encoder.source.random_weights,
            "config": config,
        },
        "preprocess": encoder.preprocess.to_dict(),
        "features": list(features),
        "pool": options.pool,
        "compute_dtype": str(encoder.dtype).removeprefix("torch."),
        "store_dtype": options.store_dtype,
        "token_order": {f: order[f] for f in features},
        "format": options.format,
        "shard_size": options.shard_size,
    }


def _check_options(options: ExtractOptions) -> None:
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r} is not one of: {', '.join(FORMATS)}")
    if options.store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype {options.store_dtype!r} is not one of: {', '.join(STORE_DTYPES)}")
    if options.shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {options.shard_size}")
    if options.token_order not in ("block", "raster"):
        raise UsageError(f"--token-order {options.token_order!r} is not one of: block, raster")
    if options.compression not in (None, "gzip", "lzf"):
        raise UsageError(f"--compression {options.compression!r} is not one of: gzip, lzf")
    if options.compression and options.format != "hdf5":
        raise UsageError("--compression applies to --format hdf5 only")
    check_pool(options.pool)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if overwrite and (out / META_FILE).exists():
        for name in (META_FILE, PLAN_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    elif out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} exists and is not a folder")
    elif out.is_dir() and not (out / META_FILE).exists() and any(
        # another process of the same job may be writing the header right now (hidden temporary files)
        p.name not in (PLAN_FILE, SHARDS_DIR) and not p.name.startswith(".")
        for p in out.iterdir()
    ):
        raise UsageError(f"-o {out} is a non-empty folder that is not a vitok store; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)


def build_plan(sources: Sequence[str], out: Path, options: ExtractOptions, stdin=None) -> Plan:
    """The plan in OUT if there is one (``vitok plan`` wrote it), else list the sources and write it."""
    existing = read_plan(out)
    if existing is not None and not options.overwrite:
        given = [str(s) for s in sources]
        if given and given != ["-"] and existing.sources and given != existing.sources:
            raise UsageError(
                f"{out}/{PLAN_FILE} was planned from {existing.sources}, not {given}; use the same sources, "
                "another -o, or --overwrite"
            )
        if existing.shard_size != options.shard_size:
            raise UsageError(
                f"{out}/{PLAN_FILE} uses shards of {existing.shard_size} images, not {options.shard_size}; "
                f"pass --shard-size {existing.shard_size} to resume"
            )
        return existing
    listing = list_sources(list(sources), options.files_from, stdin)
    if listing.ignored:
        logger.info("ignored %d file(s) without an image extension", listing.ignored)
    plan = Plan([i.key for i in listing.items], [i.path for i in listing.items], options.shard_size,
                [str(s) for s in sources])
    return write_or_check_plan(out, plan)


def extract(
    sources: Sequence[str] | str, out: str | os.PathLike = "vitok-out", stdin=None, **options: Any
) -> ExtractSummary:
    """Extract visual tokens for every image in ``sources`` into the store ``out`` (resumable).

    Args:
        sources: folders, files, or ``-`` for a list of paths on stdin.
        out: output folder (created; resumed if it already holds a store made with the same settings).
        stdin: stream to read ``-`` from (default: ``sys.stdin``).
        **options: fields of :class:`ExtractOptions`.

    Returns:
        counts, timings and sizes of this run.
    """
    unknown = sorted(set(options) - {f.name for f in fields(ExtractOptions)})
    if unknown:
        raise UsageError(f"unknown extract option(s) {unknown}; valid: {[f.name for f in fields(ExtractOptions)]}")
    opts = ExtractOptions(**options)
    _check_options(opts)
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    sources = [str(s) for s in sources]
    out_path = Path(out)
    part = detect_part(opts.part, opts.num_parts)

    encoder = load_encoder(opts.model, device_for(part, opts.device), opts.dtype, seed=opts.seed,
                           attention=opts.attention)
    features = tuple(opts.features) if opts.features else (("merged",) if encoder.config.has_merger else ("patch",))
    features = encoder.model.check_features(features)
    preprocess = encoder.preprocess.replace(
        min_pixels=opts.min_pixels, max_pixels=opts.max_pixels, backend=opts.backend,
        max_image_pixels=opts.max_image_pixels, fast_decode=opts.fast_decode, allow_truncated=opts.allow_truncated,
    )
    if opts.image_size:
        preprocess = preprocess.replace(mode="fixed", image_size=opts.image_size)
    encoder.preprocess = preprocess
    _prepare_out(out_path, opts.overwrite)
    meta = {
        "vitok_version": __version__,
        "schema": 1,
        "settings": _settings(encoder, opts, features),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
    }
    write_or_check_meta(out_path, meta)
    plan = build_plan(sources, out_path, opts, stdin)
    return _Run(encoder, plan, out_path, opts, features, part).run()


@dataclass
class _Launched:
    """A batch whose encoding and copies to the host are queued on the device but maybe not done."""

    batch: list[tuple[int, PreparedImage]]
    writer: ShardWriter
    device: dict[str, torch.Tensor] = field(default_factory=dict)  # tokens on the device (kept for the rare recount)
    rows: dict[str, list[int]] = field(default_factory=dict)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # stored dtype, pinned host memory on CUDA
    overflow: dict[str, torch.Tensor] = field(default_factory=dict)  # float16 overflow counts, host
    copied: torch.cuda.Event | None = None


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def pipeline_depth(device: torch.device) -> int:
    """Batches kept queued on the device before the oldest is finished on the host."""
    return 2 if device.type == "cuda" else 1


class _Run:
    def __init__(self, encoder: Encoder, plan: Plan, out: Path, opts: ExtractOptions, features, part: Part) -> None:
        self.encoder, self.plan, self.out, self.opts = encoder, plan, out, opts
        self.features, self.part = features, part
        self.budget = opts.token_budget or (32768 if encoder.device.type == "cuda" else 4096)
        self.ok = self.skipped = self.tokens = 0
        self.skipped_reasons: dict[str, str] = {}
        self.encode_seconds = self.wait_seconds = self.device_wait_seconds = 0.0
        self._commits: queue.Queue = queue.Queue(maxsize=2)
        # Batches queued on the device and not yet finished: two on a GPU, so the host's hiccups (a slow image, a
        # shard boundary) do not leave it idle; on a CPU encoding is synchronous anyway.
        self._in_flight: collections.deque[_Launched] = collections.deque()
        self._depth = pipeline_depth(encoder.device)
        self._closing: list[ShardWriter] = []  # shards complete in the plan, waiting for their batches to finish
        self._commit_error: BaseException | None = None
        self.output_bytes = 0
        self.shards_written = 0

    # ---- shard bookkeeping ----------------------------------------------------------------------------------

    def _done_shards(self, wanted: set[str]) -> set[str]:
        """The wanted shards whose sidecar and data check out (other parts' shards are not opened)."""
        done = set()
        for shard, sidecar in iter_sidecars(self.out):
            if shard not in wanted:
                continue
            problems = check_shard(self.out, sidecar)
            if problems:
                logger.warning("shard %s will be redone: %s", shard, problems[0])
            else:
                done.add(shard)
        return done

    def _committer(self) -> None:
        while True:
            writer = self._commits.get()
            if writer is None:
                return
            try:
                if self._commit_error is None:
                    part = f"{self.part.index}/{self.part.count}"
                    sidecar = writer.commit({"vitok_version": __version__, "part": part})
                    self.output_bytes += sidecar["bytes"]
                    self.shards_written += 1
            except BaseException as exc:  # surfaced in the main thread
                self._commit_error = exc

    def _submit(self, writer: ShardWriter) -> None:
        """Commit a shard whose images are all seen, as soon as its last batches are off the device."""
        self._closing.append(writer)
        self._submit_closed()

    def _submit_closed(self) -> None:
        while self._closing and not any(launched.writer is self._closing[0] for launched in self._in_flight):
            if self._commit_error is not None:
                raise self._commit_error
            self._commits.put(self._closing.pop(0))

    # ---- encoding -------------------------------------------------------------------------------------------

    def _encode(self, batch: list[tuple[int, PreparedImage]], writer: ShardWriter) -> None:
        """Queue a batch on the device; finish the oldest batch in flight beyond the pipeline depth."""
        batch.sort(key=lambda item: item[1].grid_thw)  # equal grids side by side: one attention call per run
        start = time.perf_counter()
        try:
            launched = self._launch(batch, writer)
        except torch.OutOfMemoryError:
            if self.encoder.device.type == "cuda":
                torch.cuda.empty_cache()
            self._drain()
            if len(batch) == 1:
                index, image = batch[0]
                reason = f"out of memory encoding {image.num_patches} patches"
                writer.skip(self._record(index, image), reason)
                self.skipped += 1
                self.skipped_reasons[self.plan.keys[index]] = reason
                return
            for item in batch:
                self._encode([item], writer)
                self._drain()
            return
        finally:
            self.encode_seconds += time.perf_counter() - start
        self._in_flight.append(launched)
        self.tokens += sum(image.num_patches for _, image in batch)  # queued: progress counts them now
        while len(self._in_flight) > self._depth:
            self._finish_oldest()

    def _drain(self) -> None:
        """Finish every batch in flight (and commit the shards they complete)."""
        while self._in_flight:
            self._finish_oldest()
        self._submit_closed()

    def _finish_oldest(self) -> None:
        """Wait for the oldest batch's copies, hand its arrays to its writer, commit any shard it completes."""
        start = time.perf_counter()
        self._finish(self._in_flight.popleft())
        self.encode_seconds += time.perf_counter() - start
        self._submit_closed()

    def _launch(self, batch: list[tuple[int, PreparedImage]], writer: ShardWriter) -> _Launched:
        """Queue encoder, pooling, store-dtype cast and device-to-host copies; nothing here waits for the device."""
        output = self.encoder.encode([im for _, im in batch], self.features, self.opts.token_order)
        launched = _Launched(batch, writer)
        for feature in self.features:
            # One device-to-host copy per feature for the whole batch; rows are split per image on the host.
            packed, rows = output.features[feature], output.rows[feature]
            if self.opts.pool != "none":
                packed = torch.cat([pool_tokens(t, self.opts.pool) for t in packed.split(rows, dim=-2)], dim=-2)
                rows = [1] * len(rows)
            stored, overflow = to_store_tensor(packed, self.opts.store_dtype)
            launched.device[feature], launched.rows[feature] = packed, rows
            launched.host[feature] = _to_host(stored)
            launched.overflow[feature] = _to_host(overflow)
        if self.encoder.device.type == "cuda":
            launched.copied = torch.cuda.Event()
            launched.copied.record(torch.cuda.current_stream(self.encoder.device))
        return launched

    def _finish(self, launched: _Launched) -> None:
        if launched.copied is not None:
            start = time.perf_counter()
            launched.copied.synchronize()
            self.device_wait_seconds += time.perf_counter() - start
        batch = launched.batch
        arrays: list[dict[str, np.ndarray]] = [{} for _ in batch]
        overflow = [0] * len(batch)
        for feature, host in launched.host.items():
            rows = launched.rows[feature]
            if int(launched.overflow[feature]):  # rare: find out which images overflowed
                for i, tokens in enumerate(launched.device[feature].split(rows, dim=-2)):
                    overflow[i] += to_store_array(tokens, self.opts.store_dtype)[1]
            array = stored_to_numpy(host, self.opts.store_dtype)
            if launched.copied is not None:
                # Out of the pinned staging buffer, so the shard does not hold page-locked memory and the next
                # batch reuses the buffer (a fresh pinned allocation costs more than this copy).
                array = array.copy()
            for item, part in zip(arrays, np.split(array, np.cumsum(rows)[:-1], axis=-2)):
                item[feature] = part
        for (index, image), image_arrays, image_overflow in zip(batch, arrays, overflow):
            record = self._record(index, image)
            if image_overflow:
                record["float16_overflow"] = image_overflow
                logger.warning("%s: %d value(s) exceed float16 range and are stored as inf; use --store-dtype "
                               "bfloat16 or float32", record["key"], image_overflow)
            launched.writer.add(record, image_arrays)
            self.ok += 1

    def _record(self, index: int, image: PreparedImage | None) -> dict[str, Any]:
        record: dict[str, Any] = {"key": self.plan.keys[index], "source": self.plan.paths[index]}
        if image is not None:
            record["grid"] = list(image.grid_thw)
            record["size"] = list(image.original_size)
            if image.notes:
                record["notes"] = image.notes
        return record

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self) -> ExtractSummary:
        started = time.perf_counter()
        mine = [s for s in range(self.plan.num_shards) if self.part.owns(s)]
        done = self._done_shards({self.plan.shard_name(s) for s in mine})
        todo = [s for s in mine if self.plan.shard_name(s) not in done]
        already = sum(len(self.plan.shard_range(s)) for s in mine if s not in todo)
        items = [(i, self.plan.paths[i]) for s in todo for i in self.plan.shard_range(s)]
        total = len(items)
        logger.info("part %d/%d: %d shard(s) to do, %d already done (%d images)", self.part.index, self.part.count,
                    len(todo), len(mine) - len(todo), already)
        committer = threading.Thread(target=self._committer, name="vitok-writer", daemon=True)
        committer.start()
        try:
            if items:
                self._loop(items, total, started)
        finally:
            self._commits.put(None)
            committer.join()
        if self._commit_error is not None:
            raise self._commit_error
        seconds = time.perf_counter() - started
        return ExtractSummary(
            out=str(self.out), images_planned=sum(len(self.plan.shard_range(s)) for s in mine), ok=self.ok,
            skipped=self.skipped, already_done=already, shards_written=self.shards_written,
            shards_already_done=len(mine) - len(todo), seconds=round(seconds, 3),
            images_per_second=round((self.ok + self.skipped) / seconds, 3) if seconds else 0.0, tokens=self.tokens,
            output_bytes=self.output_bytes, data_wait_seconds=round(self.wait_seconds, 3),
            encode_seconds=round(self.encode_seconds, 3), device_wait_seconds=round(self.device_wait_seconds, 3),
            part=f"{self.part.index}/{self.part.count}",
            skipped_reasons=self.skipped_reasons,
        )

    def _loader(self, items):
        workers = self.opts.workers if self.opts.workers is not None else default_workers(self.encoder.device)
        dataset = _Images(items, Preprocessor(self.encoder.preprocess))
        return torch.utils.data.DataLoader(
            dataset, batch_size=LOADER_CHUNK, shuffle=False, num_workers=workers, collate_fn=_Chunk.collate,
            pin_memory=self.encoder.device.type == "cuda", prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )

    def _images(self, items):
        """(plan index, image or None, skip reason) in plan order, timing the waits for the workers."""
        chunks = iter(self._loader(items))
        while True:
            wait = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - wait
            yield from chunk

    def _loop(self, items, total: int, started: float) -> None:
        size = self.plan.shard_size
        writer: ShardWriter | None = None
        batch: list[tuple[int, PreparedImage]] = []
        batch_tokens = 0
        seen = 0
        for index, image, reason in self._images(items):
            shard = index // size
            if writer is None:
                writer = ShardWriter(self.out, self.plan.shard_name(shard), self.opts.format, self.features,
                                     self.opts.store_dtype, self.opts.compression)
            if reason is not None:
                writer.skip(self._record(index, None), reason)
                self.skipped += 1
                self.skipped_reasons[self.plan.keys[index]] = reason
            else:
                if batch and batch_tokens + image.num_patches > self.budget:
                    self._encode(batch, writer)
                    batch, batch_tokens = [], 0
                batch.append((index, image))
                batch_tokens += image.num_patches
            seen += 1
            if index == self.plan.shard_range(shard)[-1]:  # last image of its shard: finish and commit it
                if batch:
                    self._encode(batch, writer)
                    batch, batch_tokens = [], 0
                self._submit(writer)
                writer = None
            if self.opts.progress is not None:
                self.opts.progress(ProgressEvent(seen, total, self.tokens, self.skipped, time.perf_counter() - started))
        self._drain()
        if writer is not None:  # cannot happen with a consistent plan; never drop work silently
            raise VitokError(f"internal error: shard {writer.name} ended early")

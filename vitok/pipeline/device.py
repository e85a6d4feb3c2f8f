"""The device stage: batches of prepared images in, stored-dtype token arrays on the host out.

Launching a batch queues the encoder, pooling, the cast to the stored dtype and the device-to-host copies, without
waiting for the device; up to ``depth`` batches stay queued (two on a GPU, so host hiccups never leave it idle).
Finishing the oldest waits for its copies. A batch that runs out of device memory is retried image by image after
the queue drains; an image that does not fit alone is recorded as skipped.

A video cut in time comes as pieces, each a batch of its own (``Item.part``): each piece is encoded as it comes and
its tokens (before pooling) stay on the device; with the last piece they are joined and go through the same pooling,
cast and copies as a video encoded whole, as one batch with the video's record. The pieces keep the encoder's step
groups (``inputs.video_preprocess.steps_per_piece``), so the tokens are the whole video's bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..encoder.inference import Encoder
from ..storage.records import ImageRecord, UnitInfo
from .cast import (
    count_nonfinite,
    nonfinite_per_row_group,
    overflow_per_row_group,
    stored_to_numpy,
    to_store_tensor,
)
from .pool import pool_packed
from .types import Batch, EncodedBatch, Item, UnitEnd


@dataclass
class _Launched:
    batch: Batch
    device: dict[str, torch.Tensor]  # tokens on the device, before the stored-dtype cast (for the rare recount)
    rows: dict[str, list[int]]
    host: dict[str, torch.Tensor]  # stored dtype, pinned host memory on CUDA
    overflow: dict[str, torch.Tensor]  # float16 overflow count per feature, host
    copied: torch.cuda.Event | None = None
    skipped: list[ImageRecord] = field(default_factory=list)  # could not be decoded on the device
    nonfinite: dict[str, torch.Tensor] = field(default_factory=dict)  # NaN/Inf count per feature, host


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def pipeline_depth(device: torch.device) -> int:
    """Batches kept queued on the device before the oldest is finished on the host."""
    return 2 if device.type == "cuda" else 1


DecodeStep = Callable[[list[Item]], tuple[list[Item], list[ImageRecord]]]


class DevicePipeline:
    def __init__(self, encoder: Encoder, features: tuple[str, ...], pool: str, store_dtype: str,
                 token_order: str = "block", depth: int | None = None, decode: DecodeStep | None = None,
                 pool_steps: bool = False, chunk_rows: int | None = None) -> None:
        """``decode``: a step run on each batch before it is encoded, for images whose decoding was left to the
        device (``inputs.gpu_decode.DeviceDecode``): items in, (items with patches, records of those refused) out.
        ``pool_steps``: pool each temporal step of a video to a row of its own (an image has one step).
        ``chunk_rows``: a video of more patches is encoded a few temporal steps at a time (``Encoder.encode``)."""
        self.encoder, self.features, self.pool, self.decode = encoder, features, pool, decode
        self.pool_steps, self.chunk_rows = pool_steps, chunk_rows
        self.store_dtype, self.token_order = store_dtype, token_order
        self.depth = depth if depth is not None else pipeline_depth(encoder.device)
        self._queue: list[_Launched | UnitEnd] = []  # launched batches and unit ends, in submission order
        self._pieces: dict[tuple[int, str], list[dict[str, torch.Tensor]]] = {}  # (unit, key) -> a video's pieces
        self._dropped: dict[tuple[int, str], str] = {}  # a video whose piece ran out of memory -> why: the rest is
        # ignored, and its last piece's record (the complete one) is recorded skipped
        self._launched = 0  # of which batches
        self.encode_seconds = self.device_wait_seconds = 0.0
        self.patches = 0  # queued so far (progress counts a batch when it is queued)

    def submit(self, batch: Batch) -> list[EncodedBatch | UnitEnd]:
        """Queue a batch; returns what finished to make room, in submission order (batches and unit ends)."""
        if len(batch.items) == 1 and batch.items[0].part is not None:
            return self._submit_piece(batch)
        failed: list[ImageRecord] = []
        if self.decode is not None:
            batch.items, failed = self.decode(batch.items)
        if not batch.items:
            return [EncodedBatch(batch.unit, [], {}, {}, skipped=failed)]
        # equal grids side by side: one attention call per run of them; remember the input order for the sink
        arrival = {id(item): position for position, item in enumerate(batch.items)}
        batch.items.sort(key=lambda item: item.image.grid_thw)
        batch.order = sorted(range(len(batch.items)), key=lambda i: arrival[id(batch.items[i])])
        start = time.perf_counter()
        try:
            launched = self._launch(batch)
        except torch.OutOfMemoryError:
            return self._out_of_memory(batch, failed)
        finally:
            self.encode_seconds += time.perf_counter() - start
        launched.skipped = failed
        self._queue.append(launched)
        self._launched += 1
        self.patches += sum(item.image.num_patches for item in batch.items)
        return self._release(self.depth)

    def _submit_piece(self, batch: Batch) -> list[EncodedBatch | UnitEnd]:
        """Encode one piece of a video cut in time and keep its tokens; with the last, launch the joined video."""
        item = batch.items[0]
        key = (batch.unit, item.record.key)
        if key in self._dropped:
            if not item.last:
                return []
            item.record.status, item.record.reason = "skipped", self._dropped.pop(key)
            return [EncodedBatch(batch.unit, [], {}, {}, skipped=[item.record])]
        start = time.perf_counter()
        try:
            output = self.encoder.encode([item.image], self.features, self.token_order, chunk_rows=self.chunk_rows)
            pieces = self._pieces.setdefault(key, [])
            pieces.append(output.features)
            self.patches += item.image.num_patches
            if not item.last:
                return []
            del self._pieces[key]
            joined = {f: torch.cat([piece[f] for piece in pieces], dim=-2) for f in self.features}
            del pieces
            video_grid = item.image.piece.video_grid
            launched = self._to_store(batch, joined, {f: [int(joined[f].shape[-2])] for f in self.features},
                                      [video_grid])
        except torch.OutOfMemoryError:
            self._pieces.pop(key, None)
            if self.encoder.device.type == "cuda":
                torch.cuda.empty_cache()
            reason = (f"out of memory encoding a piece of {item.image.num_patches} patches of this video (lower "
                      "--video-chunk-patches or --token-budget)")
            if not item.last:  # recorded with the video's last piece, whose record is complete
                self._dropped[key] = reason
                return self.drain()
            item.record.status, item.record.reason = "skipped", reason
            return [*self.drain(), EncodedBatch(batch.unit, [], {}, {}, skipped=[item.record])]
        finally:
            self.encode_seconds += time.perf_counter() - start
        self._queue.append(launched)
        self._launched += 1
        return self._release(self.depth)

    def abandon(self, unit: int, key: str) -> None:
        """A video cut in time whose decoding stopped after some pieces: its pieces' tokens are dropped."""
        self._pieces.pop((unit, key), None)
        self._dropped.pop((unit, key), None)

    def end(self, unit: int, info: UnitInfo) -> list[EncodedBatch | UnitEnd]:
        """The unit has no more batches: its ``UnitEnd`` comes out behind the last of them."""
        self._queue.append(UnitEnd(unit, info))
        return self._release(self.depth)

    def drain(self) -> list[EncodedBatch | UnitEnd]:
        """Finish every batch in flight."""
        return self._release(0)

    def _release(self, keep: int) -> list[EncodedBatch | UnitEnd]:
        """Finish the oldest batches until at most ``keep`` are queued; unit ends leave as soon as they are first."""
        done: list[EncodedBatch | UnitEnd] = []
        while self._queue and (isinstance(self._queue[0], UnitEnd) or self._launched > keep):
            entry = self._queue.pop(0)
            if isinstance(entry, UnitEnd):
                done.append(entry)
            else:
                self._launched -= 1
                done.append(self._finish(entry))
        return done

    def _out_of_memory(self, batch: Batch, failed: list[ImageRecord]) -> list[EncodedBatch | UnitEnd]:
        """Retry a batch that ran out of device memory image by image; the results come back as ONE batch, in the
        input order, as if it had fitted."""
        if self.encoder.device.type == "cuda":
            torch.cuda.empty_cache()
        done = self.drain()
        if len(batch.items) == 1:
            record = batch.items[0].record
            record.status = "skipped"
            record.reason = f"out of memory encoding {batch.items[0].image.num_patches} patches"
            return [*done, EncodedBatch(batch.unit, [], {}, {}, skipped=[*failed, record])]
        arrival = batch.order or list(range(len(batch.items)))  # batch.items[arrival[k]] is the k-th input
        position = {id(batch.items[i]): k for k, i in enumerate(arrival)}
        singles = []
        for item in batch.items:
            singles += self.submit(Batch(batch.unit, [item]))
            singles += self.drain()
        merged = _merge(batch.unit, singles, [position[id(item)] for item in batch.items])
        merged.skipped[:0] = failed
        return [*done, merged]
    def _launch(self, batch: Batch) -> _Launched:
        """Queue encoder, pooling, stored-dtype cast and device-to-host copies; nothing here waits for the device."""
        images = [item.image for item in batch.items]
        output = self.encoder.encode(images, self.features, self.token_order, chunk_rows=self.chunk_rows)
        return self._to_store(batch, output.features, output.rows, [image.grid_thw for image in images])

    def _to_store(self, batch: Batch, features: dict[str, torch.Tensor], feature_rows: dict[str, list[int]],
                  grids: list) -> _Launched:
        """Pooling, stored-dtype cast and device-to-host copies of a batch's tokens (``grids``: its inputs')."""
        launched = _Launched(batch, {}, {}, {}, {})
        steps = [grid[0] if self.pool_steps else 1 for grid in grids]  # pooled rows per input
        for feature in self.features:
            packed, rows = features[feature], feature_rows[feature]
            if self.pool != "none":  # each input's rows are its steps' rows, step after step
                per_step = [n // t for n, t in zip(rows, steps) for _ in range(t)]
                packed, rows = pool_packed(packed, per_step, self.pool), list(steps)
            stored, overflow = to_store_tensor(packed, self.store_dtype)
            launched.device[feature], launched.rows[feature] = packed, rows
            launched.host[feature] = _to_host(stored)
            launched.overflow[feature] = _to_host(overflow)
            launched.nonfinite[feature] = _to_host(count_nonfinite(packed))
        if self.encoder.device.type == "cuda":
            launched.copied = torch.cuda.Event()
            launched.copied.record(torch.cuda.current_stream(self.encoder.device))
        return launched

    def _finish(self, launched: _Launched) -> EncodedBatch:
        start = time.perf_counter()
        if launched.copied is not None:
            wait = time.perf_counter()
            launched.copied.synchronize()
            self.device_wait_seconds += time.perf_counter() - wait
        records = [item.record for item in launched.batch.items]
        arrays = {}
        for feature, host in launched.host.items():
            rows = launched.rows[feature]
            if int(launched.overflow[feature]):  # rare: find out which images overflowed
                for record, count in zip(records, overflow_per_row_group(launched.device[feature], rows)):
                    if count:
                        record.float16_overflow = (record.float16_overflow or 0) + count
            if int(launched.nonfinite[feature]):  # a broken checkpoint or input: say which images hold NaN/Inf
                for record, count in zip(records, nonfinite_per_row_group(launched.device[feature], rows)):
                    if count:
                        record.nonfinite = (record.nonfinite or 0) + count
            array = stored_to_numpy(host, self.store_dtype)
            # Out of the pinned staging buffer, so the shard does not hold page-locked memory.
            arrays[feature] = array.copy() if launched.copied is not None else array
        self.encode_seconds += time.perf_counter() - start
        return EncodedBatch(launched.batch.unit, records, arrays, dict(launched.rows), skipped=launched.skipped,
                            order=launched.batch.order)


def _merge(unit: int, singles: list[EncodedBatch], positions: list[int]) -> EncodedBatch:
    """One batch out of image-by-image results; ``positions`` are the images' input positions, in ``singles`` order."""
    records, arrays, rows, skipped, encoded_positions = [], {}, {}, [], []
    for single, position in zip(singles, positions):
        skipped += single.skipped
        if not single.records:
            continue
        records += single.records
        encoded_positions.append(position)
        for feature, array in single.arrays.items():
            arrays.setdefault(feature, []).append(array)
            rows.setdefault(feature, []).extend(single.rows[feature])
    joined = {feature: np.concatenate(parts, axis=-2) for feature, parts in arrays.items()}
    order = sorted(range(len(records)), key=lambda i: encoded_positions[i])
    return EncodedBatch(unit, records, joined, rows, skipped=skipped, order=order)

"""The shard sink: one output shard being written. Whole batches in (one append per batch and feature, streamed to
the temporary file, so memory does not grow with the shard size), records of skipped and failed inputs, then the
commit (``vitok.storage.shards.commit``) with its sidecar."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import shards
from ..storage.files import is_no_space, raise_store_error, remove
from ..storage.format import FeatureLayout, ShardFormat, row_offsets
from ..storage.records import ImageRecord, Sidecar
from ..storage.roots import StoreRoot, store_root
from .types import EncodedBatch

logger = logging.getLogger(__name__)


class ShardSink:
    def __init__(self, out: Path | StoreRoot, fmt: ShardFormat, shard: str, layouts: dict[str, FeatureLayout],
                 store_dtype: str, compression: str | None, run: str) -> None:
        self.out, self.fmt, self.shard, self.layouts = store_root(out), fmt, shard, layouts
        self.tmp = shards.temp_path(self.out, fmt, shard, run)
        self.records: list[ImageRecord] = []
        self.keys: list[str] = []
        self.grids: list[list[int]] = []
        self.rows: dict[str, list[int]] = {f: [] for f in layouts}
        self._starts: dict[str, list[int]] = {f: [] for f in layouts}  # first row of each image
        self._written: dict[str, ImageRecord] = {}  # ok records by key (copies read their original's rows)
        self.bytes_written = 0
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.writer = fmt.create(self.tmp, layouts, store_dtype, compression)
        except Exception as exc:
            self._fail(exc)

    def add_batch(self, batch: EncodedBatch) -> None:
        for record in batch.records:
            if record.float16_overflow:
                logger.warning("%s: %d value(s) exceed float16 range and are stored as inf; use --store-dtype "
                               "bfloat16 or float32", record.key, record.float16_overflow)
            if record.nonfinite:
                logger.warning("%s: %d NaN/Inf value(s) in its tokens (exports leave it out)", record.key,
                               record.nonfinite)
        first_row = len(self.keys)
        for i, record in enumerate(batch.records):  # complete before serialised: formats write records as they come
            record.row = first_row + i
            record.tokens = {f: batch.rows[f][i] for f in self.layouts}
        try:
            self.writer.write_batch([r.key for r in batch.records], [r.to_json() for r in batch.records],
                                    batch.arrays, batch.rows, batch.order)
        except Exception as exc:
            self._fail(exc, sum(a.nbytes for a in batch.arrays.values()))
        self.bytes_written += sum(a.nbytes for a in batch.arrays.values())
        for i, record in enumerate(batch.records):
            self.keys.append(record.key)
            self.grids.append(record.grid)
            for feature in self.layouts:
                starts = self._starts[feature]
                starts.append(starts[-1] + self.rows[feature][-1] if starts else 0)
                self.rows[feature].append(batch.rows[feature][i])
            self._written[record.key] = record
            self.records.append(record)
        self.records += batch.skipped

    def add_record(self, record: ImageRecord) -> None:
        self.records.append(record)

    def add_copy(self, record: ImageRecord, first: str) -> None:
        """An image with the same pixels as ``first``, written earlier to this shard: its rows are read back and
        written again under its own key (every shard stays self-contained, every reader unchanged)."""
        original = self._written[first]
        first = original.row
        arrays, rows = {}, {}
        for feature, counts in self.rows.items():
            start = self._starts[feature][first]
            arrays[feature] = self.writer.read_rows(feature, first, start, start + counts[first])
            rows[feature] = [counts[first]]
        record.float16_overflow = original.float16_overflow
        self.add_batch(EncodedBatch(-1, [record], arrays, rows))

    def commit(self, supersedes: tuple[str, ...] = (), **sidecar_fields: Any) -> Sidecar | None:
        """Finish the data and commit it; None when another process committed the shard first. ``supersedes``: the
        committed shards it replaces whole, moved out of where plain readers look first (``shards.commit``)."""
        offsets = {f: row_offsets(r) for f, r in self.rows.items()}
        grids = np.array(self.grids, dtype=np.int32).reshape(-1, 3)
        try:
            self.writer.finish(self.keys, offsets, grids)
            sidecar = Sidecar(shard=self.shard, format=self.fmt.name, data=self.fmt.data_name(self.shard),
                              files={}, features={f: int(sum(r)) for f, r in self.rows.items()},
                              records=self.records, **sidecar_fields)
            return sidecar if shards.commit(self.out, self.fmt, self.tmp, sidecar, supersedes) else None
        except Exception as exc:
            self._fail(exc)

    def abort(self) -> None:
        """Drop the temporary data (the shard stays not done)."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.abort()
        remove(self.tmp)

    def _fail(self, exc: BaseException, more: int = 0):
        self.abort()
        if isinstance(exc, OSError) or is_no_space(exc):
            raise_store_error(exc if isinstance(exc, OSError) else OSError(errno.ENOSPC, str(exc)), self.tmp,
                              needed=self.bytes_written + more)
        raise exc

"""The committer: one background thread owns every open shard sink; the run loop talks to it through a bounded
queue, so writing never stalls the loop that feeds the device, and host memory stays bounded.

Order is the queue's order. A unit is committed when its ``UnitEnd`` arrives: the device stage emits it behind the
unit's last batch, so nothing here counts batches in flight. A failure in the thread (a full disk) is raised in the
loop at its next call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..storage import SidecarStamp
from ..storage.claims import Claims
from ..storage.format import FeatureLayout, ShardFormat
from ..storage.plan import UnitRef
from ..storage.records import ImageRecord, Sidecar, UnitInfo
from ..storage.roots import StoreRoot
from .sink import ShardSink
from .types import EncodedBatch, UnitEnd

logger = logging.getLogger(__name__)
QUEUE_DEPTH = 8  # messages; each holds at most one batch of host arrays


@dataclass
class CommitStats:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    nonfinite: int = 0  # of ok: images whose tokens hold NaN/Inf (ImageRecord.nonfinite_values)
    shards_written: int = 0
    output_bytes: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # key -> reason (skipped and failed)
    busy_seconds: float = 0.0  # the writer thread's time spent writing and committing (vitok.run.run_stats)
    queue_fill: float = 0.0  # mean fill of the queue when the loop put a message (1.0: the loop waited for disk)


@dataclass
class WriteBatch:
    """Encoded images: their rows and records go into the unit's shard."""

    unit: int
    batch: EncodedBatch


@dataclass
class WriteRecord:
    """An input with no rows of its own to write (skipped, failed): only its record."""

    unit: int
    record: ImageRecord


@dataclass
class CopyRows:
    """An image with the same pixels as ``first``, written earlier to this unit's shard: its rows are read back and
    written again under its own key."""

    unit: int
    record: ImageRecord
    first: str


@dataclass
class Commit:
    """The unit's last message: commit its shard with ``info``."""

    unit: int
    info: UnitInfo


Message = WriteBatch | WriteRecord | CopyRows | Commit


class Committer:
    def __init__(self, out: StoreRoot, fmt: ShardFormat, layouts: dict[str, FeatureLayout], store_dtype: str,
                 compression: str | None, claims: Claims, stamp: SidecarStamp,
                 on_commit: Callable[[Sidecar], None] | None = None) -> None:
        self.out, self.fmt, self.layouts = out, fmt, layouts
        self.store_dtype, self.compression, self.claims = store_dtype, compression, claims
        self.stamp, self.on_commit = stamp, on_commit
        self.stats = CommitStats()
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._sinks: dict[int, ShardSink] = {}  # writer thread only
        self._units: dict[int, UnitRef] = {}
        self._inputs: dict[int, str | None] = {}  # digest of each unit's planned inputs (vitok.storage.plan.binding)
        self._supersedes: dict[int, tuple[str, ...]] = {}  # committed shards each unit's shard replaces whole
        self._error: BaseException | None = None
        self._aborted = False
        self._puts, self._fill = 0, 0.0
        self._thread = threading.Thread(target=self._work, name="vitok-committer", daemon=True)

    # ---- the run loop's side ----------------------------------------------------------------------------------

    def start(self) -> Committer:
        self._thread.start()
        return self

    def begin(self, unit: UnitRef, inputs: str | None = None, supersedes: tuple[str, ...] = ()) -> None:
        """A unit this run writes; ``inputs``: the digest of its planned inputs, recorded in its sidecar;
        ``supersedes``: committed shards its shard replaces whole (an archive's earlier attempts)."""
        self._units[unit.index] = unit
        self._inputs[unit.index] = inputs
        self._supersedes[unit.index] = supersedes

    def put(self, events: list[EncodedBatch | UnitEnd]) -> None:
        """What the device stage finished, in its order: batches to write, unit ends to commit."""
        for event in events:
            self.send(Commit(event.unit, event.info) if isinstance(event, UnitEnd) else WriteBatch(event.unit, event))

    def record(self, unit: int, record: ImageRecord) -> None:
        """An input with no tokens (skipped or failed): its record only."""
        self.send(WriteRecord(unit, record))

    def send(self, message: Message) -> None:
        """Queue one message for the writer thread; they are carried out in the order sent."""
        self._puts += 1
        self._fill += self._queue.qsize() / QUEUE_DEPTH
        self.stats.queue_fill = self._fill / self._puts
        self._enqueue(message)

    def _enqueue(self, message: Message | None) -> None:
        self._raise()
        while True:
            try:
                self._queue.put(message, timeout=1.0)
                return
            except queue.Full:
                self._raise()

    def finish(self) -> CommitStats:
        """Wait for every queued write and commit; raise the thread's error if it had one."""
        self._enqueue(None)
        self._thread.join()
        self._raise()
        return self.stats

    def abort(self) -> None:
        """Stop: drop every unfinished shard's temporary data and release its claim (committed shards stay)."""
        self._aborted = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=60)
        for unit, sink in list(self._sinks.items()):
            sink.abort()
            self.claims.release(sink.shard)
            del self._sinks[unit]

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # ---- the writer thread ------------------------------------------------------------------------------------

    def _sink(self, unit: int) -> ShardSink:
        if unit not in self._sinks:
            self._sinks[unit] = ShardSink(self.out, self.fmt, self._units[unit].name, self.layouts,
                                          self.store_dtype, self.compression, self.claims.identity.id)
        return self._sinks[unit]

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None or self._aborted:
                return
            started = time.perf_counter()
            try:
                if isinstance(message, WriteBatch):
                    self._sink(message.unit).add_batch(message.batch)
                elif isinstance(message, WriteRecord):
                    self._sink(message.unit).add_record(message.record)
                elif isinstance(message, CopyRows):
                    self._sink(message.unit).add_copy(message.record, message.first)
                else:
                    self._commit(message.unit, message.info)
            except BaseException as exc:  # surfaced in the run loop
                self._error = exc
                return
            self.stats.busy_seconds += time.perf_counter() - started

    def _commit(self, unit: int, info: UnitInfo) -> None:
        sink = self._sink(unit)
        if info.inputs is None:
            info.inputs = self._inputs.get(unit)
        sidecar = sink.commit(self._supersedes.get(unit, ()), unit=info, **self.stamp.fields())
        del self._sinks[unit]
        self.claims.release(sink.shard)
        if sidecar is None:
            return
        stats = self.stats
        stats.shards_written += 1
        stats.output_bytes += sidecar.bytes
        for record in sidecar.records:
            if record.status == "ok":
                stats.ok += 1
                stats.nonfinite += bool(record.nonfinite_values)
            else:
                stats.skipped += record.status == "skipped"
                stats.failed += record.status == "failed"
                stats.reasons[record.key] = record.reason or ""
        if self.on_commit is not None:
            self.on_commit(sidecar)

"""Decode/preprocess workers: planned units -> chunks of prepared images, in order within each unit.

Work is cut into tasks: a few consecutive images of a loose-file unit (so a small run still uses every worker), or
a whole archive (read sequentially by one worker). Task ``j`` goes to worker ``j % W``; each task's images come back
as chunks of at most ``CHUNK`` images with their uint8 patches in one tensor (one message, one pinned copy per
chunk). Every input gives an item: pixels, or a record saying why not. Workers ignore SIGINT/SIGTERM: the main
process decides how to stop and shuts them down.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ImageError, InputUnavailableError
from .identity import content_id, source_sha256
from .plan import UnitRef
from .preprocess import PreparedImage, Preprocessor
from .readers import ReaderOptions, Sample, UnitReadError, get_reader
from .storage.records import ImageRecord

CHUNK = 8  # images per message from a worker


@dataclass
class Item:
    """One input after the decode stage: its record (status ok/skipped/failed), and its pixels when ok."""

    record: ImageRecord
    image: PreparedImage | None = None


@dataclass
class Chunk:
    unit: int  # the unit's index in the plan
    seq: int  # position of this chunk in its unit
    items: list[Item]
    end: bool = False  # the unit's last chunk
    unit_error: str | None = None  # why the rest of the unit could not be read
    unit_failed: bool = False  # ... because it was unavailable (retried later) rather than damaged
    rows: list[int] = field(default_factory=list)  # patch rows of each decoded image, in order
    patches: torch.Tensor | None = None  # all decoded images' patches, concatenated

    def pack(self) -> Chunk:
        images = [item.image for item in self.items if item.image is not None]
        present = [image.patches for image in images if image.patches is not None]
        if present:
            self.patches = torch.cat(present)
            self.rows = [len(p) for p in present]
            for image in images:
                image.patches = None  # sent once, inside ``patches``
        return self

    def pin_memory(self) -> Chunk:  # called by the DataLoader's pinning thread (CUDA)
        if self.patches is not None:
            self.patches = self.patches.pin_memory()
        return self

    def unpack(self) -> list[Item]:
        views = iter(self.patches.split(self.rows) if self.patches is not None else ())
        for item in self.items:
            if item.image is not None and item.image.jpeg is None:  # (a GPU-decoded JPEG has no patches yet)
                item.image.patches = next(views)
        return self.items


def prepare(sample: Sample, preprocessor: Preprocessor) -> Item:
    """Read and decode one sample; never raises (a bug or an exotic decoder failure costs one image, not the run)."""
    record = ImageRecord(sample.key, "ok", sample.source, member=sample.member, meta=sample.meta)
    if sample.skip is not None:
        record.status, record.reason = "skipped", sample.skip
        return Item(record)
    try:
        if sample.data is None:
            from .decode import read_source

            source = read_source(sample.source)
            record.source_bytes, record.source_mtime_ns, data = source.size, source.mtime_ns, source.data
        else:
            data = sample.data
            record.source_bytes = len(data)
        record.source_sha256 = source_sha256(data)
        image = preprocessor.load(data)
    except InputUnavailableError as exc:
        record.status, record.reason = "failed", str(exc)
        return Item(record)
    except ImageError as exc:
        record.status, record.reason = "skipped", str(exc)
        return Item(record)
    except Exception as exc:
        record.status, record.reason = "skipped", f"internal error while decoding: {type(exc).__name__}: {exc}"
        return Item(record)
    record.grid, record.size = list(image.grid_thw), list(image.original_size)
    record.decoder, record.notes = image.decoder, (image.notes or None)
    if image.patches is not None:  # (a JPEG left for the GPU to decode has no pixels yet, and no content id)
        record.content_id = content_id(image.patches, image.grid_thw)
    return Item(record, image)


@dataclass(frozen=True)
class Task:
    unit: UnitRef
    start: int = 0
    stop: int | None = None  # None: the whole unit


def make_tasks(units: Sequence[UnitRef], splittable: bool) -> list[Task]:
    if not splittable:
        return [Task(u) for u in units]
    return [Task(u, start, min(u.count, start + CHUNK)) for u in units for start in range(0, u.count, CHUNK)]


class UnitReading(torch.utils.data.IterableDataset):
    """The workers' side: tasks ``worker_id::num_workers``, each read by the input reader and decoded."""

    def __init__(self, tasks: list[Task], kind: str, reader_options: ReaderOptions, preprocessor: Preprocessor):
        self.tasks, self.kind, self.reader_options, self.preprocessor = tasks, kind, reader_options, preprocessor

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        tasks = self.tasks if info is None else self.tasks[info.id :: info.num_workers]
        reader = get_reader(self.kind, self.reader_options)
        for task in tasks:
            yield from self._task(reader, task)

    def _task(self, reader, task: Task) -> Iterator[Chunk]:
        unit = task.unit
        if task.stop is not None:  # a slice of a loose-file unit: exactly one chunk
            items = [prepare(s, self.preprocessor) for s in reader.samples(unit, task.start, task.stop)]
            yield Chunk(unit.index, task.start // CHUNK, items, end=task.stop >= unit.count).pack()
            return
        seq, items = 0, []
        try:
            for sample in reader.samples(unit):
                items.append(prepare(sample, self.preprocessor))
                if len(items) == CHUNK:
                    yield Chunk(unit.index, seq, items).pack()
                    seq, items = seq + 1, []
        except UnitReadError as exc:
            yield Chunk(unit.index, seq, items, end=True, unit_error=str(exc), unit_failed=exc.failed).pack()
            return
        yield Chunk(unit.index, seq, items, end=True).pack()


def _ignore_signals(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(device: torch.device) -> int:
    """Decode workers: all cores but one feeding a GPU; on a CPU the encoder's GEMMs need the cores, and decoding
    is a small share of the work, so a worker per four cores (none on one or two: a worker would only take
    turns with the encoder's threads)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 2 else max(1, min(4, cpus // 4))


def load_units(units: Sequence[UnitRef], kind: str, reader_options: ReaderOptions, preprocessor: Preprocessor,
               workers: int, pin_memory: bool = False) -> Iterator[Chunk]:
    """Chunks of the units' prepared images; within a unit in order (re-ordered here if workers race)."""
    splittable = get_reader(kind, reader_options).splittable
    dataset = UnitReading(make_tasks(units, splittable), kind, reader_options, preprocessor)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory, worker_init_fn=_ignore_signals,
        prefetch_factor=2 if workers else None, persistent_workers=False,
    )
    iterator = iter(loader)
    try:
        yield from in_unit_order(iterator)
    finally:  # on any exit (an error in a worker or in the loop): stop the workers now, not at interpreter exit
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def in_unit_order(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    expected: dict[int, int] = {}
    waiting: dict[tuple[int, int], Chunk] = {}
    for chunk in chunks:
        waiting[(chunk.unit, chunk.seq)] = chunk
        while (chunk.unit, expected.get(chunk.unit, 0)) in waiting:
            ready = waiting.pop((chunk.unit, expected.get(chunk.unit, 0)))
            expected[chunk.unit] = ready.seq + 1
            yield ready

"""What a decode worker runs: planned units -> chunks of prepared images, in order within each unit (the worker
processes themselves, and surviving their deaths: ``workers.py``).

Work is cut into tasks: a few consecutive images of a loose-file unit (so a small run still uses every worker), or
a whole archive (read sequentially by one worker). Task ``j`` goes to worker ``j % W``; each task's images come back
as chunks of at most ``CHUNK`` images (the preprocessor's ``per_chunk``: a video comes alone) with their uint8
patches in one tensor (one message, one pinned copy per chunk). Every input gives an item: pixels, or a record
saying why not.

"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import ImageError, InputUnavailableError
from ..inputs.identity import content_id, source_sha256
from ..inputs.preprocess import Preprocessor
from ..inputs.readers import ReaderOptions, Sample, UnitReadError, get_reader
from ..inputs.video_preprocess import PreparedVideo
from ..storage.plan import UnitRef
from ..storage.records import ImageRecord, VideoRecord
from .types import Chunk, Item

CHUNK = Preprocessor.per_chunk  # images per message from a worker

logger = logging.getLogger(__name__)


def prepare(sample: Sample, preprocessor: Preprocessor) -> Item:
    """Read and decode one sample; never raises (a bug or an exotic decoder failure costs one image, not the run).
    The record gets the file's sha256 and, once decoded here, the pixel content id (``inputs.identity``). A sample's
    temporary copy (``Sample.local``: a large video member of a tar) is removed once it is decoded."""
    try:
        return _prepare(sample, preprocessor)
    finally:
        sample.discard()


def _prepare(sample: Sample, preprocessor: Preprocessor) -> Item:
    record = ImageRecord(sample.key, "ok", sample.source, member=sample.member, meta=sample.meta)
    if sample.skip is not None:
        record.status, record.reason = "skipped", sample.skip
        return Item(record)
    source = None
    try:
        if sample.data is None:
            # a video is hashed as it is read; its decoder opens the file (or its temporary copy: a tar member's)
            source = preprocessor.read(sample.local or sample.source)
            record.source_bytes, record.source_mtime_ns = source.size, None if sample.local else source.mtime_ns
            data = source.data if source.data is not None else source.local or sample.local or sample.source
            record.source_sha256 = source.sha256 or source_sha256(data)
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
    finally:
        if source is not None:
            source.close()
    record.grid, record.size = list(image.grid_thw), list(image.original_size)
    record.decoder, record.notes = image.decoder, (image.notes or None)
    if isinstance(image, PreparedVideo):  # which frames were encoded, and when
        frames = image.frames
        record.video = VideoRecord(frames.frame_count, frames.fps, frames.duration, frames.indices, frames.timestamps,
                                   frames.step_times, frames.decoder)
    if image.patches is not None:  # (a JPEG left for the GPU to decode has no pixels yet, and no content id)
        record.content_id = content_id(image.patches, image.grid_thw)
    return Item(record, image)


def prepare_isolated(sample: Sample, preprocessor: Preprocessor) -> Item:
    """``prepare`` in a forked child process: an image whose decoder crashes or is killed (a segfault, the kernel's
    out-of-memory killer) costs that image, recorded with the signal, instead of the worker and with it the run."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode, send the item, leave without running the parent's exit handlers
        code = 0
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(prepare(sample, preprocessor), pipe, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    sample.discard()  # (the child removed its temporary copy, unless it crashed first)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and data:
        return pickle.loads(data)
    record = ImageRecord(sample.key, "skipped", sample.source, member=sample.member, meta=sample.meta)
    how = (f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
           else f"exited with status {os.WEXITSTATUS(status)}")
    record.reason = f"decoding it crashed the decoding process (it {how}); the image is not decoded"
    return Item(record)


@dataclass(frozen=True)
class Task:
    unit: UnitRef
    start: int = 0
    stop: int | None = None  # None: the whole unit
    resume: int = 0  # a whole unit whose first ``resume`` chunks were delivered before its worker died
    isolated: bool = False  # decode each image in a process of its own (the task was in flight when a worker died)
    per_chunk: int = CHUNK  # inputs per chunk (the preprocessor's ``per_chunk``: one video, eight images)


def make_tasks(units: Sequence[UnitRef], splittable: bool, per_chunk: int = CHUNK) -> list[Task]:
    if not splittable:
        return [Task(u, per_chunk=per_chunk) for u in units]
    return [Task(u, start, min(u.count, start + per_chunk), per_chunk=per_chunk)
            for u in units for start in range(0, u.count, per_chunk)]


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
        started = time.perf_counter()
        decode = prepare_isolated if task.isolated else prepare
        if task.stop is not None:  # a slice of a loose-file unit: exactly one chunk
            items = [decode(s, self.preprocessor)
                     for s in reader.samples(unit, task.start, task.stop)]
            yield Chunk(unit.index, task.start // task.per_chunk, items, end=task.stop >= unit.count,
                        busy=time.perf_counter() - started).pack()
            return
        seq, items, delivered = task.resume, [], task.resume * task.per_chunk
        try:
            for number, sample in enumerate(reader.samples(unit)):
                if number < delivered:  # read again to reach the rest, not decoded again
                    sample.discard()
                    continue
                items.append(decode(sample, self.preprocessor))
                if len(items) == task.per_chunk:
                    chunk = Chunk(unit.index, seq, items, busy=time.perf_counter() - started).pack()
                    yield chunk
                    seq, items, started = seq + 1, [], time.perf_counter()
        except UnitReadError as exc:
            yield Chunk(unit.index, seq, items, end=True, unit_error=str(exc), unit_failed=exc.failed,
                        busy=time.perf_counter() - started).pack()
            return
        yield Chunk(unit.index, seq, items, end=True, busy=time.perf_counter() - started).pack()


def in_unit_order(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    expected: dict[int, int] = {}
    waiting: dict[tuple[int, int], Chunk] = {}
    for chunk in chunks:
        waiting[(chunk.unit, chunk.seq)] = chunk
        while (chunk.unit, expected.get(chunk.unit, 0)) in waiting:
            ready = waiting.pop((chunk.unit, expected.get(chunk.unit, 0)))
            expected[chunk.unit] = ready.seq + 1
            yield ready

"""What a decode worker runs: planned units -> chunks of prepared images, in order within each unit (the worker
processes themselves, and surviving their deaths: ``workers.py``).

Work is cut into tasks: a few consecutive images of a loose-file unit (so a small run still uses every worker), or
a whole archive (read sequentially by one worker). Task ``j`` goes to worker ``j % W``; each task's images come back
as chunks of at most ``CHUNK`` images (the preprocessor's ``per_chunk``: a video comes alone) with their uint8
patches in one tensor (one message, one pinned copy per chunk). Every input gives an item: pixels, or a record
saying why not.

"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import ImageError, InputUnavailableError
from ..inputs.identity import ContentHash, content_id, source_sha256
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
    items = _prepared(sample, preprocessor, preprocessor.load)
    try:
        return next(items)
    finally:
        items.close()
        sample.discard()


def prepare_pieces(sample: Sample, preprocessor: Preprocessor) -> Iterator[Item]:
    """``prepare`` for a preprocessor that cuts long inputs in time (``load_pieces``: videos): one whole item, or
    the video's pieces in order (``Item.part``), the last one with the complete record and the content id hashed
    over every piece; a video whose decoding stops after some pieces ends with its skipped record and no image."""
    try:
        yield from _prepared(sample, preprocessor, preprocessor.load_pieces, pieces=True)
    finally:
        sample.discard()


def _prepared(sample: Sample, preprocessor, load, pieces: bool = False) -> Iterator[Item]:
    record = ImageRecord(sample.key, "ok", sample.source, member=sample.member, meta=sample.meta)
    if sample.skip is not None:
        record.status, record.reason = "skipped", sample.skip
        yield Item(record)
        return
    part = None
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
        if not pieces:
            yield _finished(record, load(data), None)
            return
        digest = None
        for image in load(data):
            if image.piece is None:  # it fits: whole
                yield _finished(record, image, None)
                return
            if digest is None:
                digest = ContentHash(image.piece.video_grid, image.patches.shape[1:])
            digest.update(image.patches)
            part = 0 if part is None else part + 1
            if image.piece.last:
                yield Item(_finished(record, image, digest).record, image, part=part, last=True)
                return
            item = Item(dataclasses.replace(record), image, part=part, last=False)
            del image  # the item holds the piece: once it is sent, nothing here keeps its patches
            yield item
            del item
    except InputUnavailableError as exc:
        record.status, record.reason = "failed", str(exc)
    except ImageError as exc:
        record.status, record.reason = "skipped", str(exc)
    except Exception as exc:
        record.status, record.reason = "skipped", f"internal error while decoding: {type(exc).__name__}: {exc}"
    finally:
        if source is not None:
            source.close()
    yield Item(record, part=None if part is None else part + 1)


def _finished(record: ImageRecord, image, digest: ContentHash | None) -> Item:
    """The record of a decoded input (a video cut in time: its last piece, ``digest`` fed every piece)."""
    video = isinstance(image, PreparedVideo)
    record.grid = list(image.piece.video_grid if video and image.piece else image.grid_thw)
    record.size = list(image.original_size)
    record.decoder, record.notes = image.decoder, (image.notes or None)
    if video:  # which frames were encoded, and when
        frames = image.frames
        record.video = VideoRecord(frames.frame_count, frames.fps, frames.duration, frames.indices, frames.timestamps,
                                   frames.step_times, frames.decoder)
    if digest is not None:
        record.content_id = digest.hexdigest()
    elif image.patches is not None:  # (a JPEG left for the GPU to decode has no pixels yet, and no content id)
        record.content_id = content_id(image.patches, image.grid_thw)
    return Item(record, image)


def prepare_isolated(sample: Sample, preprocessor: Preprocessor) -> Item:
    """``prepare`` in a forked child process: an image whose decoder crashes or is killed (a segfault, the kernel's
    out-of-memory killer) costs that image, recorded with the signal, instead of the worker and with it the run."""
    return next(_isolated(sample, preprocessor, prepare))


def prepare_pieces_isolated(sample: Sample, preprocessor: Preprocessor) -> Iterator[Item]:
    """``prepare_pieces`` in a forked child process, its items streamed back one by one (a long video's pieces are
    never all held); a child that dies mid-video ends the video with its skipped record."""
    return _isolated(sample, preprocessor, prepare_pieces)


def _isolated(sample: Sample, preprocessor, decode) -> Iterator[Item]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: decode, send the items, leave without running the parent's exit handlers
        code = 0
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                items = decode(sample, preprocessor)
                for item in [items] if isinstance(items, Item) else items:
                    pickle.dump(item, pipe, protocol=pickle.HIGHEST_PROTOCOL)
                    pipe.flush()
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    last: Item | None = None
    try:
        with os.fdopen(read_end, "rb") as pipe:
            while True:
                try:
                    item = pickle.load(pipe)
                except Exception:  # the end (EOFError), or a message cut short by the child's death
                    break
                if not item.last:
                    yield item
                last = item
    finally:
        _, status = os.waitpid(pid, 0)
        sample.discard()  # (the child removed its temporary copy, unless it crashed first)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and last is not None and last.last:
        yield last
        return
    record = ImageRecord(sample.key, "skipped", sample.source, member=sample.member, meta=sample.meta)
    how = (f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
           else f"exited with status {os.WEXITSTATUS(status)}")
    record.reason = f"decoding it crashed the decoding process (it {how}); the image is not decoded"
    yield Item(record, part=None if last is None or last.part is None else last.part + 1)


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
        if hasattr(self.preprocessor, "load_pieces"):  # long videos come in pieces, each its own chunk
            decode = prepare_pieces_isolated if task.isolated else prepare_pieces
        else:
            whole = prepare_isolated if task.isolated else prepare
            decode = lambda sample, preprocessor: [whole(sample, preprocessor)]  # noqa: E731
        if task.stop is not None:  # a slice of a loose-file unit: its inputs in one chunk, or a video's pieces
            items, pieced = [], False
            for sample in reader.samples(unit, task.start, task.stop):
                for item in decode(sample, self.preprocessor):
                    if item.part is None:
                        items.append(item)
                        continue
                    pieced = True  # (per_chunk is 1 where inputs come in pieces: the slice is this video)
                    yield Chunk(unit.index, task.start // task.per_chunk, [item], end=item.last and task.stop >=
                                unit.count, part=item.part, more=not item.last,
                                busy=time.perf_counter() - started).pack()
                    started = time.perf_counter()
            if not pieced:
                yield Chunk(unit.index, task.start // task.per_chunk, items, end=task.stop >= unit.count,
                            busy=time.perf_counter() - started).pack()
            return
        seq, items, delivered = task.resume, [], task.resume * task.per_chunk
        try:
            for number, sample in enumerate(reader.samples(unit)):
                if number < delivered:  # read again to reach the rest, not decoded again
                    sample.discard()
                    continue
                for item in decode(sample, self.preprocessor):
                    if item.part is not None:  # (per_chunk is 1 where inputs come in pieces: items is empty)
                        yield Chunk(unit.index, seq, [item], part=item.part, more=not item.last,
                                    busy=time.perf_counter() - started).pack()
                        started = time.perf_counter()
                        if item.last:
                            seq += 1
                        continue
                    items.append(item)
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
    """Each unit's chunks in their order (``seq``, then a video's pieces by ``part``), whatever order workers send
    (anything with ``unit`` and ``seq``: the Ray engine's steps come in no pieces)."""
    expected: dict[int, tuple[int, int]] = {}
    waiting: dict[tuple[int, int, int], Chunk] = {}
    for chunk in chunks:
        waiting[(chunk.unit, chunk.seq, getattr(chunk, "part", 0))] = chunk
        while (chunk.unit, *expected.get(chunk.unit, (0, 0))) in waiting:
            ready = waiting.pop((chunk.unit, *expected.get(chunk.unit, (0, 0))))
            more = getattr(ready, "more", False)
            expected[chunk.unit] = (ready.seq, ready.part + 1) if more else (ready.seq + 1, 0)
            yield ready

"""The decode workers: processes running the loader (``loader.UnitReading``) on the plan's units, as many as the
machine holds, ending with the run, and the run surviving one that dies.

Workers die with the main process: on Linux the kernel kills them when it dies (``PR_SET_PDEATHSIG``), elsewhere a
thread watches the parent's pid, so a killed run never leaves orphans holding its pipes (``vitok ... | grep``).
SIGTERM and SIGINT end a worker quietly (exit 0, whatever disposition it inherited): the main process, which gets
the same signal from the terminal or the scheduler, decides how the run stops. ``--workers`` is clamped to what
the machine can hold (``workers_allowed``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence

import torch

from ..errors import WorkersDiedError
from ..inputs.preprocess import Preprocessor
from ..inputs.readers import ReaderOptions, get_reader
from ..storage.plan import UnitRef
from .loader import CHUNK, Task, UnitReading, in_unit_order, make_tasks
from .types import Chunk

logger = logging.getLogger(__name__)

WORKER_BYTES = 320 << 20  # resident memory of one decode worker (torch, the decoders, a few images), measured
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def _exit_quietly(_signum, _frame) -> None:
    os._exit(0)  # an exit status of 0: the main process is stopping (same signal) or notices the worker is gone


def _worker_init(parent: int, _worker_id: int) -> None:
    """In each worker: end on SIGTERM/SIGINT even if they were ignored when it was forked (a run started with
    ``nohup`` or ``&``, or forked while the main process was cleaning up), and die with the parent."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_quietly)
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` does: the kernel's parent-death signal on Linux, else a thread that
    polls the parent's pid; and end now if the parent is already gone (it may die before this runs)."""
    watched = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            watched = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            watched = False
    if os.getppid() != parent:
        os._exit(0)
    if not watched:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, name="vitok-parent-watch", daemon=True).start()


def workers_allowed() -> tuple[int, str]:
    """The most decode workers this machine can hold, and why: two per core (decoding is CPU-bound; the second
    covers workers waiting on slow storage) and half the available memory at ``WORKER_BYTES`` each."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit, why = 2 * cpus, f"{cpus} cores"
    available = _available_memory()
    if available is not None:
        limit = min(limit, max(1, available // 2 // WORKER_BYTES))
        why += f", {available / 2**30:.1f} GB of memory available"
    return max(1, limit), why


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def clamp_workers(requested: int) -> int:
    """``requested`` decode workers, or fewer if the machine cannot hold them (saying so in one warning line)."""
    limit, why = workers_allowed()
    if requested <= limit:
        return requested
    logger.warning("--workers %d is more than this machine can hold (%s): using %d", requested, why, limit)
    return limit


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
    """Chunks of the units' prepared images; within a unit in order (re-ordered here if workers race). A decode
    worker that dies (killed, out of memory, a decoder crash) does not end the run: see ``WorkerChunks``."""
    splittable = get_reader(kind, reader_options).splittable
    workers = clamp_workers(workers)
    per_chunk = getattr(preprocessor, "per_chunk", CHUNK)
    return WorkerChunks(make_tasks(units, splittable, per_chunk), kind, reader_options, preprocessor, workers,
                        pin_memory)


WORKER_DEATHS = 3  # worker deaths in a row, without a chunk delivered in between, that end the run
PREFETCH = 2  # tasks' chunks a worker may have made ahead of the one awaited (DataLoader's prefetch_factor)
STALL_SECONDS = 300.0  # a worker silent this long while its chunk is awaited is taken as dead (stopped, hung)
DEATH_WAIT = 2.0  # seconds an error met while receiving waits for a worker's death to be seen


class WorkerChunks:
    """The loader's chunks in unit order; ``close`` (on any exit: an error in a worker or in the loop) stops the
    workers now, not at interpreter exit, even when no chunk was asked for yet.

    When a worker dies (or stalls for ``STALL_SECONDS``), the workers are started again on the tasks not delivered
    yet (a whole archive resumes after its delivered chunks), and the tasks that may have been in flight decode each
    image in a process of its own (``prepare_isolated``): an image that crashes its decoder is then recorded as
    skipped with the signal, and the run goes on. Which task a worker was in is not known (it may have made chunks
    ahead, lost with it), so the first ``PREFETCH + 1`` undelivered tasks of every worker are isolated, and after a
    second death with nothing delivered in between, every task left. Workers that keep dying even so end the run."""

    def __init__(self, tasks: list[Task], kind: str, reader_options: ReaderOptions, preprocessor: Preprocessor,
                 workers: int, pin_memory: bool) -> None:
        self._kind, self._reader_options, self._preprocessor = kind, reader_options, preprocessor
        self._workers, self._pin_memory = workers, pin_memory
        self._tasks = tasks
        self._delivered: set[tuple[int, int]] = set()  # (unit, seq) of chunks received (a video's: all its pieces)
        self._parts: dict[tuple[int, int], int] = {}  # (unit, seq) -> pieces received of a video cut in time
        self._ended: set[int] = set()  # units whose last chunk was received
        self._iterator = self._start(tasks)  # the workers start now, not at the first chunk asked for
        self._ordered = in_unit_order(self._received())
        self._awaited_since: float | None = None  # when the chunk now awaited was asked for
        self._closed = threading.Event()
        if workers:
            threading.Thread(target=self._watch, name="vitok-decode-watch", daemon=True).start()

    def _watch(self) -> None:
        """A worker stopped (SIGSTOP) or hung (a decoder loop, storage that never answers) stalls the run: killed
        after ``STALL_SECONDS`` of waiting (the preprocessor's ``stall_seconds`` when it has one: decoding a long
        video takes minutes), it is then a dead worker like any other."""
        while True:
            stall = getattr(self._preprocessor, "stall_seconds", None) or STALL_SECONDS
            if self._closed.wait(min(5.0, stall / 4)):
                return
            since = self._awaited_since
            if since is not None and time.monotonic() - since > stall:
                logger.warning("no input from the decode workers for %.0f s: taking them as hung", stall)
                self._awaited_since = None
                self._kill_workers()

    def _start(self, tasks: list[Task]):
        dataset = UnitReading(tasks, self._kind, self._reader_options, self._preprocessor)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self._workers, pin_memory=self._pin_memory,
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
            prefetch_factor=PREFETCH if self._workers else None, persistent_workers=False,
        )
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGCHLD) if main else None
        with warnings.catch_warnings():  # torch's advice on the worker count: clamp_workers has said what matters
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            iterator = iter(loader)
        if main and signal.getsignal(signal.SIGCHLD) is not previous:
            # torch's SIGCHLD handler raises a worker's death wherever the main thread happens to be (in the encoder,
            # the writer); without it the death is found where chunks are awaited (``_received``), within seconds
            signal.signal(signal.SIGCHLD, previous)
        return iterator

    def _received(self) -> Iterator[Chunk]:
        deaths = 0
        while True:
            try:
                self._awaited_since = time.monotonic()
                chunk = next(self._iterator)
            except StopIteration:
                return
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
                # torch's report of a death, or a message cut short by it (a worker killed while it wrote to the queue)
                if self._workers == 0 or not ("DataLoader worker (pid" in str(exc) or self._a_worker_died()):
                    raise
                deaths += 1
                if deaths >= WORKER_DEATHS:  # (__next__ closes the workers)
                    raise WorkersDiedError(f"decode workers died {deaths} times in a row without delivering an image "
                                           f"(last: {exc}); rerun to resume") from None
                self._restart(str(exc) if "DataLoader worker" in str(exc) else "a decode worker died",
                              isolate_all=deaths > 1)
                continue
            finally:
                self._awaited_since = None
            deaths = 0
            key = (chunk.unit, chunk.seq)
            if chunk.more:  # a piece of a video: one decoded again after a worker's death restarts at its first
                if chunk.part < self._parts.get(key, 0):
                    continue  # delivered before the death (decoding is deterministic: the same patches)
                self._parts[key] = chunk.part + 1
                yield chunk
                continue
            # a video's end after its pieces (decoding it again may have stopped sooner, in a process of its own)
            chunk.part = max(chunk.part, self._parts.pop(key, 0))
            self._delivered.add(key)
            if chunk.end:
                self._ended.add(chunk.unit)
            yield chunk

    def _restart(self, error: str, isolate_all: bool) -> None:
        self._shutdown()
        # worker w had tasks[w::W], in order: the one it died in is among its first undelivered ones
        undelivered = [not self._done(task) for task in self._tasks]
        in_flight = set()
        for w in range(self._workers):
            own = [i for i in range(w, len(self._tasks), self._workers) if undelivered[i]]
            in_flight.update(own if isolate_all else own[: PREFETCH + 1])
        left = []
        for i, task in enumerate(self._tasks):
            if not undelivered[i]:
                continue
            if task.stop is None:  # a whole unit goes on after the chunks it delivered
                task = Task(task.unit, resume=self._delivered_chunks(task.unit.index), isolated=task.isolated,
                            per_chunk=task.per_chunk)
            left.append(Task(task.unit, task.start, task.stop, task.resume, task.isolated or i in in_flight,
                             task.per_chunk))
        self._tasks = left
        logger.warning("%s; decode workers started again on the %d task(s) left, images in flight decoded one "
                       "process each", error.rstrip("."), len(self._tasks))
        self._iterator = self._start(self._tasks)

    def _done(self, task: Task) -> bool:
        if task.stop is not None:
            return (task.unit.index, task.start // task.per_chunk) in self._delivered
        return task.unit.index in self._ended

    def _delivered_chunks(self, unit: int) -> int:
        count = 0
        while (unit, count) in self._delivered:
            count += 1
        return count

    def __iter__(self) -> WorkerChunks:
        return self

    def __next__(self) -> Chunk:
        try:
            return next(self._ordered)
        except BaseException:
            self.close()
            raise

    def _a_worker_died(self, wait: float = DEATH_WAIT) -> bool:
        """Whether a worker died; an error met in the moment of a death (a chunk whose shared memory the dead worker
        was to hand over: ConnectionResetError) may come before its exit is seen, so it is waited for a moment."""
        deadline = time.monotonic() + wait
        while True:
            if any(worker.exitcode not in (None, 0) for worker in getattr(self._iterator, "_workers", ())):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _shutdown(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._kill_workers()  # a stopped worker ignores the SIGTERM torch ends with

    def _kill_workers(self) -> None:
        for worker in list(getattr(self._iterator, "_workers", ())):
            try:
                if worker.is_alive():
                    worker.kill()
            except (OSError, ValueError, AssertionError):  # already reaped, or closed
                pass

    def close(self) -> None:
        self._closed.set()
        self._ordered.close()
        self._shutdown()

"""Where a run's time went: its start-up phases, the steady-state rate of each stage, and the verdict naming the
stage that limits it (the run's last line).

The stages measure themselves without adding a wait on the hot path: decode workers time their own work and send it
with each chunk; the device stage brackets each batch with CUDA events (read once the batch's copies are done, which
the run waits for anyway); the writer thread times its writes. Under ``--engine ray`` the decode tasks and encode
actors time their own work and send it with each batch, and the driver's loop and writer are the local run's.
``verdict`` is a pure function of those figures.

    phases (seconds)   imports: process start -> the run's start (interpreter, imports, option parsing)
                       ray_init: joining or starting the Ray cluster and asking it for its devices (--engine ray)
                       plan: listing the sources, checking the store, writing the plan
                       weights_read / weights_on_device: reading the checkpoint / the model on its device
                       workers_ready: starting the decode workers; warm_up: a dummy batch while they start
                       first_batch_ready / first_batch_done: from the run's start to the first batch queued / back
    stages (steady state, after the first batch came back)
                       decode: images/s delivered, the workers' busy share (their capacity in images/s)
                       encoder: the device's busy share and images/s (Ray: the actors' mean share, each one's
                       images/s); writer: MB/s and its busy share
                       queues: the share of chunk requests the loader answered at once, the writer queue's mean fill
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StoreError
from ..storage.layout import STATS_DIR  # OUT/stats/<run>.json: one file per run (vitok info shows the latest)
from ..storage.records import per_second
from ..storage.roots import StoreRoot, store_root

# in the order they happen; the last two are moments
STARTUP_PHASES = ("imports", "torch_import", "ray_init", "plan", "weights_read", "weights_on_device", "workers_ready",
                  "warm_up", "first_batch_ready", "first_batch_done")
STARTUP_BOUND = 0.5  # start-up over this share of the run: the verdict is about start-up
BUSY = 0.85  # a stage this busy is saturated


_ENTRY_POINT = {"cli": False}


def started_by_cli() -> None:
    """The ``vitok`` command calls this: its process exists for the run, so the process's age when the run begins
    is the run's import time (a library caller's process may be hours old)."""
    _ENTRY_POINT["cli"] = True


def import_seconds() -> float | None:
    """Seconds from the process's start to now when the process was started for this run (the CLI), else None."""
    return process_age() if _ENTRY_POINT["cli"] else None


def process_age() -> float | None:
    """Seconds since this process started (Linux), or None."""
    try:
        with open("/proc/self/stat") as handle:
            started_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StageRates:
    """Steady-state figures of each stage over ``seconds`` of run time (after the first batch came back)."""

    seconds: float = 0.0
    images: int = 0
    workers: int = 0  # 0: decoding happens on the run loop's thread; Ray: the processes that ran decode tasks
    decode_img_s: float = 0.0  # images/s the loader delivered
    decode_busy: float = 0.0  # workers' busy share (busy seconds / (workers x seconds)); on the loop thread: share
    decode_capacity_img_s: float = 0.0  # what the workers could deliver at 100 % busy
    encoder_busy: float = 0.0  # the device's busy share (CUDA events; on CPU the encode calls' share); of several: mean
    encoder_img_s: float = 0.0  # images/s while busy (the encoder's own rate; of several: each one's)
    encoders: int = 1  # devices encoding: the local run's one, or Ray's encode actors
    writer_mb_s: float = 0.0  # MB/s while writing
    writer_busy: float = 0.0
    data_wait: float = 0.0  # share of the run the loop waited for decoded images (Ray: for encoded batches)
    loader_ready: float = 0.0  # share of chunk requests answered without waiting (the loader's queue was full)
    writer_queue_fill: float = 0.0  # mean fill of the writer's queue (1.0 = the loop waited for the disk)


@dataclass
class RunStats:
    phases: dict[str, float] = field(default_factory=dict)
    stages: StageRates = field(default_factory=StageRates)
    device: str = "cpu"  # where the encoder ran (Ray: the encode actors' device kind)
    decode: str = "exact"
    bottleneck: str = ""
    engine: str = "local"  # --engine: under ray the loop waits for the cluster, not for decoding alone
    media: str = "images"  # what the rates count: "images" or "videos"

    def to_dict(self) -> dict[str, Any]:
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()},
                "stages": {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self.stages).items()},
                "device": self.device, "decode": self.decode, "bottleneck": self.bottleneck, "engine": self.engine,
                "media": self.media}


def _pct(share: float) -> str:
    return f"{100 * share:.0f} %"


def verdict(stats: RunStats, total_seconds: float) -> str:
    """One line naming what limited the run, in words a user can act on. Pure: a function of the figures only."""
    p, s = stats.phases, stats.stages
    gpu = stats.device.startswith("cuda")
    device = "GPU" if gpu else "encoder"
    startup = p.get("first_batch_done", 0.0) + p.get("imports", 0.0)
    if total_seconds > 0 and startup / total_seconds > STARTUP_BOUND:
        named = {k: p[k] for k in STARTUP_PHASES[:-2] if p.get(k, 0.0) >= 0.05}
        largest = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in sorted(named.items(), key=lambda kv: -kv[1])
                            [:3])
        return (f"start-up-bound: {startup:.1f} s of {total_seconds:.1f} s before the first batch came back"
                + (f" ({largest})" if largest else "")
                + "; larger jobs amortise it (one run over many inputs rather than many small runs)")
    workers = f"{s.workers} workers" if s.workers else "decoding on the main thread"
    decode = f"{workers} {_pct(s.decode_busy)} busy"
    encoder = f"{device} {_pct(s.encoder_busy)} busy"
    if stats.engine == "ray":
        decode = f"{_count(s.workers, 'decode worker')} {_pct(s.decode_busy)} busy"
        encoder = f"{_count(s.encoders, 'encode actor')} ({device}) {_pct(s.encoder_busy)} busy"
    if s.writer_busy >= BUSY and s.writer_busy >= max(s.encoder_busy, s.decode_busy):
        return (f"writer-bound: writing {s.writer_mb_s:.0f} MB/s, {_pct(s.writer_busy)} busy, {encoder}; a faster "
                "disk, --pool or --store-dtype float16 (fewer bytes) would help")
    if stats.engine == "ray":
        return _ray_verdict(s, decode, encoder, gpu, per_second(stats.media))
    if s.encoder_busy >= BUSY or (s.encoder_busy >= s.decode_busy and s.data_wait < 0.2):
        extra = ("" if gpu else "; --dtype bfloat16 may help on CPUs with AMX/AVX512-BF16 (not exact), or a GPU")
        return f"encoder-bound: {encoder} at {s.encoder_img_s:.1f} {per_second(stats.media)}, {decode}{extra}"
    if s.decode_busy >= BUSY or s.data_wait >= 0.2:
        if s.decode_busy < 0.5:  # waiting for inputs while the workers idle: reading, not decoding
            return (f"input-bound: the loop waited {_pct(s.data_wait)} of the time while {decode}; reading the "
                    "inputs is slow (storage or network): tars/parquet or more --workers would help")
        helps = []
        if gpu and stats.decode == "exact":
            helps.append("--decode gpu")
        helps.append("--fast-decode" if stats.decode == "exact" else "more cores")
        if "more cores" not in helps:
            helps.append("more cores")
        return f"decode-bound: {decode}, {encoder}; {' or '.join(helps)} would help"
    return (f"loop-bound: {decode}, {encoder}, writer {_pct(s.writer_busy)} busy; the run loop's own thread "
            "(batching, copies) limits it; a larger --token-budget would help")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _ray_verdict(s: StageRates, decode: str, encoder: str, gpu: bool, unit: str) -> str:
    """``--engine ray``: the driver waits for the cluster (decode tasks, then encode actors), so its wait says that
    the cluster limits the run, and the busier pool says which part of it."""
    more_encoders = ("more GPUs (an actor each) would help" if gpu else
                     "GPUs would help (the actors encode on CPUs; --dtype bfloat16 may help there, not exact)")
    if s.encoder_busy >= BUSY:
        return f"encoder-bound: {encoder} at {s.encoder_img_s:.1f} {unit} each, {decode}; {more_encoders}"
    if s.decode_busy >= BUSY:
        return f"decode-bound: {decode}, {encoder}; more CPUs in the cluster or --fast-decode would help"
    if s.data_wait < 0.2:
        return (f"driver-bound: the driver waited for the cluster {_pct(s.data_wait)} of the time ({decode}, "
                f"{encoder}, writer {_pct(s.writer_busy)} busy); it receives and writes every token itself: "
                "--num-parts N splits the job into N drivers")
    if max(s.encoder_busy, s.decode_busy) >= 0.5:
        if s.encoder_busy >= s.decode_busy:
            return f"encoder-bound: {encoder} at {s.encoder_img_s:.1f} {unit} each, {decode}; {more_encoders}"
        return f"decode-bound: {decode}, {encoder}; more CPUs in the cluster or --fast-decode would help"
    return (f"input-bound: the driver waited {_pct(s.data_wait)} of the time while {decode} and {encoder}; reading "
            "the inputs is slow, or fewer units are in flight than the cluster has cores (one decode task per unit: "
            "a smaller --shard-size gives more)")


class StageMeter:
    """Collects the figures during a run; the runner calls it at stage boundaries (cheap: a few additions)."""

    def __init__(self, device, workers: int, encoders: int = 1) -> None:
        self.started = time.perf_counter()
        self.device = device  # a torch.device, or its type's name
        self.cuda = getattr(device, "type", device) == "cuda"
        self.workers = workers
        self.encoders = encoders  # busy seconds are summed over them (Ray's actors)
        self.phases: dict[str, float] = {}
        self.images = 0
        self.decode_busy = 0.0
        self.waits = 0.0
        self.requests = self.ready = 0
        self.encode_host = 0.0
        self.device_busy = 0.0  # GPU seconds, from events
        self.encoded_images = 0
        self._pending: list[tuple[Any, Any, int]] = []  # (start event, end event, images) of batches in flight
        self._last_end = None
        self._steady: dict[str, float] | None = None  # counters when the first batch came back

    def phase(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def mark(self, name: str) -> None:
        """A moment since the run's start (first_batch_ready, first_batch_done), recorded once."""
        self.phases.setdefault(name, time.perf_counter() - self.started)

    def chunk(self, images: int, busy: float, waited: float) -> None:
        self.images += images
        self.decode_busy += busy
        self.waits += waited
        self.requests += 1
        self.ready += waited < 1e-3

    def events(self):
        """A timing event recorded on the current stream before a batch is queued (None on a CPU)."""
        if not self.cuda:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def close_events(self, start) -> tuple[Any, Any]:
        if start is None:
            return None, None
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        return start, end

    def batch_launched(self, images: int, host_seconds: float, start_event=None, end_event=None) -> None:
        self.mark("first_batch_ready")
        self.encode_host += host_seconds
        if start_event is not None:
            self._pending.append((start_event, end_event, images))
        else:  # a CPU batch is done when its launch returns
            self.encoded_images += images
            self.batch_done()

    def batch_done(self) -> None:
        """A batch came back to the host (on a GPU: the oldest, in order); device time is read from events that
        have completed, never waited for."""
        self._account(wait=False)
        if self._steady is None:
            self.mark("first_batch_done")
            self._steady = self._counters()

    def _account(self, wait: bool) -> None:
        while self._pending:
            start, end, images = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self._pending.pop(0)
            busy = start.elapsed_time(end)
            if self._last_end is not None:  # queued behind the previous batch: count from where that one ended
                busy = min(busy, max(0.0, self._last_end.elapsed_time(end)))
            self.device_busy += busy / 1e3
            self.encoded_images += images
            self._last_end = end

    def _counters(self) -> dict[str, float]:
        return {"t": time.perf_counter(), "images": self.images, "decode_busy": self.decode_busy,
                "waits": self.waits, "requests": self.requests, "ready": self.ready, "encode_host": self.encode_host,
                "device_busy": self.device_busy, "encoded": self.encoded_images}

    def rates(self, writer_busy: float, writer_bytes: int, writer_fill: float) -> StageRates:
        """The steady-state figures (called once the run's batches are all back: waiting costs nothing then)."""
        self._account(wait=True)
        end = self._counters()
        start = self._steady
        if start is None or end["t"] - start["t"] < 1e-3 or end["encoded"] - start["encoded"] < 1:
            start = {k: 0.0 for k in end} | {"t": self.started}  # too short a steady state: the whole run
        d = {k: end[k] - start[k] for k in end}
        seconds = max(d["t"], 1e-9)
        busy = d["device_busy"] if self.cuda else d["encode_host"]
        capacity = self.workers or 1
        return StageRates(
            seconds=seconds, images=int(d["images"]), workers=self.workers,
            decode_img_s=d["images"] / seconds,
            decode_busy=min(1.0, d["decode_busy"] / (capacity * seconds)),
            decode_capacity_img_s=capacity * d["images"] / d["decode_busy"] if d["decode_busy"] else 0.0,
            encoder_busy=min(1.0, busy / (self.encoders * seconds)), encoder_img_s=d["encoded"] / busy if busy else 0.0,
            encoders=self.encoders,
            writer_mb_s=writer_bytes / 1e6 / writer_busy if writer_busy else 0.0,
            writer_busy=min(1.0, writer_busy / (time.perf_counter() - self.started)),
            data_wait=min(1.0, d["waits"] / seconds),
            loader_ready=d["ready"] / d["requests"] if d["requests"] else 0.0,
            writer_queue_fill=writer_fill,
        )


def write_stats(out: StoreRoot, run_id: str, record: dict[str, Any]) -> None:
    """OUT/stats/<run>.json, written whole; a read-only or full disk only costs the file."""
    try:
        store_root(out).write(f"{STATS_DIR}/{run_id}.json", json.dumps(record, indent=1).encode())
    except (OSError, StoreError):
        pass


def latest_stats(out: StoreRoot) -> dict[str, Any] | None:
    """The most recent run's stats file of a store, or None."""
    root = store_root(out)
    try:
        files = sorted((e for e in root.list(STATS_DIR) if e.name.endswith(".json")), key=lambda e: e.modified)
        return json.loads(root.read(f"{STATS_DIR}/{files[-1].name}")) if files else None
    except (OSError, ValueError):
        return None


def describe(stats: dict[str, Any]) -> list[str]:
    """Lines for ``vitok info``: the phases and the stages of a stats record."""
    phases = stats.get("phases", {})
    s = stats.get("stages", {})
    lines = ["start-up   " + ", ".join(f"{k.replace('_', ' ')} {phases[k]:.2f} s" for k in STARTUP_PHASES
                                      if k in phases)]
    if s:
        workers = _count(s["workers"], "worker")
        encoders = s.get("encoders", 1)
        encoder = "encoder" if encoders == 1 else f"encoders ({encoders}, mean)"
        unit = per_second(stats.get("media", "images"))
        lines.append(f"stages     decode {s['decode_img_s']:.1f} {unit} ({workers}, "
                     f"{_pct(s['decode_busy'])} busy); {encoder} {_pct(s['encoder_busy'])} busy, "
                     f"{s['encoder_img_s']:.1f} {unit}; writer {s['writer_mb_s']:.1f} MB/s, {_pct(s['writer_busy'])} "
                     f"busy; loop waited {_pct(s['data_wait'])}")
    if stats.get("bottleneck"):
        lines.append(f"limit      {stats['bottleneck']}")
    return lines

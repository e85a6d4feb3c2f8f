"""``--engine ray``: the same run, with the work spread over a Ray cluster by Ray Data.

    plan units (driver) -> read + decode + batch: one CPU task per unit, any node (``decode_unit``)
      -> encode: a pool of actors, one per GPU (CPU actors on a cluster without GPUs) (``EncodeActor``)
      -> the driver: batches put back in unit order, written and committed by vitok's committer, unit by unit

Only the middle is Ray's: placement, backpressure and retries are Ray Data's (a task or actor that dies is
retried; a batch computed twice is kept once, by its place in its unit). Everything else is the local run's:
``RayRun`` is ``runner.Run`` with another ``_loop``, so the plan, header, claims (held by the driver), commit
protocol, retries of failed inputs and resume are the same code. The stages inside the tasks are vitok's too: the
input readers and decoder (``loader.UnitReading``), the batcher and the device stage (``device.DevicePipeline``).

Why the store is the same as a single process's: a decode task reads one whole unit in plan order and cuts it into
batches with the same ``Batcher`` and token budget as the local loop, so every batch holds the same images as there
(batches never span units), and the encoder sees the same batches. Only the order of the sidecar's records of
skipped images among the others can differ (it already differs between a CPU and a GPU run); readers look records
up by key.

Only the driver talks to the store (header, plan, claims, commits: a folder or a bucket, with the driver's
credentials and ``--storage-option``); each decode task is sent its unit with the unit's inputs in it
(``UnitRef.inlined``), so the workers need the inputs at the same paths (or URLs they can read) and the model, never
OUT, its plan or the bucket's credentials.

What scales: decoding (tasks on every node's CPUs; CPU-only nodes add decode rate) and encoding (an actor per GPU).
What does not, yet: every token travels to the driver, which writes them all (one writer per job, bound by its
network and disk; ``--num-parts`` splits a job into several drivers); a unit is decoded by one task, so fewer units in
flight than cores leaves cores idle; an actor finishes each batch before taking the next (the local engine keeps two
queued on a GPU).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..pipeline.batcher import Batcher, default_budget
from ..pipeline.types import UnitEnd
from ..storage.records import ImageRecord
from .options import ExtractOptions
from .ray_connect import join
from .run_stats import StageMeter
from .runner import Run, unit_record
from .summary import ProgressEvent

logger = logging.getLogger(__name__)

CPU_ACTOR_CORES = 4  # cores per CPU encode actor (torch threads); half the cluster's cores go to encoding


@dataclass
class Step:
    """One message of a unit's stream, in order (``seq``): skipped inputs, then a batch, or the unit's end."""

    unit: int
    seq: int
    records: list[ImageRecord] = field(default_factory=list)  # skipped / failed inputs before this batch
    items: list | None = None  # loader.Item of the batch (patches packed in ``patches``), until it is encoded
    patches: Any = None  # the batch's uint8 patches, concatenated (torch tensor)
    rows: list[int] = field(default_factory=list)  # patch rows of each item
    encoded: list | None = None  # device.EncodedBatch, after the encoder
    end: bool = False  # the unit's last step
    unit_error: str | None = None
    unit_failed: bool = False
    patches: int = 0  # encoded (for the summary)
    encode_seconds: float = 0.0  # the actor's time on this batch (run_stats: the encoder's busy time)
    device_wait_seconds: float = 0.0
    decoded: int = 0  # inputs this step carries (its batch and the skipped ones before it)
    decode_seconds: float = 0.0  # the decode task's busy time on them (reading, decoding, batching)
    decoder: str = ""  # the process that decoded them, "host:pid"
    encoder: str = ""  # the actor's process that encoded the batch, "host:pid"
    encoded_images: int = 0

    def pack(self) -> Step:
        import torch

        present = [item.image.patches for item in self.items or () if item.image.patches is not None]
        if present:
            self.patches, self.rows = torch.cat(present), [len(p) for p in present]
            for item in self.items:
                item.image.patches = None
        return self

    def unpack(self) -> list:
        views = iter(self.patches.split(self.rows) if self.patches is not None else ())
        for item in self.items:
            if item.image.jpeg is None:
                item.image.patches = next(views)
        self.patches, self.rows = None, []
        return self.items


def _row(step: Step) -> dict[str, Any]:
    return {"unit": step.unit, "seq": step.seq, "step": pickle.dumps(step, protocol=5)}


# ---- the CPU side: one task per unit ----------------------------------------------------------------------------


def unit_steps(unit, kind: str, reader_options, preprocessor, budget: int) -> Iterator[Step]:
    """A unit's inputs read and decoded in plan order by the job's preprocessor (images or videos:
    ``Job.preprocessor``), cut into the local loop's batches (the same ``Batcher``)."""
    from ..pipeline.loader import Task, UnitReading

    batcher: Batcher = Batcher(budget)
    pending: list[ImageRecord] = []
    seq = 0
    busy = 0.0  # decode seconds not yet handed on with a step
    me = process_name()

    def step(**values) -> Step:
        nonlocal seq, pending, busy
        made = Step(unit.index, seq, pending, **values, decode_seconds=busy, decoder=me)
        made.decoded = len(made.items or ()) + len(made.records)
        seq, pending, busy = seq + 1, [], 0.0
        return made

    for chunk in UnitReading([Task(unit, per_chunk=preprocessor.per_chunk)], kind, reader_options, preprocessor):
        started = time.perf_counter()
        busy += chunk.busy
        for item in chunk.unpack():
            if item.image is None:
                pending.append(item.record)
                continue
            for closed in batcher.add(unit.index, item, item.image.num_patches):
                busy += time.perf_counter() - started
                yield step(items=closed).pack()
                started = time.perf_counter()
        busy += time.perf_counter() - started
        if chunk.end:
            for closed in batcher.flush(unit.index):
                yield step(items=closed).pack()
            yield step(end=True, unit_error=chunk.unit_error, unit_failed=chunk.unit_failed)


def process_name() -> str:
    """This process, as the stage figures count workers and actors: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def decode_unit(row: dict[str, Any], kind: str, reader_options, preprocessor, budget: int) -> Iterator[dict[str, Any]]:
    """``Dataset.flat_map``: a planned unit -> its steps, streamed (memory holds one batch, not the unit)."""
    for step in unit_steps(pickle.loads(row["unit"]), kind, reader_options, preprocessor, budget):
        yield _row(step)


# ---- the accelerator side: a pool of actors ---------------------------------------------------------------------


class EncodeActor:
    """``Dataset.map_batches`` actor: loads the encoder once, encodes one vitok batch per call."""

    def __init__(self, source, device: str, dtype: str, seed: int, attention: str, preprocess,
                 features: tuple[str, ...], pool: str, store_dtype: str, token_order: str, pool_steps: bool = False,
                 chunk_rows: int | None = None) -> None:
        from ..encoder.inference import load_encoder
        from ..pipeline.device import DevicePipeline

        encoder = load_encoder(source, device, dtype, seed=seed, attention=attention, preprocess=preprocess)
        # (as the local run's: a video's steps pooled apart with --pool-steps, a long one encoded in temporal pieces)
        self.pipeline = DevicePipeline(encoder, features, pool, store_dtype, token_order, pool_steps=pool_steps,
                                       chunk_rows=chunk_rows)
        self.name = process_name()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [self._encode(pickle.loads(data)) for data in batch["step"]]
        return {"unit": [r["unit"] for r in rows], "seq": [r["seq"] for r in rows], "step": [r["step"] for r in rows]}

    def _encode(self, step: Step) -> dict[str, Any]:
        from ..pipeline.device import Batch

        if step.items:
            pipeline = self.pipeline
            patches, seconds, waited = pipeline.patches, pipeline.encode_seconds, pipeline.device_wait_seconds
            # one batch at a time: a call returns its own batch (no queue left behind between calls)
            step.encoded = pipeline.submit(Batch(step.unit, step.unpack())) + pipeline.drain()
            step.patches = pipeline.patches - patches
            step.encode_seconds = pipeline.encode_seconds - seconds
            step.device_wait_seconds = pipeline.device_wait_seconds - waited
            step.encoded_images, step.encoder = len(step.items), self.name
            step.items = None
        return _row(step)


# ---- the driver -------------------------------------------------------------------------------------------------


def connect(address: str | None, timeout: float) -> bool:
    """Join the cluster at ``address`` (or the one Ray finds, or a new local instance), waiting at most ``timeout``
    seconds for it to answer (``ray_connect``); True if this call started Ray.

    The driver's vitok travels with the job (``py_modules``), so every worker runs the same code as the driver."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray Data: pip install 'ray[data]'") from exc
    package = Path(__file__).resolve().parents[1]  # vitok/, whatever folder this module sits in
    return join(address, timeout, {"py_modules": [str(package)],
                                   "env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})


def cluster_devices(options: ExtractOptions) -> str:
    """The encode actors' device kind: cuda when the cluster has GPUs (unless --device cpu), else cpu."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if options.device == "cpu" or (options.device != "auto" and not options.device.startswith("cuda")):
        return "cpu"
    if not gpus:
        if options.device.startswith("cuda"):
            raise UsageError(f"--device {options.device}: the Ray cluster has no GPUs (use --device cpu or auto)")
        return "cpu"
    return "cuda"


def _bf16_on_cluster_gpu() -> bool:
    import ray

    @ray.remote(num_gpus=1)
    def probe() -> bool:
        import torch

        return torch.cuda.is_bf16_supported()

    return ray.get(probe.remote())


class RayRun(Run):
    """The run with Ray Data spreading decode and encode; set-up, claims, commits and summary are ``Run``'s."""

    engine = "ray"
    configure_phase = "ray_init"  # configure joins (or starts) the cluster: Ray's start-up, apart from the plan

    @classmethod
    def configure(cls, options: ExtractOptions) -> tuple[ExtractOptions, dict[str, Any]]:
        """Join the cluster and fix what depends on it before the job is prepared: the actors' device and compute
        dtype (stored in the settings); the driver itself loads the encoder on its CPU, only for its hash."""
        if options.decode == "gpu":
            raise UsageError("--decode gpu is not available with --engine ray yet (use --decode exact)")
        if options.reuse:
            raise UsageError("--reuse is not available with --engine ray yet (its actors encode every image; use the "
                             "local engine to take tokens from other stores)")
        if options.workers is not None:
            logger.info("--workers is ignored with --engine ray: Ray decides how many decode tasks run")
        started = connect(options.address, options.connect_timeout)
        kind = cluster_devices(options)
        dtype = options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if kind == "cuda" and _bf16_on_cluster_gpu() else "float32"
        return options.replace(device="cpu", dtype=dtype), {"actor_device": kind, "started_ray": started}

    @classmethod
    def release(cls, context: dict[str, Any]) -> None:
        """A Ray instance ``configure`` started in this process is shut down (the caller of ``vitok.extract`` keeps
        none running after a refused job)."""
        if context.get("started_ray"):
            import ray

            ray.shutdown()

    def __init__(self, job, progress=None, started: float | None = None, actor_device: str = "cpu",
                 started_ray: bool = False) -> None:
        super().__init__(job, progress, started)
        self.actor_device, self.started_ray = actor_device, started_ray

    def _encode_device(self, encoder) -> str:
        return self.actor_device

    def execute(self):
        try:
            return super().execute()
        finally:
            if self.started_ray:
                import ray

                ray.shutdown()

    def _loop(self, units, encoder, pipeline, committer, donors=None, within_units: bool = True) -> None:
        """The Ray Data pipeline in place of the local loop. Duplicates are encoded again here (content ids are
        recorded; ``Donors`` is the local loop's)."""
        import ray

        from ..pipeline.loader import in_unit_order

        job, opts = self.job, self.job.options
        budget = opts.token_budget or default_budget(self.actor_device)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        ds = ray.data.from_items([{"unit": pickle.dumps(u.inlined())} for u in units],  # (no plan on the nodes)
                                 override_num_blocks=len(units))
        ds = ds.flat_map(decode_unit, fn_kwargs={"kind": self.plan.kind, "reader_options": job.reader_options,
                                                 "preprocessor": job.preprocessor(cut_in_time=False),  # (whole videos)
                                                 "budget": budget}, num_cpus=1)
        actor = {"source": job.source, "device": self.actor_device, "dtype": str(job.dtype).removeprefix("torch."),
                 "seed": opts.seed, "attention": opts.attention, "preprocess": job.preprocess,
                 "features": job.features, "pool": opts.pool, "store_dtype": opts.store_dtype,
                 "token_order": opts.token_order, "pool_steps": opts.pool_steps, "chunk_rows": budget}
        ds = ds.map_batches(EncodeActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs=actor,
                            **self._actors(opts))
        by_index = {u.index: u for u in units}
        totals = [u.expected for u in units]
        total = None if any(t is None for t in totals) else sum(totals)
        # the stage figures come with the steps: each decode task's and actor's own time (``run_stats``)
        meter = self.meter = StageMeter("cpu", 0)
        meter.started = self.started
        decoders: set[str] = set()
        encoders: set[str] = set()
        waited = 0.0
        seen = skipped = shards = 0
        for step in in_unit_order(self._steps(ds)):
            meter.chunk(step.decoded, step.decode_seconds, self.wait_seconds - waited)
            waited = self.wait_seconds
            decoders.add(step.decoder)
            if step.encoded_images:
                encoders.add(step.encoder)
                meter.batch_launched(step.encoded_images, step.encode_seconds)
            for record in step.records:
                committer.record(step.unit, record)
            seen += len(step.records)
            skipped += len(step.records)
            for batch in step.encoded or ():
                committer.put([batch])
                seen += len(batch.records) + len(batch.skipped)
                skipped += len(batch.skipped)
                self.counts.batches_encoded += 1
                self.counts.images_encoded += len(batch.records) + len(batch.skipped)
            pipeline.patches += step.patches
            pipeline.encode_seconds += step.encode_seconds
            pipeline.device_wait_seconds += step.device_wait_seconds
            if step.end:
                committer.put([UnitEnd(step.unit, unit_record(by_index[step.unit], step))])
                shards += 1
            if self.progress is not None:
                self.progress(ProgressEvent(seen, total, pipeline.patches, skipped,
                                            time.perf_counter() - self.started, shards, len(units), self.job.media))
        meter.workers, meter.encoders = len(decoders - {""}), max(1, len(encoders))
        if shards != len(units):
            raise RuntimeError(f"the Ray job ended with {len(units) - shards} unit(s) unfinished")

    def _actors(self, opts: ExtractOptions) -> dict[str, Any]:
        """The encode pool: one actor per GPU; without GPUs, CPU actors of a few cores each over half the cores."""
        import ray

        resources = ray.cluster_resources()
        if self.actor_device == "cuda":
            return {"compute": ray.data.ActorPoolStrategy(size=max(1, int(resources.get("GPU", 0)))), "num_gpus": 1}
        cores = max(1, int(resources.get("CPU", 1)) // 2)
        actors = max(1, cores // CPU_ACTOR_CORES)
        return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": max(1, cores // actors)}

    def _steps(self, ds) -> Iterator[Step]:
        """The encoded steps as Ray hands them over (any order; a step computed twice arrives twice)."""
        rows = iter(ds.iter_rows())
        while True:
            start = time.perf_counter()
            try:
                row = next(rows)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - start
            yield pickle.loads(row["step"])


__all__ = ["EncodeActor", "RayRun", "Step", "connect", "decode_unit", "unit_steps"]

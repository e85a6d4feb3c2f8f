"""``vitok.extract``: wire the stages together.

    plan (storage.plan) -> decode workers (loader) -> batcher -> device pipeline (device, pooling included)
    -> committer thread (committer: shard sinks, commits) -> store (vitok.storage)

What to do is decided first, without writing anything (``job``); this module only starts the stages, runs the loop
and reports. SIGTERM (preemption) and SIGINT stop the run cleanly: unfinished shards are dropped, finished ones
stay, and a rerun of the same command resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar

from ..environment import describe_environment
from ..errors import SettingsMismatchError, StoreError
from ..pipeline.batcher import Batcher, default_budget
from ..pipeline.committer import CommitStats, Committer
from ..pipeline.dedupe import Deduplicator, Donors, check_reuse
from ..pipeline.types import RunCounts
from ..storage import RunHeader, SidecarStamp, get_format, new_store
from ..storage.claims import Claims
from ..storage.maintenance import (
    drop_superseded_data,
    remove_damaged,
    remove_plan_leftovers,
    retire_superseded,
    wipe_store,
)
from ..storage.plan import Plan, load_plan, write_generation, write_update
from ..storage.plan.retries import base_and_attempt, earlier_attempts
from ..storage.records import Settings, UnitInfo
from ..storage.roots import store_root
from ..storage.shards import committed, remove_temps, temps_by_shard
from .job import Job, Work, check_committed, remaining_work
from .options import ExtractOptions
from .run_stats import RunStats, StageMeter, verdict, write_stats
from .settings_schema import check_settings, make_settings, new_header
from .summary import ExtractSummary, ProgressEvent

if TYPE_CHECKING:
    from ..pipeline.device import DevicePipeline

logger = logging.getLogger(__name__)


class Run:
    engine: ClassVar[str] = "local"  # --engine
    configure_phase: ClassVar[str | None] = None  # the start-up phase ``configure``'s time is reported as, if any

    def __init__(self, job: Job, progress: Callable[[ProgressEvent], None] | None = None,
                 started: float | None = None) -> None:
        self.job, self.progress = job, progress
        self.started = started if started is not None else time.perf_counter()
        self.wait_seconds = 0.0
        self.phases: dict[str, float] = {}  # start-up (vitok.run.run_stats); the loop's meter adds its own
        self.meter: StageMeter | None = None
        self.counts = RunCounts()

    @classmethod
    def configure(cls, options: ExtractOptions) -> tuple[ExtractOptions, dict[str, Any]]:
        """Options as the job should be prepared with, and what the engine's constructor needs besides the job."""
        return options, {}

    @classmethod
    def release(cls, context: dict[str, Any]) -> None:
        """Give back what ``configure`` acquired when the job is refused before a run is made of it (a store that
        cannot be reached, other settings): the run's own end does it otherwise."""

    # ---- set-up: the first writes happen here ----------------------------------------------------------------

    def execute(self) -> ExtractSummary:
        job = self.job
        if job.part.launcher in ("torchrun", "slurm"):
            logger.info("part %s from the %s environment (%s)", job.part.label, job.part.launcher, job.part.origin)
        plan = job.plan
        if plan is not None and job.header is not None and job.plan_diff is None:
            work = remaining_work(job, plan, job.header.fingerprint)
            if not work.todo:  # nothing to do: no model, no writes (a finished store on a read-only mount)
                logger.info("nothing to do: all %d shard(s) of part %s are done", work.done_shards, job.part.label)
                self._tidy(plan, best_effort=True)
                return self._summary(work, CommitStats(), None, None)
        from ..encoder.inference import load_encoder  # torch: only once there is work to do

        encoder = load_encoder(job.source, job.device, job.dtype, seed=job.options.seed,
                               attention=job.options.attention, preprocess=job.preprocess)
        settings = make_settings(job, encoder.weights_hash)
        if job.header is not None:
            check_settings(job, encoder.weights_hash)
        elif not job.options.overwrite:
            check_committed(job.out, settings.fingerprint)
        for store in job.options.reuse or ():
            check_reuse(store_root(store, "--reuse", job.options.storage_options), settings)
        self.phases |= {k: v for k, v in encoder.load_seconds.items() if k != "model_built"}
        started = time.perf_counter()
        header = self._write_header(settings, encoder)
        plan = self.plan = self._write_plan(plan)
        retire_superseded(job.out, plan, get_format(job.options.format))  # before any shard of this plan commits
        self.phases["plan"] = self.phases.get("plan", 0.0) + time.perf_counter() - started
        # again now that the model is loaded: other processes may have committed shards in the meantime
        work = remaining_work(job, plan, header.fingerprint)
        claims = Claims(job.out)
        claims.start()
        try:
            mine, elsewhere = self._claim(claims, work)
            stats, pipeline = self._run(encoder, mine, claims, header, work) if mine else (CommitStats(), None)
        finally:
            claims.stop()
        self._tidy(plan)
        summary = self._summary(work, stats, pipeline, encoder, elsewhere)
        if summary.shards_other_parts and job.part.count > 1:
            logger.info("%d shard(s) of other parts are not done yet (this was part %s)", summary.shards_other_parts,
                        job.part.label)
        return summary

    def _write_header(self, settings: Settings, encoder) -> RunHeader:
        job = self.job
        if job.options.overwrite:
            wipe_store(job.out)
        job.out.prepare()
        environment = describe_environment(encoder)
        header = new_header(job, settings, environment)
        stored, created = new_store(job.out, header)
        if not created and stored.fingerprint != header.fingerprint:
            raise SettingsMismatchError(f"another process started {job.out} with other settings at the same "
                                        "moment; use the same settings in every process")
        return stored

    def _tidy(self, plan: Plan, best_effort: bool = False) -> None:
        """Superseded shards out of where plain readers look, and their data dropped once the plan is done, and claims
        of committed shards left by killed runs removed (a store written by an older vitok is put right by a resume;
        a read-only one, ``best_effort``, is left as it is)."""
        try:
            retire_superseded(self.job.out, plan, get_format(self.job.options.format))
            dropped = drop_superseded_data(self.job.out, plan)
        except (OSError, StoreError) as exc:  # (a read-only mount; read-only credentials)
            if not best_effort:
                raise
            logger.debug("superseded shards of %s left in place: %s", self.job.out, exc)
            return
        if dropped:
            logger.info("the plan is done: removed the data of %d superseded shard(s)", dropped)
        try:  # harmless where they stay: never a reason to fail a run whose work is done
            left = Claims(self.job.out).remove_over(lambda: committed(self.job.out))
        except (OSError, StoreError) as exc:
            logger.debug("claims of committed shards in %s left in place: %s", self.job.out, exc)
            return
        if left:
            logger.info("removed %d claim(s) of committed shards left by killed runs", left)

    def _write_plan(self, plan: Plan | None) -> Plan:
        job = self.job
        if plan is None or job.plan_diff is not None:
            remove_plan_leftovers(job.out)
        if plan is None:
            write_generation(job.out, job.listing, job.options.shard_size, 0, 0, job.sources, "initial", None,
                             job.reader_options.to_dict(), detect_changes=job.options.detect_changes,
                             files_from=job.files_from, list_cwd=job.list_cwd)
        elif job.plan_diff is not None:
            generation = write_update(job.out, plan, job.listing, job.plan_diff, job.sources, job.listing_digest,
                                      job.reader_options.to_dict(), job.options.detect_changes, job.files_from,
                                      job.list_cwd)
            logger.info("update: %s since the store was planned; planned generation %d", job.plan_diff.describe(),
                        generation.number)
        return load_plan(job.out)

    def _claim(self, claims: Claims, work: Work):
        mine, elsewhere = [], 0
        leftovers = temps_by_shard(self.job.out)  # one listing for every unit
        for unit in work.todo:
            if claims.try_claim(unit.name):
                remove_temps(self.job.out, unit.name, leftovers)
                # damaged shards of the unit (its data does not check out: the sidecar no longer vouches for it)
                # go, its retries' with it: the unit is read again whole
                for name in sorted(n for n in work.damaged if n != unit.name
                                   and base_and_attempt(n, self.plan.legacy_names)[0] == unit.name):
                    remove_damaged(self.job.out, name)
                if unit.name in work.damaged:
                    remove_damaged(self.job.out, unit.name)
                mine.append(unit)
            else:
                elsewhere += 1
        if elsewhere:
            logger.info("%d shard(s) are being written by another running process; skipping them", elsewhere)
        return mine, elsewhere

    # ---- the loop -------------------------------------------------------------------------------------------

    def _run(self, encoder, units, claims: Claims, header: RunHeader, work: Work):
        from ..inputs.gpu_decode import device_decode
        from ..pipeline.device import DevicePipeline

        job, opts = self.job, self.job.options
        fmt = get_format(opts.format)
        pipeline = DevicePipeline(encoder, job.features, opts.pool, opts.store_dtype, opts.token_order,
                                  decode=device_decode(encoder.preprocess, encoder.device), pool_steps=opts.pool_steps,
                                  chunk_rows=opts.token_budget or default_budget(encoder.device.type))
        donors = Donors(list(job.features))
        donors.add_store(job.out, header.fingerprint, exclude=work.damaged)
        for store in opts.reuse or ():
            donors.add_reuse(store_root(store, "--reuse", opts.storage_options))
        committer = Committer(job.out, fmt, job.layouts, opts.store_dtype, opts.compression, claims,
                              SidecarStamp(header.fingerprint, job.part.label),
                              on_commit=lambda sidecar: donors.add_sidecar(job.out, sidecar)).start()
        for unit in units:
            committer.begin(unit, work.bindings.digest(unit.unit) if work.bindings else None,
                            earlier_attempts(unit, self.plan.legacy_names))
        logger.info("part %s: %d shard(s) to do", job.part.label, len(units))
        try:
            units = self._carry(units, committer, donors)
            self._loop(units, encoder, pipeline, committer, donors, fmt.reads_back)
            stats = committer.finish()
        except BaseException:
            committer.abort()
            raise
        finally:
            donors.close()
        return stats, pipeline

    def _carry(self, units, committer: Committer, donors: Donors) -> list:
        """Unchanged images of shards --update replaced go straight to their new shards (``pipeline.carry``); the
        units left with something to read are returned."""
        from ..pipeline.carry import carry
        from ..pipeline.types import UnitEnd

        if self.plan.kind != "files":
            return units
        carried = carry(self.job.out, self.plan, units, donors, self.job.options.detect_changes)
        for unit in units:
            if unit.index in carried.batches:
                committer.put([carried.batches[unit.index]])
        for unit in carried.whole:
            committer.put([UnitEnd(unit.index, unit_record(unit, None))])
        self.counts.carried += carried.count
        return carried.to_read

    def _loop(self, units, encoder, pipeline: DevicePipeline, committer: Committer, donors: Donors | None = None,
              within_units: bool = True) -> None:
        from ..pipeline.types import Batch, EncodedBatch
        from ..pipeline.workers import default_workers, load_units

        opts = self.job.options
        budget = opts.token_budget or default_budget(encoder.device.type)
        batcher: Batcher = Batcher(budget)
        workers = opts.workers if opts.workers is not None else default_workers(encoder.device)
        by_index = {u.index: u for u in units}
        totals = [u.expected for u in units]
        total = None if any(t is None for t in totals) else sum(totals)

        meter = self.meter = StageMeter(encoder.device, workers)
        meter.started = self.started

        dedupe = Deduplicator(donors if donors is not None else Donors(list(self.job.features)), committer,
                              self.counts, within_units, {u.index: u.name for u in units})

        def deliver(events) -> None:
            """What the device stage finished goes to the committer, in order; the meter counts the batches."""
            for event in events:
                if isinstance(event, EncodedBatch):
                    meter.batch_done()
            dedupe.deliver(events)

        def submit(unit: int, items, images: int | None = None) -> None:
            self.counts.batches_encoded += 1
            self.counts.images_encoded += len(items) if images is None else images
            meter.mark("first_batch_ready")
            events = meter.events()
            start = time.perf_counter()
            finished = pipeline.submit(Batch(unit, items))
            meter.batch_launched(len(items) if images is None else images, time.perf_counter() - start,
                                 *meter.close_events(events))
            deliver(finished)

        seen = skipped = shards = 0
        started = time.perf_counter()
        chunks = load_units(units, self.plan.kind, self.job.reader_options,
                            self.job.preprocessor(budget), workers, pin_memory=encoder.device.type == "cuda")
        meter.phase("workers_ready", time.perf_counter() - started)
        if encoder.needs_warm_up(workers):  # while the workers decode the first images
            started = time.perf_counter()
            encoder.warm_up(self.job.features, opts.token_order)
            meter.phase("warm_up", time.perf_counter() - started)
        try:
            for chunk in self._timed(chunks):
                for item in chunk.unpack():
                    if item.part is not None:  # a piece of a video cut in time: encoded alone, as it comes
                        for closed in batcher.flush(chunk.unit):  # (what came before it, first)
                            submit(chunk.unit, closed)
                        seen += item.last
                        if item.image is None:  # its decoding stopped: the pieces before are dropped
                            pipeline.abandon(chunk.unit, item.record.key)
                            skipped += 1
                            committer.record(chunk.unit, item.record)
                        else:
                            if item.last:  # its content id is known now: later copies in the unit are copies
                                dedupe.first(chunk.unit, item.record)
                            submit(chunk.unit, [item], images=int(item.last))
                        continue
                    seen += 1
                    if item.image is None:
                        skipped += 1
                        committer.record(chunk.unit, item.record)
                        continue
                    if dedupe.skips(chunk.unit, item):
                        continue
                    for closed in batcher.add(chunk.unit, item, item.image.num_patches):
                        submit(chunk.unit, closed)
                dedupe.send_copies(chunk.unit)
                if chunk.end:
                    dedupe.end(chunk.unit)
                    for closed in batcher.flush(chunk.unit):
                        submit(chunk.unit, closed)
                    deliver(pipeline.end(chunk.unit, unit_record(by_index[chunk.unit], chunk)))
                    shards += 1
                if self.progress is not None:
                    self.progress(ProgressEvent(seen, total, pipeline.patches, skipped,
                                                time.perf_counter() - self.started, shards, len(units),
                                                self.job.media))
        finally:
            chunks.close()  # on any error: stop the decode workers now, not at interpreter exit
        deliver(pipeline.drain())

    def _timed(self, chunks):
        while True:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            self.wait_seconds += waited
            if self.meter is not None:
                self.meter.chunk(len(chunk.items), chunk.busy, waited)
            yield chunk

    def _summary(self, work: Work, stats: CommitStats, pipeline, encoder, elsewhere: int = 0) -> ExtractSummary:
        seconds = time.perf_counter() - self.started
        done = stats.ok + stats.skipped + stats.failed
        planned = [u.expected for u in work.mine]
        run_stats = self._run_stats(stats, encoder, seconds)
        return ExtractSummary(
            out=str(self.job.out), part=self.job.part.label,
            images_planned=None if any(p is None for p in planned) else sum(planned),
            ok=stats.ok, skipped=stats.skipped, failed=stats.failed, already_done=work.done_images,
            shards_written=stats.shards_written, shards_already_done=work.done_shards, shards_elsewhere=elsewhere,
            shards_other_parts=work.other_parts_pending, seconds=round(seconds, 3),
            images_per_second=round(done / seconds, 3) if seconds else 0.0,
            patches=pipeline.patches if pipeline else 0, output_bytes=stats.output_bytes,
            data_wait_seconds=round(self.wait_seconds, 3),
            encode_seconds=round(pipeline.encode_seconds, 3) if pipeline else 0.0,
            device_wait_seconds=round(pipeline.device_wait_seconds, 3) if pipeline else 0.0, **asdict(self.counts),
            nonfinite=stats.nonfinite,
            skipped_reasons=stats.reasons,
            phases=run_stats["phases"], stages=run_stats["stages"], bottleneck=run_stats["bottleneck"],
            media=self.job.media,
        )

    def _encode_device(self, encoder) -> str:
        """Where the batches were encoded (the stage figures' device)."""
        return str(encoder.device) if encoder else "cpu"

    def _run_stats(self, stats: CommitStats, encoder, seconds: float) -> dict[str, Any]:
        """Phases, stage rates and the verdict; written to OUT/stats/<run>.json when the run encoded anything."""
        result = RunStats(dict(self.phases), device=self._encode_device(encoder), decode=self.job.options.decode,
                          engine=self.engine, media=self.job.media)
        if self.meter is None:
            return result.to_dict()
        result.phases |= self.meter.phases
        if not self.counts.images_encoded:  # every input copied, reused or skipped: no stage to judge
            return result.to_dict()
        result.stages = self.meter.rates(stats.busy_seconds, stats.output_bytes, stats.queue_fill)
        result.bottleneck = verdict(result, seconds + result.phases.get("imports", 0.0))
        record = result.to_dict()
        write_stats(self.job.out, f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
                    record | {"seconds": round(seconds, 3), "images": stats.ok + stats.skipped + stats.failed})
        return record


def unit_record(unit, chunk) -> UnitInfo:
    """What the sidecar says about the input shard: where it came from, and why it stopped early if it did."""
    info = UnitInfo(unit.kind, unit.generation, unit.unit, unit.attempt)
    if unit.kind != "files":
        archive = unit.archive()
        info.path, info.row_group, info.bytes, info.mtime_ns = archive.path, archive.row_group, archive.bytes, \
            archive.mtime_ns
        info.sha256 = archive.sha256
    if chunk is not None and chunk.unit_error:
        info.error, info.failed = chunk.unit_error, chunk.unit_failed
        logger.warning("shard %s: %s", unit.name, chunk.unit_error)
    return info

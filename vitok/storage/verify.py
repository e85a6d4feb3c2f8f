"""Checking a store: every committed shard against its sidecar (sizes, keys, rows, checksums, settings), and the
store against its plan (shards not done, keys missing or repeated), plus what interrupted runs left behind."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import read_header
from .claims import Claims
from .keys import key_text
from .layout import PLAN_DIR, SHARDS_DIR, SUPERSEDED_DIR
from .plan import load_plan
from .plan.binding import Bindings
from .plan.retries import sidecar_attempt, superseded_shards
from .roots import StoreRoot, store_root
from .shards import check_shard, iter_retired, iter_sidecars, list_shards, repair_hint, temp_files
from .store import attempt_order, current_records


@dataclass
class VerifyReport:
    """What ``vitok verify`` and ``vitok info`` report; both count from here, so they agree. Images are counted
    once each, by their latest record (a retry's replaces the failure it retried), leaving out inputs removed by
    --update; ``images_ok`` holds only images whose shard checks out (the others are ``images_damaged``)."""

    shards_ok: int
    images_ok: int
    images_skipped: int
    images_failed: int
    problems: list[str]
    incomplete: list[str]  # planned shards with no committed sidecar
    in_progress: list[str] = field(default_factory=list)  # claimed by a live run
    leftovers: list[str] = field(default_factory=list)  # temporary files and stale claims of interrupted runs
    input_errors: list[str] = field(default_factory=list)  # archives that could not be read (whole or in part)
    nonfinite: list[str] = field(default_factory=list)  # ok images whose tokens hold NaN/Inf (a warning)
    images_nonfinite: int = 0  # of images_ok: tokens holding NaN/Inf (ImageRecord.nonfinite_values); exports leave
    # them out, and refuse a store where that is every image (all_nonfinite)
    in_view: list[str] = field(default_factory=list)  # superseded shards, or rows, still where plain readers look
    stale: list[str] = field(default_factory=list)  # --sources: inputs changed since they were extracted
    planned_shards: int = 0
    planned_images: int | None = None
    shards_done: int = 0  # planned shards committed (retries of a shard count with it, not again)
    shards_damaged: list[str] = field(default_factory=list)  # committed shards whose data or sidecar is damaged
    images_damaged: int = 0  # recorded ok, in a damaged shard
    images_removed: int = 0  # recorded, but removed from the sources by --update (not counted above)
    media: str = "images"  # what the images_* counts count: "images" or "videos" (the store holds one kind)

    unfinished: list[str] = field(default_factory=list)  # why the store is not finished, one reason each (export
    # refuses it for these): planned shards not done, inputs that could not be read, archives or folders unread

    @property
    def all_nonfinite(self) -> bool:
        """Every ok image's tokens hold NaN/Inf values: an export would write nothing, and refuses the store."""
        return self.images_ok > 0 and self.images_nonfinite == self.images_ok

    @property
    def clean(self) -> bool:
        return not (self.problems or self.unfinished or self.stale or self.in_view or self.all_nonfinite)

    @property
    def finished(self) -> bool:
        """Every planned input has its final outcome (ok, skipped as undecodable); nothing is left to retry."""
        return not self.unfinished

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "clean": self.clean, "finished": self.finished,
                "all_nonfinite": self.all_nonfinite}


def verify_store(out: str | Path | StoreRoot, quick: bool = False, sources: str | None = None,
                 storage_options: dict | None = None) -> VerifyReport:
    """Check every committed shard (checksums too, unless ``quick``) and the plan; nothing is modified.
    ``sources`` (a :mod:`vitok.storage.plan.changes` mode, ``mtime`` or ``hash``): also compare every record with its
    input as it is now, and list the stale ones. ``storage_options``: as ``vitok.open``'s, for ``s3://BUCKET/PREFIX``."""
    root = store_root(out, storage_options=storage_options)
    header = read_header(root)
    plan = load_plan(root)
    problems: list[str] = []
    latest: dict[str, tuple[str, str]] = {}  # key -> (unit, shard) of the record that holds it now
    repeats: list[str] = []
    shards_ok = 0
    status: dict[str, str] = {}
    done: set[str] = set()
    damaged_sidecars: dict[str, str] = {}
    bad_shards: set[str] = set()
    errors: dict[str, str | None] = {}  # unit -> the read error of its last attempt
    unavailable: dict[str, bool] = {}  # unit -> its last attempt could not read the rest of it (to be retried)
    flagged: dict[str, dict[str, int]] = {}  # key -> shard -> NaN/Inf values counted at extraction
    recorded: set[str] = {r.key for sidecar, _ in iter_retired(root) for r in sidecar.records}  # every key any
    # sidecar records (current or not, superseded shards' included)
    superseded = plan.superseded() if plan is not None else set()
    bindings = Bindings(plan.units if plan is not None else [])
    listed = list_shards(root)
    in_view: list[str] = []  # rows plain readers find that are not the store's
    sidecars = attempt_order(list(iter_sidecars(root, damaged_sidecars)))
    retired = superseded_shards(plan, sidecars)
    for sidecar in sidecars:
        base = sidecar_attempt(sidecar)[0]
        if sidecar.shard in retired:  # its records do not count, and it must not be where plain readers look
            if sidecar.count("ok"):
                in_view.append(f"{sidecar.shard}: superseded (by a later plan generation or a later attempt), still "
                               f"in {SHARDS_DIR}/ where plain readers look; the next 'vitok extract -o {root}' moves "
                               f"it to {SHARDS_DIR}/{SUPERSEDED_DIR}/")
            recorded.update(r.key for r in sidecar.records)
            if base in superseded:
                continue
        done.add(base)
        shard_problems = check_shard(root, sidecar, checksums=not quick, listed=listed)
        unbound = bindings.problem(sidecar, base)
        if unbound:  # the plan was written again since: its name holds other inputs now
            shard_problems.append(f"{sidecar.shard}: {unbound}")
        if sidecar.fingerprint is not None and sidecar.fingerprint != header.fingerprint:
            shard_problems.append(f"{sidecar.shard}: written with other settings (fingerprint {sidecar.fingerprint},"
                                  f" the store's {header.fingerprint})")
        if shard_problems:
            bad_shards.add(sidecar.shard)
            shard_problems[0] += f"; {repair_hint(root, sidecar.shard, silent='checksum' in shard_problems[0])}"
        problems += shard_problems
        shards_ok += not shard_problems
        errors[base] = f"{sidecar.shard}: {sidecar.unit.error}" if sidecar.unit.error else None
        unavailable[base] = bool(sidecar.unit.error and sidecar.unit.failed)  # retried by a rerun, not damaged
        keys = Counter(r.key for r in sidecar.records)
        recorded.update(keys)
        repeats += [f"key {k!r} appears {n} times in {sidecar.shard}" for k, n in keys.items() if n > 1]
        counting = current_records(sidecar, plan)  # records of inputs planned again since are not counted
        stale_rows = sum(r.status == "ok" for r in sidecar.records) - sum(r.status == "ok" for r in counting)
        if stale_rows and sidecar.shard not in retired:  # updated by a vitok that replaced files in part
            in_view.append(f"{sidecar.shard}: {stale_rows} row(s) of records a later plan generation replaced, where "
                           "plain readers look (the store was updated by a vitok that kept such shards: the next "
                           "'vitok extract --update' that finds a change replaces it whole)")
        for record in counting:
            if record.status == "ok" and record.nonfinite_values:
                flagged.setdefault(record.key, {})[sidecar.shard] = record.nonfinite_values
            if record.key in latest and latest[record.key][0] != base:  # a retry supersedes its own unit only
                repeats.append(f"key {record.key!r} appears in {latest[record.key][1]} and {sidecar.shard}")
            latest[record.key] = (base, sidecar.shard)
            status[record.key] = record.status
    for shard, why in sorted(damaged_sidecars.items()):
        problems.append(f"{shard}: {why}")
    problems += repeats[:20]
    nonfinite = [f"{key!r}: {shards[latest[key][1]]} NaN/Inf value(s) in its tokens (exports leave it out)"
                 for key, shards in sorted(flagged.items()) if latest[key][1] in shards and status[key] == "ok"]
    removed = plan.removed() if plan is not None else set()
    counted = {key: s for key, s in status.items() if key not in removed}
    damaged_ok = sum(1 for key, s in counted.items() if s == "ok" and latest[key][1] in bad_shards)
    report = VerifyReport(shards_ok, sum(s == "ok" for s in counted.values()) - damaged_ok,
                          sum(s == "skipped" for s in counted.values()), sum(s == "failed" for s in counted.values()),
                          problems, [], input_errors=[e for b, e in errors.items() if e and b not in superseded],
                          images_damaged=damaged_ok, images_removed=len(removed & recorded),
                          shards_damaged=sorted(bad_shards | set(damaged_sidecars)), nonfinite=nonfinite,
                          images_nonfinite=sum(1 for key in flagged if latest[key][1] in flagged[key]
                                               and counted.get(key) == "ok" and latest[key][1] not in bad_shards),
                          in_view=in_view, media=header.settings.media)
    if plan is not None:
        report.input_errors += [f"could not list {path}: {why} (the next extract lists it again)"
                                for path, why in plan.latest.listing_errors or []]
        planned = [u for u in plan.units if u.name not in superseded]  # superseded units are not planned work
        report.planned_shards = len(planned)
        held = Counter(base for base, _ in latest.values())  # images each unit's shards hold (archives' sizes)
        sizes = [u.expected if u.expected is not None else held[u.name] if u.name in done else None for u in planned]
        report.planned_images = None if None in sizes else sum(sizes)
        report.incomplete = [u.name for u in plan.units if u.name not in done and u.name not in superseded]
        report.shards_done = sum(1 for u in plan.units if u.name in done and u.name not in superseded)
        if plan.kind == "files":
            missing = []
            current = plan.current()
            for unit in plan.units:
                if unit.name in done:
                    missing += [key for key, _ in unit.files()
                                if key not in status and current.is_current(key, unit.generation)]
            problems += [f"key {k!r} is planned but missing from its shard" for k in missing[:20]]
    else:
        report.shards_done = len(done)
    if sources is not None and plan is not None:
        from .plan.changes import changed_inputs

        report.stale = [f"{c.input}: {c.reason} ({c.path})" for c in changed_inputs(root, plan, sources)]
    report.unfinished = unfinished_reasons(report, sorted(k for k, v in counted.items() if v == "failed"),
                                           [e for b, e in errors.items() if e and unavailable.get(b)
                                            and b not in superseded], plan)
    claims = Claims(root, read_only=True)  # (verify writes nothing, not even a heartbeat)
    for shard, holder in sorted(claims.holders().items()):
        (report.leftovers if claims.is_stale(holder) else report.in_progress).append(
            f"{shard} (claimed by {holder.get('run')})")
    report.leftovers += [f"{name} (temporary data of an interrupted run; the next extract of its shard removes it)"
                         for name in temp_files(root)]
    report.leftovers += [f"{PLAN_DIR}/{p.name} ({p.size / 2**20:.1f} MB, temporary file of an interrupted plan write; "
                         "the next plan write removes it once it is 10 minutes old, or delete it)"
                         for p in root.leftovers(PLAN_DIR, untouched_for=60.0)]
    return report


def unfinished_reasons(report: VerifyReport, failed: list[str], unread: list[str], plan) -> list[str]:
    """What keeps a store from being finished, one line per kind (``verify`` and ``export`` say the same): planned
    shards not done, inputs that could not be read (retried by a rerun), archives or folders that could not be read
    or listed. Images that failed to decode are final outcomes, not listed here."""
    reasons = []
    if report.incomplete:
        names = ", ".join(report.incomplete[:5]) + (", ..." if len(report.incomplete) > 5 else "")
        planned = f" of {report.planned_shards} planned" if report.planned_shards else ""
        reasons.append(f"{len(report.incomplete)}{planned} shard(s) not done ({names})")
    if failed:
        sample = ", ".join(repr(key_text(k)) for k in failed[:3]) + (", ..." if len(failed) > 3 else "")
        reasons.append(f"{len(failed)} input(s) that could not be read ({sample})")
    unread = [*unread, *(f"could not list {path}: {why}" for path, why in
                         (plan.latest.listing_errors or [] if plan is not None else []))]
    if unread:
        reasons.append(f"{len(unread)} archive(s) or folder(s) that could not be read ({_printable(unread[0])})")
    return reasons


def _printable(text: str) -> str:
    """Bytes that were not UTF-8 (surrogate escapes in names) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

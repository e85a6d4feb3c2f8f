"""Retrying inputs that could not be read: a missing file, a permission error, an archive not mounted yet.

Such inputs are committed as ``failed`` (not ``skipped``: it was not the image's fault). A later run that finds
them readable again extracts them into a retry shard ``<shard>~r<k>`` beside the original, whose records then
supersede the failed ones; finished shards are never rewritten. Retries belong to the original shard's part.
A retry's sidecar names its unit and attempt; plans written before unit names were escaped named retries
``<shard>.retry<k>``, which only such plans read as retries (``legacy``): ``a.retry1.tar`` is an archive of its own.

An archive's retry reads the archive again from the start, so it replaces its earlier attempts whole: they are moved
out of where plain readers look before it is published (``earlier_attempts``, ``superseded_shards``). A loose-file
retry holds only the inputs that failed, beside the shard that holds the others.
"""

from __future__ import annotations

import re
from dataclasses import replace

from ...inputs.sources import is_readable
from ..records import Sidecar
from ..shards import committed
from .model import SUFFIX, Plan, UnitRef

RETRY = re.compile(r"^(?P<base>.+)~r(?P<k>\d+)$")
LEGACY_RETRY = re.compile(r"^(?P<base>.+)\.retry(?P<k>\d+)$")


def base_and_attempt(name: str, legacy: bool = False) -> tuple[str, int]:
    """``shard-000003~r2`` -> (``shard-000003``, 2); an original shard is attempt 0. ``legacy``: a plan written
    before unit names were escaped, whose retries were ``shard-000003.retry2``."""
    match = RETRY.match(name) or (LEGACY_RETRY.match(name) if legacy else None)
    return (match["base"], int(match["k"])) if match else (name, 0)


def committed_units(out, plan: Plan, listed: dict | None = None) -> set[str]:
    """The planned units with a committed shard (any attempt: an archive's latest attempt is its only one); from
    ``shards.list_shards``'s answer when given."""
    return {base_and_attempt(name, plan.legacy_names)[0] for name in committed(out, listed)}


def earlier_attempts(unit: UnitRef, legacy: bool = False) -> tuple[str, ...]:
    """The shards an archive's retry replaces whole: its earlier attempts (a retry reads the archive again from the
    start). A loose-file retry holds only the inputs that failed and replaces no shard."""
    if not unit.attempt or unit.kind == "files":
        return ()
    base = unit.unit
    names = [base, *(f"{base}{SUFFIX}r{k}" for k in range(1, unit.attempt))]
    if legacy:
        names += [f"{base}.retry{k}" for k in range(1, unit.attempt)]
    return tuple(names)


def superseded_shards(plan: Plan | None, sidecars: list[Sidecar]) -> set[str]:
    """The committed shards (of ``sidecars``) whose records no longer count, to be moved out of where plain readers
    look: those of a unit the plan supersedes (and their retries), and an archive's attempts older than one committed
    since (its retry read the archive again whole)."""
    superseded = plan.superseded() if plan is not None else set()
    found = set()
    latest: dict[str, tuple[int, str]] = {}
    for sidecar in sidecars:
        base, attempt = sidecar_attempt(sidecar)
        if base in superseded:
            found.add(sidecar.shard)
        elif sidecar.unit.kind not in ("files", "ray", None):
            if base in latest:
                older = min((attempt, sidecar.shard), latest[base])
                found.add(older[1])
                latest[base] = max((attempt, sidecar.shard), latest[base])
            else:
                latest[base] = (attempt, sidecar.shard)
    return found


def sidecar_attempt(sidecar: Sidecar) -> tuple[str, int]:
    """(planned unit, attempt) of a committed shard, from its sidecar (older sidecars: from its name)."""
    unit = sidecar.unit
    if unit.attempt is not None and unit.unit:
        return unit.unit, unit.attempt
    return base_and_attempt(sidecar.shard, legacy=True)


def retry_units(plan: Plan, done: dict[str, Sidecar]) -> list[UnitRef]:
    """Retry units for this part's committed shards whose last attempt has failed inputs readable now."""
    latest: dict[str, tuple[int, Sidecar]] = {}
    for sidecar in done.values():
        base, attempt = sidecar_attempt(sidecar)
        if base not in latest or attempt > latest[base][0]:
            latest[base] = (attempt, sidecar)
    by_name = {u.name: u for u in plan.units}
    superseded = plan.superseded()  # planned again or removed since: a retry's records would not count
    current = plan.current()
    units = []
    next_index = len(plan.units)
    for base, (attempt, sidecar) in sorted(latest.items()):
        origin = by_name.get(base)
        if origin is None or base in superseded:
            continue
        name = f"{base}{SUFFIX}r{attempt + 1}"
        retry = {"index": next_index, "name": name, "attempt": attempt + 1, "base": base}
        if origin.kind != "files":
            archive = origin.archive()
            if sidecar.unit.failed and is_readable(archive.path):
                units.append(replace(origin, inline=archive.to_json(), **retry))
                next_index += 1
            continue
        items = tuple((r.key, r.source) for r in sorted(sidecar.records, key=lambda r: r.key)
                      if r.status == "failed" and current.is_current(r.key, origin.generation)
                      and is_readable(r.source))
        if items:
            units.append(replace(origin, count=len(items), expected=len(items), inline=items, **retry))
            next_index += 1
    return units

"""Comparing a plan with a fresh listing: what ``--update`` adds, removes and plans again."""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...inputs.archives import ArchiveUnit
from ...inputs.sources import FileListing, Listing
from .model import Plan


@dataclass
class PlanDiff:
    added: list[tuple[str, int]]  # loose files: (key, root); archives: paths
    removed: list[str]
    changed: list[str] = field(default_factory=list)  # keys or archive paths whose content changed since extraction
    reasons: dict[str, str] = field(default_factory=dict)  # changed input -> how it changed
    half_current: set[str] = field(default_factory=set)  # loose-file units an older vitok updated in part: replaced
    # whole by the update (changes.half_current_units)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        text = f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed"
        named = [("added", [a if isinstance(a, str) else a[0] for a in self.added[:3]]),
                 ("removed", self.removed[:3]), ("changed", self.changed[:3])]
        examples = "; ".join(f"{what}: " + ", ".join(repr(n) + (f" ({self.reasons[n]})" if n in self.reasons else "")
                                                     for n in names) for what, names in named if names)
        return f"{text}: {examples}" if examples else text


def planned_keys(plan: Plan) -> Iterator[str]:
    """Loose-file keys the plan holds now (of every generation, merged in key order, each once, not removed)."""
    current = plan.current()
    previous = None
    for key in heapq.merge(*(g.planned() for g in plan.generations)):
        if key != previous and current.generation(key) is not None:
            yield key
        previous = key


def diff(plan: Plan, listing: Listing) -> PlanDiff:
    """What the listing adds to and removes from the plan (streamed for loose files: both sides are sorted).
    Content changes are found by :mod:`vitok.inputs.changes` from the records."""
    if isinstance(listing, FileListing):
        added, removed = [], []
        old, new = planned_keys(plan), listing.items()
        a, b = next(old, None), next(new, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a < b[0]):
                removed.append(a)
                a = next(old, None)
            elif a is None or b[0] < a:
                added.append(b)
                b = next(new, None)
            else:
                a, b = next(old, None), next(new, None)
        return PlanDiff(added, removed)
    current = {p for p, g in plan.current().planned.items() if plan.current().generation(p) is not None}
    paths = set(listing.paths)
    return PlanDiff(sorted(paths - current), sorted(current - paths))


def current_archives(plan: Plan) -> dict[str, ArchiveUnit]:
    """Archive path -> its (first) unit in the generation that holds it now (for removed archives none)."""
    current = plan.current()
    found: dict[str, ArchiveUnit] = {}
    for generation in plan.generations:
        with open(generation.file(generation.header.content), "rb") as handle:
            for line in handle:
                unit = ArchiveUnit(json.loads(line))
                if current.is_current(unit.path, generation.number):
                    found.setdefault(unit.path, unit)
    return found

"""Unchanged images of a shard ``--update`` replaced: carried into the new shard, not read again.

``--update`` replaces a loose-file shard whole when one of its files changed or went (``storage.plan``: the update
generation's ``supersedes``), so its other files are planned again beside the changed ones. Those unchanged since
(the file's size and modification time, or its sha256 with ``--detect-changes hash``, still what the superseded
shard's record says; with ``off``, the same path) are not read again: their records and stored rows move into the new
shard as they were, bit for bit, from the superseded shard's data (kept in ``shards/.superseded/`` while the plan has
units to do). Anything else (a file changed meanwhile, data that fails its checksums) is read and encoded as usual.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..storage.plan import Plan, UnitRef
from ..storage.plan.changes import compare_file
from ..storage.records import ImageRecord
from ..storage.roots import StoreRoot, store_root
from ..storage.shards import RETIRED_DIR, iter_retired
from .dedupe import Donor, Donors, copied_batch
from .types import EncodedBatch


@dataclass
class Carried:
    """What ``carry`` found: per unit the batch of carried images, and the units left with something to read."""

    batches: dict[int, EncodedBatch] = field(default_factory=dict)
    to_read: list[UnitRef] = field(default_factory=list)  # units (reduced to the files not carried) to load
    whole: list[UnitRef] = field(default_factory=list)  # units carried whole: nothing to read
    count: int = 0


def carry(out: Path | StoreRoot, plan: Plan, units: list[UnitRef], donors: Donors, mode: str) -> Carried:
    """Split ``units`` into the images carried from superseded shards and what is left to read."""
    result = Carried()
    replacing = {g.number for g in plan.generations if g.header.supersedes}
    candidates = {u.index for u in units if u.kind == "files" and not u.attempt and u.generation in replacing}
    index = _superseded_records(out) if candidates else {}
    for unit in units:
        if unit.index not in candidates:
            result.to_read.append(unit)
            continue
        records, arrays, left = [], [], []
        for key, path in unit.files():
            found = _carried(index.get(key, ()), path, donors, mode)
            if found is None:
                left.append((key, path))
            else:
                records.append(found[0])
                arrays.append(found[1])
        if records:
            result.batches[unit.index] = copied_batch(unit.index, records, arrays)
            result.count += len(records)
        if not left:
            result.whole.append(unit)
        elif records:
            result.to_read.append(dataclasses.replace(unit, inline=tuple(left), count=len(left), expected=len(left)))
        else:
            result.to_read.append(unit)
    return result


def _superseded_records(out: Path | StoreRoot) -> dict[str, list[tuple[Donor, ImageRecord]]]:
    """Key -> the ok records of superseded shards whose data is kept, each with where its rows are."""
    index: defaultdict[str, list[tuple[Donor, ImageRecord]]] = defaultdict(list)
    root = store_root(out)
    for sidecar, kept in iter_retired(root):
        if not kept:
            continue
        files = tuple(sidecar.files.items())
        for record in sidecar.records:
            if record.status == "ok" and record.row is not None:
                index[record.key].append((Donor(root, sidecar.format, sidecar.data, record.row, record.key, "",
                                                files, sidecar.shard, RETIRED_DIR), record))
    return index


def _carried(found, path: str, donors: Donors, mode: str) -> tuple[ImageRecord, dict[str, np.ndarray]] | None:
    for donor, record in found:
        if record.source != path:
            continue
        if mode != "off" and compare_file(path, record.source_bytes, record.source_mtime_ns, record.source_sha256,
                                          mode) is not None:
            continue
        arrays = donors.rows(donor)
        if arrays is not None:
            return dataclasses.replace(record, row=None, tokens=None), arrays
    return None

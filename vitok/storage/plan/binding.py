"""A committed shard is bound to the plan unit it was made from.

A shard's name and settings fingerprint do not say which inputs it holds: a store whose plan was rewritten (its
header and plan deleted, or an ``--overwrite`` that could not delete every shard) names other inputs under the same
shard names. So the sidecar records ``unit.inputs``, a digest of what the plan said the unit holds when it was
made (loose files: the roots and the unit's content lines, i.e. keys and paths; archives: path, row group, size
and modification time), and a shard counts as done only while the current plan's unit has the same digest. A retry
shard (``<unit>~rN``) records its planned unit's digest.

Sidecars written before the digest existed are compared on what they hold: loose files' records name their key and
file, which must be the plan unit's; an archive shard names its archive and row group.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..records import Sidecar
from .model import UnitRef

ARCHIVE_IDENTITY = ("path", "row_group", "bytes", "mtime_ns")  # what names an archive unit's inputs


def unit_digest(unit: UnitRef) -> str:
    """Digest of a plan unit's inputs (read from the plan: the unit must not be a retry's inline copy)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(unit.kind.encode())
    if unit.kind == "files":
        digest.update(json.dumps([[r.dir, r.prefix] for r in unit.roots]).encode("utf-8", "surrogateescape"))
        with open(unit.content, "rb") as handle:
            handle.seek(unit.offset)
            for _ in range(unit.count):
                digest.update(handle.readline())
    else:
        description = unit.archive().data
        identity = {k: description.get(k) for k in ARCHIVE_IDENTITY}
        digest.update(json.dumps(identity, sort_keys=True).encode("utf-8", "surrogateescape"))
    return "blake2b:" + digest.hexdigest()


class Bindings:
    """Digests of a plan's units, computed once each (a resume compares every committed shard's)."""

    def __init__(self, units: list[UnitRef]) -> None:
        self.units = {u.name: u for u in units}
        self._digests: dict[str, str] = {}

    def digest(self, unit_name: str) -> str | None:
        if unit_name not in self.units:
            return None
        if unit_name not in self._digests:
            self._digests[unit_name] = unit_digest(self.units[unit_name])
        return self._digests[unit_name]

    def problem(self, sidecar: Sidecar, unit_name: str) -> str | None:
        """Why ``sidecar`` does not hold the inputs the plan's unit ``unit_name`` holds now (None: it does)."""
        unit = self.units.get(unit_name)
        if unit is None or sidecar.unit.kind == "ray":  # (vitok.integrations.ray: no plan)
            return None
        stored = sidecar.unit.inputs
        if stored is not None:
            if stored != self.digest(unit_name):
                return (f"made from other inputs than the plan's unit {unit_name} holds now (the plan was written "
                        "again since)")
            return None
        return _legacy_problem(sidecar, unit)


def _legacy_problem(sidecar: Sidecar, unit: UnitRef) -> str | None:
    """A sidecar without the digest: its records' keys and files, or its archive, must be the plan unit's."""
    if unit.kind == "files":
        if sidecar.unit.kind not in ("files", None):
            return f"holds {sidecar.unit.kind} inputs, the plan's unit {unit.name} loose files"
        planned: dict[str, Any] = dict(unit.files())
        for record in sidecar.records:
            if record.key not in planned or planned[record.key] != record.source:
                return f"holds {record.key!r} ({record.source}), which the plan's unit {unit.name} does not hold"
        return None
    archive = unit.archive()
    if sidecar.unit.path is not None and sidecar.unit.path != archive.path:
        return f"was made from {sidecar.unit.path}, the plan's unit {unit.name} is {archive.path}"
    if sidecar.unit.row_group is not None and sidecar.unit.row_group != archive.row_group:
        return f"holds row group {sidecar.unit.row_group}, the plan's unit {unit.name} {archive.row_group}"
    return None

"""Which inputs changed since they were extracted: the store's records compared with the sources as they are now.

Every input kind is covered: a loose file's record keeps its size and modification time (and, when extracted with
the sha256 of its bytes, ``source_sha256``); an archive's unit in the plan keeps the tar's or parquet file's
size and modification time (and its sha256, when planned with ``hash``). Modes:

    mtime   size or modification time differ (the default: one stat per input)
    hash    the content's sha256 differs (reads every input again); inputs recorded without a hash fall back to mtime
    off     nothing is compared

Only the records that hold an input now count (``Plan.current``): a file planned again by ``--update`` and not
extracted yet is pending, not changed, so an input changed once is re-extracted once. Inputs that are gone are not
reported here (the listing's diff calls them removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_module
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...inputs.sources import is_url
from ..roots import StoreRoot, store_root
from ..shards import committed, sidecar_name
from .diff import current_archives
from .model import Plan
from .retries import base_and_attempt

MODES = ("mtime", "hash", "off")  # "off" last: verify --sources offers the two that compare
STAT_THREADS = 16  # stats of a network file system overlap


@dataclass(frozen=True)
class Change:
    """One input whose content differs from what was extracted: a loose file's key, or an archive's path."""

    input: str
    path: str
    reason: str


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def compare_file(path: str, size: int | None, mtime_ns: int | None, sha256: str | None, mode: str) -> str | None:
    """Why the file at ``path`` differs from what was recorded; None when it does not (or cannot be read now: a
    retry's business). A URL (a remote video) is taken as unchanged: it has no modification time to compare."""
    if is_url(path):
        return None
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "no longer exists"
    except OSError:
        return None
    if not stat_module.S_ISREG(stat.st_mode):
        return "no longer a regular file"
    if size is not None and stat.st_size != size:
        return f"now {stat.st_size} bytes, {size} bytes when extracted"
    if mode == "hash" and sha256 is not None:
        try:
            now = file_sha256(path)
        except OSError:
            return None
        return None if now == sha256 else "other content (sha256) than extracted"
    if mtime_ns is not None and stat.st_mtime_ns != mtime_ns:
        return "modified since it was extracted"
    return None


def _checked(entries: Iterable[tuple[str, str, int | None, int | None, str | None]], mode: str) -> Iterator[Change]:
    """(input, path, size, mtime, hash) -> the changed ones; a thread per block of entries (a network file system's
    stats overlap; a local one costs a few microseconds each, so no task per entry)."""

    def block(entries: list) -> list[Change]:
        found = []
        for name, path, size, mtime_ns, sha256 in entries:
            reason = compare_file(path, size, mtime_ns, sha256, mode)
            if reason is not None:
                found.append(Change(name, path, reason))
        return found

    def blocks() -> Iterator[list]:
        batch: list = []
        for entry in entries:
            batch.append(entry)
            if len(batch) == 512:
                yield batch
                batch = []
        if batch:
            yield batch

    with ThreadPoolExecutor(STAT_THREADS) as pool:
        pending: list = []
        for batch in blocks():
            pending.append(pool.submit(block, batch))
            if len(pending) > 4 * STAT_THREADS:  # bounded: the entries are read lazily
                yield from pending.pop(0).result()
        for future in pending:
            yield from future.result()


def _sidecar_json(out: Path | StoreRoot) -> Iterator[dict[str, Any]]:
    """Every committed sidecar of the store as the JSON it is (a damaged one is left out: the run redoes its shard,
    verify reports it)."""
    root = store_root(out)
    for shard in committed(root):
        try:
            yield json.loads(root.read(sidecar_name(shard)))
        except (OSError, ValueError):
            continue


def _file_entries(out: Path | StoreRoot, plan: Plan) -> Iterator[tuple[str, str, int | None, int | None, str | None]]:
    """The recorded size, time and hash of every loose file the store holds now, from the sidecars' JSON as it is
    (no record objects: a million records are read in seconds)."""
    current = plan.current()
    for sidecar in _sidecar_json(out):
        generation = int((sidecar.get("unit") or {}).get("plan_generation", 0))
        for record in sidecar.get("records", ()):
            size = record.get("source_bytes")
            if record.get("status") == "failed" or size is None:
                continue
            if current.is_current(record["key"], generation):
                yield (record["key"], record["source"], size, record.get("source_mtime_ns"),
                       record.get("source_sha256"))


def half_current_units(out: str | Path | StoreRoot, plan: Plan) -> set[str]:
    """Loose-file units with a committed shard holding ok rows of records a later generation replaced, beside
    current ones: what a vitok that replaced changed files in part left (an update now replaces such a unit whole,
    so plain readers stop seeing those keys twice)."""
    if plan.kind != "files":
        return set()
    current, superseded = plan.current(), plan.superseded()
    found: set[str] = set()
    for sidecar in _sidecar_json(out):
        unit = sidecar.get("unit") or {}
        name = unit.get("unit") or base_and_attempt(sidecar.get("shard", ""), plan.legacy_names)[0]
        generation = int(unit.get("plan_generation", 0))
        if name in superseded:
            continue
        if any(r.get("status") == "ok" and not current.is_current(r["key"], generation)
               for r in sidecar.get("records", ())):
            found.add(name)
    return found


def _archive_entries(plan: Plan) -> Iterator[tuple[str, str, int | None, int | None, str | None]]:
    for path, unit in sorted(current_archives(plan).items()):
        if not is_url(path) and unit.bytes is not None:
            yield path, path, unit.bytes, unit.mtime_ns, unit.sha256


def changed_inputs(out: str | Path, plan: Plan, mode: str = "mtime") -> list[Change]:
    """Inputs the store holds now whose source changed since (sorted; empty with mode ``off``)."""
    if mode == "off":
        return []
    entries = _file_entries(store_root(out), plan) if plan.kind == "files" else _archive_entries(plan)
    return sorted(_checked(entries, mode), key=lambda c: c.input)


def describe(changes: list[Change], limit: int = 3) -> str:
    shown = "; ".join(f"{c.input} ({c.reason})" for c in changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def archive_hashes(units: list[dict[str, Any]]) -> None:
    """``--detect-changes hash``: each local archive's sha256 into its units (one read of each file)."""
    hashes: dict[str, str | None] = {}
    for unit in units:
        path = unit["path"]
        if path not in hashes:
            try:
                hashes[path] = None if is_url(path) else file_sha256(path)
            except OSError:
                hashes[path] = None
        if hashes[path] is not None:
            unit["sha256"] = hashes[path]

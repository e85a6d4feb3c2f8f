"""Writing the plan: a listing's content lines, content-addressed, and each generation's header created exclusively.

``listing_digest`` is what a rerun compares: equal digest, same inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import AtomicFile
from ...errors import InputsChangedError
from ...inputs.archives import describe_archives
from ...inputs.sources import ArchiveListing, FileListing, Listing, listing_kind
from ..layout import PLAN_DIR
from ..roots import StoreRoot, store_root
from .changes import archive_hashes
from .diff import PlanDiff
from .model import NAMES, PLAN_SCHEMA, SUFFIX, Generation, Plan, PlanHeader, UnitRef, unit_name

# ---- digests: what a rerun compares ------------------------------------------------------------------------------


def listing_digest(listing: Listing) -> str:
    """Identity of a listing: its roots and content lines (loose files) or its archive paths; equal digest = same
    inputs. A plan's first generation records it while writing, from the same bytes."""
    digest = _listing_hasher(listing)
    if isinstance(listing, FileListing):
        for data, _ in file_chunks(listing, 100_000):
            digest.update(data)
    return digest.hexdigest()


def _listing_hasher(listing: Listing):
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(listing, FileListing):
        digest.update(json.dumps([[r.dir, r.prefix] for r in listing.roots]).encode("ascii"))
    else:
        for path in listing.paths:
            digest.update(f"{path}\n".encode("utf-8", "surrogateescape"))
    return digest


def _encode_keys(keys: list[str]) -> bytes:
    """Content lines of single-root keys: JSON strings, in one join when no key needs escaping (the usual case)."""
    joined = "".join(keys)
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return ('"' + '"\n"'.join(keys) + '"\n').encode("ascii") if keys else b""
    return "".join(json.dumps(key) + "\n" for key in keys).encode("ascii")


def file_chunks(listing: FileListing, size: int, items: Iterable[tuple[str, int]] | None = None
                ) -> Iterator[tuple[bytes, int]]:
    """The content lines of ``size`` images at a time (one unit each): (bytes, images)."""
    if items is None and len(listing.roots) == 1:
        keys = listing.keys[0]
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            yield _encode_keys(chunk), len(chunk)
        return
    multi = len(listing.roots) > 1
    batch: list[tuple[str, int]] = []
    for item in (items if items is not None else listing.items()):
        batch.append(item)
        if len(batch) == size:
            yield _encode_items(batch, multi), size
            batch = []
    if batch:
        yield _encode_items(batch, multi), len(batch)


def _encode_items(items: list[tuple[str, int]], multi_root: bool) -> bytes:
    if not multi_root:
        return _encode_keys([key for key, _ in items])
    return "".join(json.dumps([root, key]) + "\n" for key, root in items).encode("ascii")


# ---- writing a generation ----------------------------------------------------------------------------------------


def _write_content(root: StoreRoot, generation: int, chunks: Iterable[tuple[bytes, int, int]],
                   also=None) -> tuple[str, str, int, str]:
    """Stream unit chunks (content lines, lines, expected images) into a content-addressed file and its unit index
    (byte offset, lines, expected images), written in the plan folder's staging space and put in the store whole;
    ``also`` is another hasher fed the same bytes. Returns (content file, index file, lines, digest)."""
    folder = root.staging(PLAN_DIR)
    digest = hashlib.blake2b(digest_size=16)
    index: list[tuple[int, int, int]] = []
    count = position = 0
    with AtomicFile(folder, f"{generation:04d}", buffering=1 << 20) as content:
        handle = content.handle
        for data, lines, expected in chunks:
            index.append((position, lines, expected))
            handle.write(data)
            digest.update(data)
            if also is not None:
                also.update(data)
            position += len(data)
            count += lines
        name = f"{generation:04d}-{digest.hexdigest()[:12]}"
        content.path = folder / f"{name}.jsonl"
    with AtomicFile(folder, name, folder / f"{name}.units.npy") as unit_index:
        np.save(unit_index.handle, np.array(index, dtype=np.int64).reshape(-1, 3))
    for file in (f"{name}.jsonl", f"{name}.units.npy"):  # (in a local store: in place already)
        root.put(f"{PLAN_DIR}/{file}", folder / file)
    return f"{name}.jsonl", f"{name}.units.npy", count, digest.hexdigest()


def write_generation(out: Path | StoreRoot, listing: Listing, shard_size: int, generation: int, first_unit: int,
                     sources: list[str], reason: str, listing_digest_: str | None = None,
                     reader_options: dict | None = None, items: list | None = None,
                     removed: list[str] | None = None, detect_changes: str = "mtime",
                     files_from: str | None = None, list_cwd: str | None = None,
                     supersedes: list[str] | None = None) -> Generation:
    """Write one generation (all of ``listing``, or only ``items`` of it for an update) and commit its header.
    ``listing_digest_`` of the whole listing is computed while writing when not given."""
    root = store_root(out)
    header: dict[str, Any] = {
        "vitok_plan": PLAN_SCHEMA, "generation": generation, "reader": listing_kind(listing), "reason": reason,
        "sources": sources, "shard_size": shard_size,
        "first_unit": first_unit, "listing_digest": listing_digest_, "reader_options": reader_options or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files_from": files_from,
        "list_cwd": list_cwd if files_from else None,
    }
    if generation == 0:
        header["names"] = NAMES
    if supersedes:  # units of earlier generations this one replaces whole (loose files; see write_update)
        header["supersedes"] = supersedes
    if listing.errors:  # folders that could not be listed: the next run lists them again
        header["listing_errors"] = [list(e) for e in listing.errors]
    whole = _listing_hasher(listing) if listing_digest_ is None and items is None else None
    if isinstance(listing, FileListing):
        chunks = ((data, lines, lines) for data, lines in file_chunks(listing, shard_size, items))
        content, index, lines, digest = _write_content(root, generation, chunks, also=whole)
        header |= {"roots": [[r.dir, r.prefix] for r in listing.roots], "num_items": lines,
                   "num_units": (lines + shard_size - 1) // shard_size}
    else:
        units = items if items is not None else archive_units(listing)
        if detect_changes == "hash":
            archive_hashes(units)
        chunks = (((json.dumps(u, sort_keys=True) + "\n").encode("ascii"), 1, u.get("expected", -1))
                  for u in units)
        content, index, lines, digest = _write_content(root, generation, chunks)
        header |= {"num_units": len(units), "unit_names": [u["name"] for u in units],
                   "num_items": sum(max(0, u.get("expected", 0)) for u in units)}
    if listing_digest_ is None:
        listing_digest_ = whole.hexdigest() if whole is not None else listing_digest(listing)
    header["listing_digest"] = listing_digest_
    header |= {"content": content, "index": index, "digest": digest}
    if removed:
        removed_name = content.replace(".jsonl", ".removed.json")
        root.write(f"{PLAN_DIR}/{removed_name}", json.dumps(removed).encode())
        header["removed"] = removed_name
    name = f"{PLAN_DIR}/{generation:04d}.json"
    text = json.dumps(PlanHeader.from_json(header).to_json(), indent=1, sort_keys=True)
    if root.create(name, text.encode()) is None:
        existing = json.loads(root.read(name))
        if existing.get("listing_digest") != listing_digest_ or existing.get("digest") != digest:
            raise InputsChangedError(
                f"another process planned {root} at the same moment from other inputs ({generation:04d}.json); use "
                "the same sources in every process, or plan once with 'vitok plan'")
        header = existing
    return Generation(PlanHeader.from_json(header), root)


def write_update(out: Path | StoreRoot, plan: Plan, listing: Listing, changes: PlanDiff, sources: list[str],
                 listing_digest_: str | None, reader_options: dict, detect_changes: str = "mtime",
                 files_from: str | None = None, list_cwd: str | None = None) -> Generation:
    """--update: a generation holding the inputs added or changed since ``plan``, in new units after the existing
    ones, and the inputs removed. Units are replaced whole, never in part, so that no shard is left half current:
    an archive planned before gets a new unit name (the old unit is superseded), and a unit holding a changed or
    removed loose file is superseded, its other files planned again beside the added and changed ones."""
    number = plan.generations[-1].number + 1
    added = changes.added
    supersedes = None
    if plan.kind != "files":
        fresh = archive_units(ArchiveListing(plan.kind, [*added, *changes.changed]),
                              legacy=plan.legacy_names)
        taken = {u.name for u in plan.units}
        added = [u if u["name"] not in taken else {**u, "name": f"{u['name']}{SUFFIX}g{number}"} for u in fresh]
    elif changes.changed or changes.removed or changes.half_current:
        touched = units_holding(plan, [*changes.changed, *changes.removed])
        named = {u.name: u for u in plan.units}
        touched += [named[name] for name in sorted(changes.half_current) if name in named and named[name] not in
                    touched]
        current = plan.current()
        again = {key for unit in touched for key, _ in unit.files() if current.is_current(key, unit.generation)}
        again = (again | set(changes.changed)) - set(changes.removed)
        added = sorted([*added, *((key, root) for key, root in listing.items() if key in again)])
        supersedes = sorted(unit.name for unit in touched)
    return write_generation(out, listing, plan.shard_size, number, len(plan.units), sources, "update",
                            listing_digest_, reader_options, items=added, removed=list(changes.removed),
                            detect_changes=detect_changes, files_from=files_from, list_cwd=list_cwd,
                            supersedes=supersedes)


def units_holding(plan: Plan, keys: Iterable[str]) -> list[UnitRef]:
    """The units that hold these loose-file keys now (each key's unit in the generation that holds it)."""
    current = plan.current()
    generations = {g.number: g for g in plan.generations}
    found: dict[str, UnitRef] = {}
    for key in keys:
        number = current.generation(key)
        unit = generations[number].unit_holding(key) if number in generations else None
        if unit is not None:
            found.setdefault(unit.name, unit)
    return list(found.values())


def archive_units(listing: ArchiveListing, legacy: bool = False) -> list[dict[str, Any]]:
    """One unit per tar, or per parquet row group (described by ``inputs.archives``), named after the archive's
    escaped stem; a parquet file of several row groups gets ``~rgNNNNN`` units. ``legacy``: names as plans written
    before escaping had them (an update of such a plan)."""
    row_group = "-rg" if legacy else f"{SUFFIX}rg"
    units = []
    for archive in describe_archives(listing.kind, listing.paths):
        name = archive.stem if legacy else unit_name(archive.stem)
        if len(archive.parts) == 1:
            units.append({**archive.parts[0], "name": name})
        else:
            units += [{**part, "name": f"{name}{row_group}{part['row_group']:05d}"} for part in archive.parts]
    return units

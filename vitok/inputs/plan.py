"""The plan: which inputs go into which output shard. Written once, identical for every process, never rewritten.

A plan is a sequence of generations (``OUT/plan/NNNN.json``): generation 0 from the first listing, and one more
for each ``--update`` (inputs added since) or retry (inputs that could not be read before and can be now). Each
generation's header is created exclusively (the first process wins, the others compare) and names its content
file and unit index, which are content-addressed so that two processes planning at once never mix files.

Units are the output shards, numbered across generations (part ``k`` of ``N`` does units ``i % N == k``):

- loose files: ``shard-000000`` holds ``shard_size`` consecutive keys; the content file has one line per image
  (a JSON string key, or ``[root, key]`` when several roots exist); a process seeks to its own units' lines;
- archives: one unit per tar, or per parquet row group, named after it (``00042``, ``00042~rg00003``), one JSON
  line each; its images are only known when it is read.

Unit names cannot collide with one another: a name made from an archive's stem has ``%``, ``~`` and a leading ``.``
escaped (``%25``, ``%7E``, ``%2E``), and everything vitok appends (row groups ``~rgN``, an archive planned again by
``--update`` ``~gN``, retries ``~rN``) starts with ``~``. Plans written before (no ``names`` field in the header) keep
their names (``-rgN``, ``.gN``, ``.retryN``).

Which generation holds an input now (``Plan.current()``): the last one that planned it, unless a later one removed
it. Records of any other generation are stale: readers leave them out, so after ``--update`` a store holds exactly
what the sources hold (a rewritten archive's dropped samples and a removed archive's samples disappear; a file
removed and added again comes back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
import stat as stat_module
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import AtomicFile
from ..errors import InputsChangedError, StoreError
from ..storage.files import atomic_write_text, create_exclusive
from .sources import ArchiveListing, FileListing, Listing, Root, archive_stem, is_url, open_regular

logger = logging.getLogger(__name__)

PLAN_DIR = "plan"
PLAN_SCHEMA = 2
NAMES = 2  # the unit naming scheme of plans written now (absent: the first one)
SUFFIX = "~"  # starts everything vitok appends to a unit name; escaped out of archive stems


def unit_name(stem: str) -> str:
    """An archive's stem as a unit (= shard file) name that no suffix vitok appends can produce: ``%`` and ``~``
    escaped everywhere, ``.`` at the start (a hidden file is a temporary one)."""
    name = stem.replace("%", "%25").replace(SUFFIX, "%7E")
    return "%2E" + name[1:] if name.startswith(".") else name


@dataclass(frozen=True)
class UnitRef:
    """One output shard of the plan: enough for a worker process to read its inputs."""

    index: int
    name: str
    kind: str  # files | wds | parquet
    content: str  # the generation's content file
    offset: int  # byte offset of its first line
    count: int  # lines (files: images; archives: 1)
    expected: int | None  # images, when known before reading
    generation: int
    roots: tuple[Root, ...] = ()
    inline: tuple[tuple[str, str], ...] | dict[str, Any] | None = None  # retry units: content not in the plan
    attempt: int = 0  # retries: 1, 2, ...; ``name`` is then the retry shard's, ``base`` the planned unit's
    base: str | None = None

    @property
    def unit(self) -> str:
        """The planned unit's name (a retry's original)."""
        return self.base or self.name

    def read(self) -> list[tuple[str, str]] | dict[str, Any]:
        """Files: [(key, path)]; archives: the unit's description (path, row group, ...)."""
        if self.inline is not None:
            return list(self.inline) if isinstance(self.inline, tuple) else dict(self.inline)
        with open(self.content, "rb") as handle:
            handle.seek(self.offset)
            lines = [handle.readline() for _ in range(self.count)]
        if self.kind != "files":
            return json.loads(lines[0])
        items = []
        for line in lines:
            value = json.loads(line)
            root, key = (0, value) if isinstance(value, str) else value
            items.append((key, self.roots[root].path(key)))
        return items


@dataclass
class PlanHeader:
    """``OUT/plan/NNNN.json``: one generation of the plan, naming its content-addressed files.

    Optional fields absent from a stored header stay absent when it is written back; unknown ones are kept."""

    generation: int
    reader: str  # files | wds | parquet
    first_unit: int  # index of this generation's first unit in the whole plan
    content: str  # NNNN-<digest>.jsonl: one line per loose file or per archive unit
    index: str  # NNNN-<digest>.units.npy: (byte offset, lines, expected images) per unit
    digest: str  # of the content
    listing_digest: str | None = None  # of the whole listing this generation was planned from
    num_units: int = 0
    num_items: int | None = None
    shard_size: int | None = None
    reason: str = "initial"  # initial | update
    sources: list[str] = field(default_factory=list)
    files_from: str | None = None  # the --files-from list the sources were read from (absolute; "-": stdin)
    list_cwd: str | None = None  # the working directory its relative lines were read against
    reader_options: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    vitok_plan: int = 1  # the plan schema
    names: int | None = None  # unit-name scheme (2: escaped stems, "~" suffixes); absent: legacy names
    roots: list[list[str]] | None = None  # loose files: (folder, key prefix) of each root
    unit_names: list[str] | None = None  # archives: each unit's name
    removed: str | None = None  # file listing the inputs this generation removed
    listing_errors: list[list[str]] | None = None  # folders that could not be listed: (path, reason)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in data.items() if v is not None}, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanHeader:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})


@dataclass
class Generation:
    header: PlanHeader
    folder: Path

    @property
    def number(self) -> int:
        return self.header.generation

    def units(self) -> list[UnitRef]:
        index = np.load(self.folder / self.header.index)
        roots = tuple(Root(*r) for r in self.header.roots or ())
        content = str(self.folder / self.header.content)
        names = self.header.unit_names
        first = self.header.first_unit
        refs = []
        for i, (offset, count, expected) in enumerate(index.tolist()):
            name = names[i] if names else f"shard-{first + i:06d}"
            refs.append(UnitRef(first + i, name, self.header.reader, content, offset, count,
                                None if expected < 0 else expected, self.number, roots))
        return refs

    def removed(self) -> list[str]:
        if not self.header.removed:
            return []
        return json.loads((self.folder / self.header.removed).read_text())

    def planned(self) -> Iterator[str]:
        """The inputs this generation plans: loose-file keys (in key order) or archive paths (one per unit)."""
        with open(self.folder / self.header.content, "rb") as handle:
            for line in handle:  # read through once: one line per key, or per archive unit
                value = json.loads(line)
                yield value if isinstance(value, str) else value["path"] if isinstance(value, dict) else value[1]


@dataclass
class Current:
    """Which generation holds each input now: the last that planned it, None when a later one removed it.
    Inputs are loose-file keys or archive paths; a loose key planned only by generation 0 is not stored here."""

    planned: dict[str, int]  # input -> the last generation that planned it (loose files: generations >= 1)
    removed: dict[str, int]  # input -> the last generation that removed it

    def generation(self, name: str) -> int | None:
        planned = self.planned.get(name, 0)
        removed = self.removed.get(name)
        return None if removed is not None and removed > planned else planned

    def is_current(self, name: str, generation: int) -> bool:
        return self.generation(name) == generation

    def removed_now(self) -> set[str]:
        return {name for name in self.removed if self.generation(name) is None}


@dataclass
class Plan:
    out: Path
    generations: list[Generation]
    units: list[UnitRef] = field(init=False)
    _current: Current | None = field(default=None, init=False, repr=False)
    _superseded: set[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.units = [u for g in self.generations for u in g.units()]

    @property
    def first(self) -> PlanHeader:
        return self.generations[0].header

    @property
    def latest(self) -> PlanHeader:
        return self.generations[-1].header

    @property
    def kind(self) -> str:
        return self.first.reader

    @property
    def shard_size(self) -> int:
        return int(self.first.shard_size)

    @property
    def sources(self) -> list[str]:
        return list(self.latest.sources)

    @property
    def num_images(self) -> int | None:
        sizes = [u.expected for u in self.units]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def legacy_names(self) -> bool:
        """Planned before unit names were escaped: ``.retryN`` names a retry."""
        return self.first.names != NAMES

    def current(self) -> Current:
        """Which generation holds each input now (read once per plan: loose files of generation 0 are not read)."""
        if self._current is None:
            planned: dict[str, int] = {}
            removed: dict[str, int] = {}
            for generation in self.generations:
                if generation.number or self.kind != "files":
                    planned.update(dict.fromkeys(generation.planned(), generation.number))
                removed.update(dict.fromkeys(generation.removed(), generation.number))
            self._current = Current(planned, removed)
        return self._current

    def removed(self) -> set[str]:
        """Inputs removed from the sources and not planned again since."""
        return self.current().removed_now()

    def superseded(self) -> set[str]:
        """Names of archive units whose archive a later generation planned again or removed: not to be read (their
        records would not count). Loose-file units always hold some current key and are never superseded whole."""
        if self.kind == "files":
            return set()
        if self._superseded is not None:
            return self._superseded
        current = self.current()
        stale: set[str] = set()
        for generation in self.generations:
            names = [u.name for u in generation.units()]
            with open(generation.folder / generation.header.content, "rb") as handle:
                for name, line in zip(names, handle):
                    if not current.is_current(json.loads(line)["path"], generation.number):
                        stale.add(name)
        self._superseded = stale
        return stale


def plan_dir(out: Path) -> Path:
    return Path(out) / PLAN_DIR


def load_plan(out: Path) -> Plan | None:
    folder = plan_dir(out)
    if not folder.is_dir():
        return None
    generations = []
    for path in sorted(folder.glob("[0-9][0-9][0-9][0-9].json")):
        try:
            header = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} is damaged ({exc})") from None
        if header.get("vitok_plan") != PLAN_SCHEMA:
            raise StoreError(f"{path}: plan schema {header.get('vitok_plan')} is not {PLAN_SCHEMA}")
        generations.append(Generation(PlanHeader.from_json(header), folder))
    return Plan(Path(out), generations) if generations else None


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


def _write_content(folder: Path, generation: int, chunks: Iterable[tuple[bytes, int, int]],
                   also=None) -> tuple[str, str, int, str]:
    """Stream unit chunks (content lines, lines, expected images) into a content-addressed file and its unit index
    (byte offset, lines, expected images); ``also`` is another hasher fed the same bytes. Returns
    (content file, index file, lines, digest)."""
    folder.mkdir(parents=True, exist_ok=True)
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
    return f"{name}.jsonl", f"{name}.units.npy", count, digest.hexdigest()


def write_generation(out: Path, listing: Listing, shard_size: int, generation: int, first_unit: int,
                     sources: list[str], reason: str, listing_digest_: str | None = None,
                     reader_options: dict | None = None, items: list | None = None,
                     removed: list[str] | None = None, detect_changes: str = "mtime",
                     files_from: str | None = None, list_cwd: str | None = None) -> Generation:
    """Write one generation (all of ``listing``, or only ``items`` of it for an update) and commit its header.
    ``listing_digest_`` of the whole listing is computed while writing when not given."""
    folder = plan_dir(out)
    header: dict[str, Any] = {
        "vitok_plan": PLAN_SCHEMA, "generation": generation, "reader": "files" if isinstance(listing, FileListing)
        else listing.kind, "reason": reason, "sources": sources, "shard_size": shard_size,
        "first_unit": first_unit, "listing_digest": listing_digest_, "reader_options": reader_options or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files_from": files_from,
        "list_cwd": list_cwd if files_from else None,
    }
    if generation == 0:
        header["names"] = NAMES
    if listing.errors:  # folders that could not be listed: the next run lists them again
        header["listing_errors"] = [list(e) for e in listing.errors]
    whole = _listing_hasher(listing) if listing_digest_ is None and items is None else None
    if isinstance(listing, FileListing):
        chunks = ((data, lines, lines) for data, lines in file_chunks(listing, shard_size, items))
        content, index, lines, digest = _write_content(folder, generation, chunks, also=whole)
        header |= {"roots": [[r.dir, r.prefix] for r in listing.roots], "num_items": lines,
                   "num_units": (lines + shard_size - 1) // shard_size}
    else:
        units = items if items is not None else archive_units(listing, reader_options or {})
        if detect_changes == "hash":
            from .changes import archive_hashes

            archive_hashes(units)
        chunks = (((json.dumps(u, sort_keys=True) + "\n").encode("ascii"), 1, u.get("expected", -1))
                  for u in units)
        content, index, lines, digest = _write_content(folder, generation, chunks)
        header |= {"num_units": len(units), "unit_names": [u["name"] for u in units],
                   "num_items": sum(max(0, u.get("expected", 0)) for u in units)}
    if listing_digest_ is None:
        listing_digest_ = whole.hexdigest() if whole is not None else listing_digest(listing)
    header["listing_digest"] = listing_digest_
    header |= {"content": content, "index": index, "digest": digest}
    if removed:
        removed_name = content.replace(".jsonl", ".removed.json")
        atomic_write_text(folder / removed_name, json.dumps(removed))
        header["removed"] = removed_name
    path = folder / f"{generation:04d}.json"
    if not create_exclusive(path, json.dumps(PlanHeader.from_json(header).to_json(), indent=1, sort_keys=True)):
        existing = json.loads(path.read_text())
        if existing.get("listing_digest") != listing_digest_ or existing.get("digest") != digest:
            raise InputsChangedError(
                f"another process planned {out} at the same moment from other inputs ({path.name}); use the same "
                "sources in every process, or plan once with 'vitok plan'")
        header = existing
    return Generation(PlanHeader.from_json(header), folder)


def write_update(out: Path, plan: Plan, listing: Listing, changes: PlanDiff, sources: list[str],
                 listing_digest_: str | None, reader_options: dict, detect_changes: str = "mtime",
                 files_from: str | None = None, list_cwd: str | None = None) -> Generation:
    """--update: a generation holding the inputs added or changed since ``plan``, in new units after the existing
    ones, and the inputs removed. An archive planned before gets a new unit name, so its finished shard stays."""
    number = plan.generations[-1].number + 1
    added = changes.added
    if plan.kind != "files":
        fresh = archive_units(ArchiveListing(plan.kind, [*added, *changes.changed]), reader_options,
                              legacy=plan.legacy_names)
        taken = {u.name for u in plan.units}
        added = [u if u["name"] not in taken else {**u, "name": f"{u['name']}{SUFFIX}g{number}"} for u in fresh]
    elif changes.changed:  # changed files: planned again (with the listing's root) beside the added ones
        changed = set(changes.changed)
        added = sorted([*added, *((key, root) for key, root in listing.items() if key in changed)])
    return write_generation(out, listing, plan.shard_size, number, len(plan.units), sources, "update",
                            listing_digest_, reader_options, items=added, removed=list(changes.removed),
                            detect_changes=detect_changes, files_from=files_from, list_cwd=list_cwd)


def archive_units(listing: ArchiveListing, options: dict, legacy: bool = False) -> list[dict[str, Any]]:
    """One unit per tar, or per parquet row group: its name, path, size and modification time, expected images.
    ``legacy``: names as plans written before escaping had them (an update of such a plan)."""
    units = []
    for path in listing.paths:
        stem = archive_stem(path)
        name = stem if legacy else unit_name(stem)
        row_group = "-rg" if legacy else f"{SUFFIX}rg"
        stat = None if is_url(path) else _stat(path)
        base = {"path": path, "stem": stem, "kind": listing.kind,
                "bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}
        if listing.kind == "wds":
            units.append({**base, "name": name, "expected": _img2dataset_successes(path)})
            continue
        from .readers.parquet import row_groups

        groups, error = row_groups(path)
        if error or len(groups) <= 1:
            units.append({**base, "name": name, "row_group": 0 if groups else None,
                          "expected": groups[0] if groups else -1, **({"error": error} if error else {})})
        else:
            units += [{**base, "name": f"{name}{row_group}{g:05d}", "row_group": g, "expected": rows}
                      for g, rows in enumerate(groups)]
    return units


def _stat(path: str):
    """The archive's stat, None when it is missing or not a regular file (nothing to compare later)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found if stat_module.S_ISREG(found.st_mode) else None


def _img2dataset_successes(tar: str) -> int:
    """img2dataset writes ``<stem>_stats.json`` beside each tar: its successes are the samples with an image."""
    if is_url(tar):
        return -1
    stats = Path(tar).with_name(archive_stem(tar) + "_stats.json")
    try:
        with open_regular(str(stats)) as handle:
            return int(json.loads(handle.read())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


# ---- comparing a plan with a fresh listing -----------------------------------------------------------------------


@dataclass
class PlanDiff:
    added: list[tuple[str, int]]  # loose files: (key, root); archives: paths
    removed: list[str]
    changed: list[str] = field(default_factory=list)  # keys or archive paths whose content changed since extraction
    reasons: dict[str, str] = field(default_factory=dict)  # changed input -> how it changed

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


def current_archives(plan: Plan) -> dict[str, dict[str, Any]]:
    """Archive path -> the description of its unit in the generation that holds it now (for removed archives none)."""
    current = plan.current()
    found: dict[str, dict[str, Any]] = {}
    for generation in plan.generations:
        with open(generation.folder / generation.header.content, "rb") as handle:
            for line in handle:
                description = json.loads(line)
                if current.is_current(description["path"], generation.number):
                    found.setdefault(description["path"], description)
    return found

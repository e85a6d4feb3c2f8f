"""The plan: which inputs go into which output shard. Written once, identical for every process, never rewritten.

A plan is a sequence of generations (``OUT/plan/NNNN.json``): generation 0 from the first listing, and one more
for each ``--update`` (inputs added, changed or removed since); retries of inputs that could not be read are units
made at run time (``retries.py``), not generations. Each
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

Which units are superseded (``Plan.superseded()``): units none of whose inputs the plan holds there now. An
``--update`` never leaves a unit half current: a rewritten or removed archive supersedes its unit whole, and a loose
file changed or removed supersedes the whole unit holding it, whose other files the update plans again (the header's
``supersedes`` names those units). So every shard is either current whole or superseded whole, and a superseded
shard can leave where plain readers look (``vitok.storage.maintenance.retire_superseded``).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import StoreError
from ...inputs.archives import ArchiveUnit
from ...inputs.sources import Root
from ..layout import PLAN_DIR, shard_name
from ..roots import StoreRoot, store_root

logger = logging.getLogger(__name__)

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

    def inlined(self) -> UnitRef:
        """The unit with its content in it: readable on a node that has no copy of the plan (a Ray task's)."""
        if self.inline is not None:
            return self
        inline = tuple(self.files()) if self.kind == "files" else json.loads(self._lines()[0])
        return dataclasses.replace(self, inline=inline)

    def files(self) -> list[tuple[str, str]]:
        """A unit of loose files: its (key, path) pairs."""
        if self.inline is not None:
            return list(self.inline)
        items = []
        for line in self._lines():
            value = json.loads(line)
            root, key = (0, value) if isinstance(value, str) else value
            items.append((key, self.roots[root].path(key)))
        return items

    def archive(self) -> ArchiveUnit:
        """A unit of an archive: which archive (or row group) it is, as planned."""
        if self.inline is not None:
            return ArchiveUnit(dict(self.inline))
        return ArchiveUnit(json.loads(self._lines()[0]))

    def _lines(self) -> list[bytes]:
        with open(self.content, "rb") as handle:
            handle.seek(self.offset)
            return [handle.readline() for _ in range(self.count)]


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
    supersedes: list[str] | None = None  # loose files: units of earlier generations this one replaces whole
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
    root: StoreRoot  # the store (``storage.roots``)
    _firsts: list[str] | None = field(default=None, init=False, repr=False)  # each unit's first key (loose files)
    _units: list[UnitRef] | None = field(default=None, init=False, repr=False)

    @property
    def number(self) -> int:
        return self.header.generation

    def file(self, name: str) -> Path:
        """A local file holding one of the generation's files (in the store's plan folder, or a cached copy of an
        object: plan files are content-addressed and never rewritten)."""
        return self.root.fetch(f"{PLAN_DIR}/{name}")

    def units(self) -> list[UnitRef]:
        if self._units is None:
            self._units = self._read_units()
        return self._units

    def _read_units(self) -> list[UnitRef]:
        index = np.load(self.file(self.header.index))
        roots = tuple(Root(*r) for r in self.header.roots or ())
        content = str(self.file(self.header.content))
        names = self.header.unit_names
        first = self.header.first_unit
        refs = []
        for i, (offset, count, expected) in enumerate(index.tolist()):
            name = names[i] if names else shard_name(first + i)
            refs.append(UnitRef(first + i, name, self.header.reader, content, offset, count,
                                None if expected < 0 else expected, self.number, roots))
        return refs

    def removed(self) -> list[str]:
        if not self.header.removed:
            return []
        return json.loads(self.root.read(f"{PLAN_DIR}/{self.header.removed}"))

    def unit_holding(self, key: str) -> UnitRef | None:
        """The unit of this loose-file generation whose key range holds ``key`` (content lines are in key order, and
        a unit is a run of consecutive lines); whether it plans ``key`` is the caller's to know."""
        units = self.units()
        if self._firsts is None:
            self._firsts = [_first_key(unit) for unit in units]
        position = bisect.bisect_right(self._firsts, key) - 1
        return units[position] if position >= 0 else None

    def planned(self) -> Iterator[str]:
        """The inputs this generation plans: loose-file keys (in key order) or archive paths (one per unit)."""
        with open(self.file(self.header.content), "rb") as handle:
            for line in handle:  # read through once: one line per key, or per archive unit
                value = json.loads(line)
                yield value if isinstance(value, str) else value["path"] if isinstance(value, dict) else value[1]


def _first_key(unit: UnitRef) -> str:
    with open(unit.content, "rb") as handle:
        handle.seek(unit.offset)
        value = json.loads(handle.readline())
    return value if isinstance(value, str) else value[1]


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
    out: StoreRoot
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

    def recorded_options(self) -> dict[str, Any]:
        """The extract options the plan was made with (``vitok plan``'s flags, by ``ExtractOptions`` name): the shard
        size of loose files and the input options recorded."""
        options: dict[str, Any] = {k: v for k, v in (self.first.reader_options or {}).items() if v is not None}
        if options.pop("media", None) == "video":  # planned as videos (loose, or video2dataset's tars)
            options["input_format"] = "video"
        if self.kind == "files" and self.first.shard_size is not None:
            options["shard_size"] = self.shard_size
        return options

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
        """Names of the units none of whose inputs the plan holds there now: archive units whose archive a later
        generation planned again or removed, loose-file units a later generation replaced whole (``supersedes``).
        They are not to be read, their shards are not done work, and their records never count; their retries'
        shards (``<unit>~rN``) are superseded with them."""
        if self._superseded is not None:
            return self._superseded
        if self.kind == "files":
            self._superseded = {name for g in self.generations for name in g.header.supersedes or ()}
            return self._superseded
        current = self.current()
        stale: set[str] = set()
        for generation in self.generations:
            names = [u.name for u in generation.units()]
            with open(generation.file(generation.header.content), "rb") as handle:
                for name, line in zip(names, handle):
                    if not current.is_current(json.loads(line)["path"], generation.number):
                        stale.add(name)
        self._superseded = stale
        return stale


def is_generation_header(name: str) -> bool:
    """``0000.json``, ``0001.json``...: a generation's header (the commit of a plan generation)."""
    return len(name) == 9 and name.endswith(".json") and name[:4].isdigit()


def load_plan(out: Path | StoreRoot) -> Plan | None:
    root = store_root(out)
    generations = []
    for entry in root.list(PLAN_DIR):
        if not is_generation_header(entry.name):
            continue
        name = f"{PLAN_DIR}/{entry.name}"
        try:
            header = json.loads(root.read(name))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{root.show(name)} is damaged ({exc})") from None
        if header.get("vitok_plan") != PLAN_SCHEMA:
            raise StoreError(f"{root.show(name)}: plan schema {header.get('vitok_plan')} is not {PLAN_SCHEMA}")
        generations.append(Generation(PlanHeader.from_json(header), root))
    return Plan(root, generations) if generations else None

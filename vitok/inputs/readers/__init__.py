"""Input readers: one class per kind of input, turning a planned unit into samples (key, bytes or path, metadata).

    files     loose image files (a unit is a run of keys from the plan; may be split over several workers)
    wds       webdataset tars, as img2dataset writes them (a unit is one tar, read sequentially, never extracted)
    parquet   parquet files with image bytes (a unit is one row group, read batch by batch)

A reader runs in the decode workers. It never decodes: it yields :class:`Sample`s, and raises
:class:`UnitReadError` when the rest of a unit cannot be read (a truncated tar, a missing file); what it yielded
before the error counts. A new kind of input is one class registered in ``READERS``.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import UsageError
from ...storage.keys import key_text, unstorable


@dataclass
class Sample:
    """One input as a reader finds it. A key no store can hold (NUL in it: ``vitok.storage.keys.unstorable``) makes
    the sample skipped with that reason, whichever reader made it: it costs that sample, never the shard."""

    key: str
    source: str  # file, or the archive holding it
    member: str | None = None  # tar member / "row_group/row"
    data: bytes | None = None  # image bytes; None = read ``source`` from disk
    meta: dict[str, Any] | None = None  # caption / json fields kept in the record
    skip: str | None = None  # a reason to record it as skipped without decoding
    local: str | None = None  # a temporary file holding the bytes instead of ``data`` (a large video member of a
    # tar): whoever takes the sample removes it (``discard``)

    def __post_init__(self) -> None:
        problem = unstorable(self.key)
        if problem is not None and self.skip is None:
            where = f"{self.source} [{key_text(self.member)}]" if self.member else self.source  # [row_group/row]
            self.skip, self.data = f"its key '{key_text(self.key)}' {problem} ({where}); not extracted", None
            self.discard()

    def discard(self) -> None:
        """Remove the temporary file, if any (idempotent)."""
        if self.local is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.local)
            self.local = None


class KeyRule:
    """The one key rule of every archive reader: the first sample with a key keeps it; a later one (a duplicate, or a
    key some earlier sample's generated name already took) is recorded as skipped under ``key#n``, ``n`` the
    smallest number >= 2 not taken, so a recorded name never collides with a real key nor is written twice."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def assign(self, key: str) -> tuple[str, int]:
        """(the name this sample is recorded under, 1 for the first with the key, else the n of ``key#n``)."""
        if key not in self.taken:
            self.taken.add(key)
            return key, 1
        n = 2
        while f"{key}#{n}" in self.taken:
            n += 1
        self.taken.add(f"{key}#{n}")
        return f"{key}#{n}", n


class UnitReadError(Exception):
    """The rest of a unit cannot be read; ``failed`` when the input was unavailable (a rerun retries it) rather
    than damaged."""

    def __init__(self, message: str, failed: bool = False) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass
class ReaderOptions:
    meta_fields: tuple[str, ...] | None = None  # json fields / parquet columns to keep (None: json whole, caption)
    image_column: str | None = None  # parquet
    key_column: str | None = None  # parquet
    media: str = "image"  # image | video: what a webdataset sample's member is
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {"meta_fields": list(self.meta_fields) if self.meta_fields is not None else None,
                "image_column": self.image_column, "key_column": self.key_column}
        return {**data, "media": self.media} if self.media != "image" else data  # (image stores: as before)


class InputReader(ABC):
    kind: ClassVar[str]
    splittable: ClassVar[bool] = False  # True: a unit's samples can be read from any position (loose files)

    def __init__(self, options: ReaderOptions | None = None) -> None:
        self.options = options or ReaderOptions()

    @abstractmethod
    def samples(self, unit, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """The samples of a planned unit (``start``/``stop`` only for splittable readers)."""


def get_reader(kind: str, options: ReaderOptions | None = None) -> InputReader:
    from .files import FilesReader
    from .parquet import ParquetReader
    from .webdataset import WebDatasetReader

    readers = {r.kind: r for r in (FilesReader, WebDatasetReader, ParquetReader)}
    if kind not in readers:
        raise UsageError(f"unknown input kind {kind!r}; kinds: {', '.join(readers)}")
    return readers[kind](options)

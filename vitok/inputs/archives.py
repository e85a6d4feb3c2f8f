"""What an archive input holds before it is read: its size and modification time, and the images it is expected to
yield (a tar's img2dataset stats, a parquet file's row groups). The plan names one unit per part."""

from __future__ import annotations

import json
import os
import stat as stat_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import archive_stem, is_url, open_regular


@dataclass(frozen=True)
class ArchiveUnit:
    """One plan unit of an archive input (a tar, or a parquet row group), as the plan stores it: one JSON object,
    kept whole (fields a later version adds survive a read and a rewrite)."""

    data: Mapping[str, Any]

    @property
    def path(self) -> str:
        return self.data["path"]

    @property
    def stem(self) -> str:
        return self.data["stem"]

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def row_group(self) -> int | None:  # parquet: the row group (None: the file has none or cannot be read)
        return self.data.get("row_group")

    @property
    def bytes(self) -> int | None:  # the archive's size and modification time when planned (None: a URL)
        return self.data.get("bytes")

    @property
    def mtime_ns(self) -> int | None:
        return self.data.get("mtime_ns")

    @property
    def sha256(self) -> str | None:  # planned with --detect-changes hash
        return self.data.get("sha256")

    @property
    def error(self) -> str | None:  # why the archive could not be read when planned
        return self.data.get("error")

    @property
    def expected(self) -> int:  # images, -1 when not known before reading
        return self.data.get("expected", -1)

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)


@dataclass
class ArchiveDescription:
    stem: str
    parts: list[dict[str, Any]]  # one per unit: path, stem, kind, bytes, mtime_ns, expected, row_group, error


def describe_archives(kind: str, paths: Iterable[str]) -> list[ArchiveDescription]:
    """Each archive (``kind`` wds or parquet) and its parts: a tar is one part; a parquet file one per row group (one
    part, with its error, when it cannot be read)."""
    described = []
    for path in paths:
        stem = archive_stem(path)
        stat = None if is_url(path) else _stat(path)
        base = {"path": path, "stem": stem, "kind": kind,
                "bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}
        if kind == "wds":
            described.append(ArchiveDescription(stem, [{**base, "expected": _img2dataset_successes(path)}]))
            continue
        from .readers.parquet import row_groups

        groups, error = row_groups(path)
        if error or len(groups) <= 1:
            parts = [{**base, "row_group": 0 if groups else None, "expected": groups[0] if groups else -1,
                      **({"error": error} if error else {})}]
        else:
            parts = [{**base, "row_group": g, "expected": rows} for g, rows in enumerate(groups)]
        described.append(ArchiveDescription(stem, parts))
    return described


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

"""Sources: directories, files and list files -> a sorted list of (key, path), keys unique and stable.

A key is the image's path relative to the directory given (prefixed with that directory's name when several
directories are given), or the path as given for single files and list entries.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico .jp2 .j2k .avif"
    .split()
)


@dataclass(frozen=True)
class SourceItem:
    key: str
    path: str


@dataclass
class SourceListing:
    items: list[SourceItem]
    ignored: int  # files in walked directories without an image extension


def _walk(root: Path) -> tuple[list[Path], int]:
    """All image files under root, following symlinks but never visiting a directory twice (loop safe)."""
    found: list[Path] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                ignored += 1
    return found, ignored


def read_list(stream: TextIO) -> list[str]:
    return [line.rstrip("\n\r") for line in stream if line.strip() and not line.startswith("#")]


def list_sources(
    sources: Sequence[str], files_from: str | None = None, stdin: TextIO | None = None
) -> SourceListing:
    """Expand sources into sorted, unique items; ``-`` (as a source or ``files_from``) reads paths from stdin."""
    stdin = stdin or sys.stdin
    entries: list[tuple[str, str]] = []  # (key, path)
    ignored = 0
    list_paths: list[str] = []
    if files_from is not None:
        if files_from == "-":
            list_paths += read_list(stdin)
        else:
            try:
                with open(files_from, encoding="utf-8") as handle:
                    list_paths += read_list(handle)
            except OSError as exc:
                raise UsageError(f"--files-from {files_from}: {exc.strerror}") from None
    directories = [s for s in sources if s != "-" and Path(s).is_dir()]
    for source in sources:
        if source == "-":
            list_paths += read_list(stdin)
            continue
        path = Path(source)
        if path.is_dir():
            files, skipped = _walk(path)
            ignored += skipped
            prefix = f"{path.resolve().name}/" if len(directories) > 1 else ""
            entries += [(prefix + f.relative_to(path).as_posix(), str(f)) for f in files]
        elif path.is_file():
            entries.append((Path(source).as_posix(), source))
        else:
            raise UsageError(f"source {source!r} does not exist")
    for entry in list_paths:
        entries.append((Path(entry).as_posix(), entry))
    if not entries:
        what = ", ".join(sources) or files_from or "(no sources)"
        extra = f" ({ignored} non-image file(s) ignored)" if ignored else ""
        raise UsageError(f"no images found in {what}{extra}")
    return SourceListing(_unique(entries), ignored)


def _unique(entries: Iterable[tuple[str, str]]) -> list[SourceItem]:
    by_key: dict[str, str] = {}
    for key, path in entries:
        previous = by_key.setdefault(key, path)
        if previous != path and os.path.realpath(previous) != os.path.realpath(path):
            raise UsageError(
                f"two inputs have the same key {key!r}: {previous} and {path}; rename one or pass them separately"
            )
    return [SourceItem(key, by_key[key]) for key in sorted(by_key)]

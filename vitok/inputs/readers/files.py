"""Loose image files: the plan lists every file; the decode stage reads each one (and records its size and time)."""

from __future__ import annotations

from collections.abc import Iterator

from . import InputReader, Sample


class FilesReader(InputReader):
    kind = "files"
    splittable = True

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._cached: tuple[int, list[tuple[str, str]]] | None = None  # a worker reads one unit's lines once

    def items(self, unit) -> list[tuple[str, str]]:
        if self._cached is None or self._cached[0] != unit.index:
            self._cached = (unit.index, unit.files())
        return self._cached[1]

    def samples(self, unit, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        for key, path in self.items(unit)[start:stop]:
            yield Sample(key, path)

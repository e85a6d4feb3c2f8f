"""The interface every on-disk shard format implements (HDF5, NPY, webdataset tars): one class per format.

A format only moves arrays between memory and its files. The commit protocol (temporary names, renames, the
sidecar that makes a shard count, checks) is the same for every format and lives in ``vitok.storage.shards``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class FeatureLayout:
    """Shape of one stored feature: ``(levels, rows, dim)`` when ``levels`` (deepstack), else ``(rows, dim)``."""

    dim: int
    levels: int | None = None

    def numpy_dtype(self, store_dtype: str) -> np.dtype:
        return numpy_dtype(store_dtype)


def numpy_dtype(store_dtype: str) -> np.dtype:
    """The numpy dtype a stored dtype is written as (bfloat16 as its uint16 bits)."""
    return np.dtype({"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[store_dtype])


def row_offsets(rows) -> np.ndarray:
    """Rows per image -> int64 offsets (n + 1 of them: image i's rows are offsets[i]:offsets[i + 1])."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(rows, out=offsets[1:])
    return offsets


def encode_keys(keys: list[str]) -> list[bytes]:
    """Keys as bytes: UTF-8, except names that were not UTF-8 on disk, which keep their original bytes."""
    return [os.fsencode(key) for key in keys]


class ShardDataWriter(ABC):
    """Streams one shard's arrays into a temporary path; ``finish`` writes the per-image tables and closes."""

    def append(self, feature: str, array: np.ndarray) -> None:
        """Rows of a whole batch for one feature: (rows, dim) or (levels, rows, dim) (array formats)."""
        raise NotImplementedError

    def write_batch(self, keys: list[str], records: list[dict[str, Any]], arrays: dict[str, np.ndarray],
                    rows: dict[str, list[int]], order: list[int] | None = None) -> None:
        """A finished batch: its images' keys and records, and per feature the packed rows and rows per image.
        ``order`` lists the images in input order (they are encoded sorted by grid). Array formats append each
        feature once (offsets make the order irrelevant); per-sample formats (webdataset) override this."""
        for feature, array in arrays.items():
            self.append(feature, array)

    def read_rows(self, feature: str, image: int, start: int, stop: int) -> np.ndarray:
        """Read back rows ``start:stop`` of ``feature`` already written, which are the ``image``-th image's (in row
        order): a duplicate image's rows are copied from its first copy's (formats with ``reads_back``)."""
        raise NotImplementedError

    @abstractmethod
    def finish(self, keys: list[str], offsets: dict[str, np.ndarray], grids: np.ndarray) -> None:
        """Write keys, grids and offsets (rows of image i: offsets[i]:offsets[i+1]), flush and fsync."""

    @abstractmethod
    def abort(self) -> None:
        """Close whatever is open after a failure; the caller deletes the temporary path."""


class ShardDataReader(ABC):
    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def grids(self) -> np.ndarray | None: ...

    @abstractmethod
    def offsets(self, feature: str) -> np.ndarray: ...

    @abstractmethod
    def array(self, feature: str):
        """The stored array (h5py dataset, numpy memmap or array): index it to read."""

    @abstractmethod
    def stored_dtype(self, feature: str) -> str: ...

    def rows(self, feature: str) -> int:
        array = self.array(feature)
        return int(array.shape[-2]) if array.ndim >= 2 else 0

    def close(self) -> None:  # noqa: B027 - most readers hold nothing open
        """Release open handles."""


class ShardFormat(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]  # data file suffix; "" for a folder
    reads_back: ClassVar[bool] = False  # its writer implements read_rows (within-shard duplicates are copied)

    def data_name(self, shard: str) -> str:
        return shard + self.suffix

    @abstractmethod
    def create(self, path: Path, layouts: dict[str, FeatureLayout], store_dtype: str,
               compression: str | None = None) -> ShardDataWriter: ...

    @abstractmethod
    def open(self, path: Path) -> ShardDataReader: ...

    def open_at(self, root, name: str) -> ShardDataReader:
        """Open committed data in a store (``root``: a ``roots.StoreRoot``; ``name``: ``shards/<data>``): in place in a
        local folder; elsewhere by byte ranges where the format allows it (this default reads a local copy)."""
        path = root.local_path(name)
        return self.open(path if path is not None else root.fetch(name))

    def open_whole(self, root, name: str) -> ShardDataReader:
        """Open committed data to read all of it (``iter_shards``, exports, ``verify``): in place in a local folder;
        elsewhere fetched once into local temporary space (one request per file, not one per block), freed when the
        reader closes. Single keys are read with ``open_at``, by byte ranges."""
        path = root.local_path(name)
        if path is not None:
            return self.open(path)
        with root.local_copy(name) as copy:
            return self.open(copy)

    def data_files(self, path: Path) -> list[Path]:
        """The files that make up one shard's data (sized and checksummed in the sidecar)."""
        if path.is_dir():
            return sorted(p for p in path.iterdir() if p.is_file())
        return [path]

"""A store's key and content indexes: key lookups in microseconds, a million-key store opened without parsing its
sidecars, and images found by pixel content id (``inputs.identity``), with numpy alone (no torch, no h5py to look up).

``OUT/.index/`` is a cache derived from the committed shards and the plan; delete it at will, it is rebuilt on the
next open when it is missing or when a sidecar, data file or plan file changed (``sources_digest``: names, sizes and
mtimes):

    catalog.json               what the arrays were built from (digest), the shards (sidecars without records),
                               features, skipped/failed reasons, keys removed by --update, counts
    <digest>.<name>.npy        arrays in key-hash order, memory-mapped on open:
        key_hash     (n,) uint64, sorted: blake2b-64 of the key's bytes (UTF-8, surrogate escapes kept)
        key_at       (n + 1,) int64 offsets into key_bytes; key_bytes (total,) uint8: the keys themselves
        key_sorted   (v,) int64: positions in key (string) order of the listed keys (not removed by --update)
        shard, row   (n,) int32: the key's shard (index into the catalog's shards) and row among its ok images
        <feature>    (n, 2) int64: the key's rows [start, stop) in that shard's feature array
        content_hash (m,) uint64 sorted, content_id (m, 32) uint8, content_key (m,) int64: ok images by content id
                     (first 8 bytes, the whole id, the position in the key arrays)

The cache is written under temporary names and published by renaming ``catalog.json`` last, so a reader sees the
old index or the new one; a store on a read-only mount is indexed in memory instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import AtomicFile
from .files import atomic_write_text, remove
from .format import ShardDataReader, ShardFormat, row_offsets
from .keys import key_bytes
from .layout import INDEX_DIR, PLAN_DIR, SHARDS_DIR

logger = logging.getLogger(__name__)

CATALOG = "catalog.json"
VERSION = 1


def key_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def sources_digest(root: Path) -> str:
    """What the index is derived from: the name, size and mtime of every sidecar, shard data file (its byte offsets
    are in the index) and plan file."""
    digest = hashlib.blake2b(digest_size=12)
    for folder in (Path(root) / SHARDS_DIR, Path(root) / PLAN_DIR):
        try:
            entries = sorted((e.name, e.stat()) for e in os.scandir(folder) if not e.name.startswith("."))
        except FileNotFoundError:
            continue
        for name, stat in entries:
            digest.update(f"{folder.name}/{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class Entry:
    """One visible ok key as the index stores it."""

    key: str
    shard: int
    row: int
    rows: dict[str, tuple[int, int]]  # feature -> [start, stop)
    content_id: str | None = None
    listed: bool = True  # False: removed from the sources by --update (readable, not listed)


@dataclass
class StoreIndex:
    catalog: dict[str, Any]
    arrays: dict[str, np.ndarray]

    # ---- building ------------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, catalog: dict[str, Any], entries: Sequence[Entry], features: Iterable[str],
              layouts: Sequence[dict[str, dict[str, Any] | None]] = ()) -> StoreIndex:
        """``layouts``: per shard (in the catalog's order), each feature's ``feature_layout``."""
        encoded = [key_bytes(e.key) for e in entries]
        hashes = np.array([key_hash(b) for b in encoded], dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        encoded = [encoded[i] for i in order]
        entries = [entries[i] for i in order]
        lengths = np.array([len(b) for b in encoded], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            "key_hash": hashes[order],
            "key_at": row_offsets(lengths),
            "key_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            "key_sorted": np.array(sorted((i for i, e in enumerate(entries) if e.listed), key=lambda i: entries[i].key),
                                   dtype=np.int64),
            "shard": np.array([e.shard for e in entries], dtype=np.int32),
            "row": np.array([e.row for e in entries], dtype=np.int32),
        }
        for feature in features:
            arrays[feature] = np.array([e.rows[feature] for e in entries], dtype=np.int64).reshape(-1, 2)
        with_content = [(bytes.fromhex(e.content_id), i) for i, e in enumerate(entries) if e.content_id]
        ids = np.frombuffer(b"".join(c for c, _ in with_content), dtype=np.uint8).reshape(-1, 32)
        prefix = ids[:, :8].copy().view("<u8").reshape(-1) if len(ids) else np.zeros(0, dtype=np.uint64)
        content_order = np.argsort(prefix, kind="stable")
        arrays["content_hash"] = prefix[content_order].astype(np.uint64)
        arrays["content_id"] = ids[content_order]
        arrays["content_key"] = np.array([with_content[i][1] for i in content_order], dtype=np.int64)
        chunk_offsets: list[int] = []
        described = []
        for shard in layouts:
            described.append({})
            for feature, layout in shard.items():
                if layout is not None:
                    described[-1][feature] = {"file": layout["file"], "dtype": layout["dtype"],
                                              "chunk": layout["chunk"], "first": len(chunk_offsets),
                                              "count": len(layout["offsets"])}
                    chunk_offsets += layout["offsets"]
        arrays["chunk_offsets"] = np.array(chunk_offsets, dtype=np.int64)
        return cls({**catalog, "version": VERSION, "count": len(entries), "visible": len(arrays["key_sorted"]),
                    "features": list(features), "layouts": described}, arrays)

    def layouts(self) -> list[dict[str, tuple]]:
        """Per shard, each byte-readable feature's (file, dtype, chunk shape, chunk offsets) for ``read_range``."""
        offsets = self.arrays["chunk_offsets"]
        found = []
        for shard in self.catalog.get("layouts", []):
            found.append({})
            for feature, layout in shard.items():
                found[-1][feature] = (layout["file"], np.dtype(layout["dtype"]), tuple(layout["chunk"]),
                                      offsets[layout["first"]:layout["first"] + layout["count"]].tolist())
        return found

    def save(self, root: Path) -> None:
        """Write the cache (arrays first, then the catalog that names them); older arrays are removed."""
        folder = Path(root) / INDEX_DIR
        folder.mkdir(exist_ok=True)
        digest = self.catalog["digest"]
        for name, array in self.arrays.items():
            with AtomicFile(folder, f"{digest}.{name}", folder / f"{digest}.{name}.npy") as atomic:
                np.save(atomic.handle, array)
        atomic_write_text(folder / CATALOG, json.dumps(self.catalog, ensure_ascii=True))
        for path in folder.iterdir():
            if path.suffix == ".npy" and not path.name.startswith(digest + "."):
                remove(path)

    # ---- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: Path, digest: str) -> StoreIndex | None:
        """The cached index if it was built from exactly the current sidecars and plan, else None."""
        folder = Path(root) / INDEX_DIR
        try:
            catalog = json.loads((folder / CATALOG).read_text())
            if catalog.get("version") != VERSION or catalog.get("digest") != digest:
                return None
            names = ["key_hash", "key_at", "key_bytes", "key_sorted", "shard", "row", "content_hash", "content_id",
                     "content_key", "chunk_offsets", *catalog["features"]]
            arrays = {name: _load(folder / f"{digest}.{name}.npy") for name in names}
        except (OSError, ValueError, KeyError):
            return None
        return cls(catalog, arrays)

    # ---- lookups -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.catalog["count"])

    def find(self, key: str) -> int | None:
        """The key's position in the arrays, or None."""
        data = key_bytes(key)
        hashes, at, blob = self.arrays["key_hash"], self.arrays["key_at"], self.arrays["key_bytes"]
        target = np.uint64(key_hash(data))
        i = int(hashes.searchsorted(target))
        while i < len(hashes) and hashes[i] == target:  # (a 64-bit collision: compare the keys themselves)
            if blob[at[i]:at[i + 1]].tobytes() == data:
                return i
            i += 1
        return None

    def key(self, position: int) -> str:
        at = self.arrays["key_at"]
        return self.arrays["key_bytes"][at[position]:at[position + 1]].tobytes().decode("utf-8", "surrogateescape")

    def sorted_keys(self) -> list[str]:
        at, blob = self.arrays["key_at"], self.arrays["key_bytes"].tobytes()
        return [blob[at[i]:at[i + 1]].decode("utf-8", "surrogateescape") for i in self.arrays["key_sorted"].tolist()]

    def find_content(self, content_id: str) -> int | None:
        """Position (in the key arrays) of an ok image with this content id, or None."""
        raw = bytes.fromhex(content_id)
        hashes = self.arrays["content_hash"]
        target = np.frombuffer(raw[:8], dtype="<u8")[0]
        i = int(hashes.searchsorted(target))
        while i < len(hashes) and hashes[i] == target:
            if self.arrays["content_id"][i].tobytes() == raw:
                return int(self.arrays["content_key"][i])
            i += 1
        return None


def _load(path: Path) -> np.ndarray:
    try:  # a plain ndarray view of the map: indexing a np.memmap goes through Python and costs microseconds
        return np.asarray(np.load(path, mmap_mode="r"))
    except ValueError:  # numpy cannot memory-map an empty array
        return np.load(path)


def open_index(root: Path, build) -> StoreIndex:
    """The store's index: the cached one when current, else ``build()`` (saved when the store is writable)."""
    digest = sources_digest(root)
    index = StoreIndex.load(root, digest)
    if index is not None:
        return index
    index = build(digest)
    try:
        index.save(root)
    except Exception as exc:  # a read-only mount, a full disk: the index stays in memory
        with contextlib.suppress(Exception):
            logger.debug("store index not cached in %s: %s", root, exc)
    return index


def feature_layout(fmt: str, path: Path, feature: str) -> dict[str, Any] | None:
    """Where one shard's rows of a feature sit in its file, for reads by byte range without the format's library:
    ``{"file": name under shards/, "dtype", "chunk": shape of each chunk (C order; rows on axis -2), "offsets": byte
    offset of each chunk in row order}``. NPY is one chunk; uncompressed HDF5 lists its chunks. None when rows
    cannot be read by position (compressed HDF5, webdataset tars): they are read through the format's reader."""
    if fmt == "npy":
        file = path / f"{feature}.npy"
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran or len(shape) < 2 or shape[-2] == 0:
            return None
        return {"file": f"{path.name}/{file.name}", "dtype": dtype.str, "chunk": list(shape), "offsets": [offset]}
    if fmt != "hdf5":
        return None
    import h5py

    with h5py.File(path, "r") as handle:
        dataset = handle[feature]
        rows_axis = dataset.ndim - 2
        if dataset.compression or dataset.ndim < 2 or dataset.shape[rows_axis] == 0:
            return None
        if dataset.chunks is None:  # contiguous
            offset = dataset.id.get_offset()
            return None if offset is None else {"file": path.name, "dtype": dataset.dtype.str,
                                                "chunk": list(dataset.shape), "offsets": [int(offset)]}
        per_chunk = dataset.chunks[rows_axis]
        count = -(-dataset.shape[rows_axis] // per_chunk)
        whole = all(c == n for axis, (c, n) in enumerate(zip(dataset.chunks, dataset.shape)) if axis != rows_axis)
        if dataset.id.get_num_chunks() != count or not whole:
            return None
        infos = sorted((dataset.id.get_chunk_info(i) for i in range(count)), key=lambda c: c.chunk_offset[rows_axis])
        return {"file": path.name, "dtype": dataset.dtype.str, "chunk": list(dataset.chunks),
                "offsets": [int(info.byte_offset) for info in infos]}


def read_range(fd: int, layout: tuple, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` read with ``os.pread`` from an open file, through a layout the index recorded
    (``StoreIndex.layouts``): one read per chunk touched, K per chunk for (K, rows, dim) features."""
    _file, dtype, chunk, offsets = layout
    per_chunk, dim = chunk[-2], chunk[-1]
    index, within = divmod(start, per_chunk)
    if within + stop - start > per_chunk:  # rows across chunks: one read per chunk
        parts, row = [], start
        while row < stop:
            take = min(stop - row, per_chunk - row % per_chunk)
            parts.append(read_range(fd, layout, row, row + take))
            row += take
        return np.concatenate(parts, axis=-2)
    size = (stop - start) * dim * dtype.itemsize
    first = offsets[index] + within * dim * dtype.itemsize
    if len(chunk) == 2:
        return np.frombuffer(os.pread(fd, size, first), dtype=dtype).reshape(stop - start, dim)
    level = per_chunk * dim * dtype.itemsize
    data = b"".join(os.pread(fd, size, first + k * level) for k in range(chunk[0]))
    return np.frombuffer(data, dtype=dtype).reshape(chunk[0], stop - start, dim)


class RowReader:
    """One shard of an indexed store: rows by byte range (``read_range``, a file descriptor per file read), and its
    format's reader, opened when first needed (``keys``, ``offsets``, ``array``...), for the shards the index has
    no byte layout for (compressed HDF5, webdataset) and for whole-shard reads."""

    def __init__(self, fmt: ShardFormat, path: Path) -> None:
        self.fmt, self.path = fmt, path
        self._reader: ShardDataReader | None = None
        self._arrays: dict[str, Any] = {}
        self._fds: dict[str, int] = {}  # files read by byte range (the shard's .h5, or its <feature>.npy files)

    def read_range(self, layout: tuple, start: int, stop: int) -> np.ndarray:
        """Rows by byte range through a layout the index recorded (no format library involved)."""
        file = layout[0]
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.path.parent / file, os.O_RDONLY)
        return read_range(fd, layout, start, stop)

    @property
    def reader(self) -> ShardDataReader:
        if self._reader is None:
            self._reader = self.fmt.open(self.path)
        return self._reader

    def __getattr__(self, name: str):  # keys, grids, offsets, array, stored_dtype, rows: the format reader's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.reader, name)

    def read(self, feature: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a feature, in the stored dtype."""
        array = self._arrays.get(feature)
        if array is None:
            array = self.reader.array(feature)
            array = self._arrays[feature] = np.asarray(array) if isinstance(array, np.memmap) else array
        return np.asarray(array[..., start:stop, :])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._arrays.clear()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

"""Webdataset shards: ``<shard>.tar`` with one sample per image, joinable with the input by key.

    <key>.<feature>.npy   one image's rows of one feature ((n, dim), deepstack (K, n, dim)), stored dtype
    <key>.json            the image's record (vitok key, source, member, grid, caption...)
    __vitok__             the shard's tables as JSON (keys, grids, rows per feature): webdataset readers skip it
Samples are written in input order (batches are encoded sorted by grid, then put back), so the output can also be
zipped with its input tar sample by sample.

For tar inputs the sample key is the input sample's own ``__key__`` and the output shard is named after the input
tar, so ``shards/00042.tar`` holds exactly the samples of ``00042.tar`` under the same keys (Megatron-Energon's
join, webdataset's ``.compose``). Other inputs use their vitok key with ``%`` and ``.`` percent-escaped (``%25``,
``%2E``: a dot would end a webdataset key), so two keys never share a member name (``x.y.jpg`` -> ``x%2Ey%2Ejpg``,
``x_y.jpg`` -> ``x_y%2Ejpg``). Stores written before made dots underscores; their index keeps the names they used.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .format import FeatureLayout, ShardDataReader, ShardDataWriter, ShardFormat, numpy_dtype, row_offsets
from .shards import register_format

INDEX = "__vitok__"  # a name webdataset's readers skip (``__*__``), holding JSON


def sample_key(record: dict) -> str:
    """The sample's webdataset key: the input sample's own key (its member's path up to the first dot of the
    basename) for tar inputs, else the vitok key with ``%`` and ``.`` escaped (injective, no dot)."""
    from ..inputs.sources import is_tar  # here: the input walk imports this package (for the store's layout)

    member, source = record.get("member"), str(record.get("source", ""))
    if member and is_tar(source):
        folder, _, base = member.rpartition("/")
        return f"{folder}/{base.split('.')[0]}" if folder else base.split(".")[0]
    return record["key"].replace("%", "%25").replace(".", "%2E")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array))
    return buffer.getvalue()


class WdsWriter(ShardDataWriter):
    def __init__(self, path: Path, layouts: dict[str, FeatureLayout], store_dtype: str, compression=None):
        self.path, self.layouts, self.store_dtype = path, layouts, store_dtype
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)
        self._members: list[str] = []
        self._taken: set[str] = set()
        self._data_at: dict[str, tuple[int, int]] = {}  # member -> (offset of its data in the tar, bytes)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data ends the member, padded
        self._data_at[name] = (self._tar.offset - padded, len(data))

    def read_rows(self, feature: str, image: int, start: int, stop: int) -> np.ndarray:
        offset, size = self._data_at[f"{self._members[image]}.{feature}.npy"]
        self._tar.fileobj.flush()
        with open(self.path, "rb") as handle:  # (the tar's own handle is write-only)
            return np.load(io.BytesIO(os.pread(handle.fileno(), size, offset)))

    def write_batch(self, keys, records, arrays, rows, order=None) -> None:
        starts = {f: row_offsets(r) for f, r in rows.items()}
        names = [sample_key(record) for record in records]
        if len(set(names)) < len(names) or not self._taken.isdisjoint(names):  # webdataset would refuse the tar
            clash = next(n for i, n in enumerate(names) if n in self._taken or n in names[:i])
            raise StoreError(f"two images of shard {self.path.name} would share the member name {clash!r}")
        self._taken.update(names)
        self._members += names  # in row order, as the keys and offsets of the shard's tables
        for i in order if order is not None else range(len(records)):  # the tar itself in input order
            record, name = records[i], names[i]
            for feature, array in arrays.items():
                self._add(f"{name}.{feature}.npy", _npy(array[..., starts[feature][i]:starts[feature][i + 1], :]))
            self._add(f"{name}.json", json.dumps(record, ensure_ascii=True).encode())

    def finish(self, keys, offsets, grids) -> None:
        index = {"keys": list(keys), "members": self._members, "grids": grids.tolist(),
                 "offsets": {f: o.tolist() for f, o in offsets.items()}, "vitok_dtype": self.store_dtype,
                 "layouts": {f: [layout.levels, layout.dim] for f, layout in self.layouts.items()}}
        self._add(INDEX, json.dumps(index, ensure_ascii=True).encode())
        self._tar.close()
        with open(self.path, "rb") as handle:
            os.fsync(handle.fileno())

    def abort(self) -> None:
        try:
            self._tar.close()
        except OSError:  # a full disk fails the final blocks; the file is deleted anyway
            pass


class _FeatureMembers:
    """One feature of a shard, indexable like the arrays of the other formats: ``[..., start:stop, :]`` reads the
    members of the images whose rows those are."""

    def __init__(self, reader: WdsReader, feature: str) -> None:
        self.reader, self.feature = reader, feature
        levels, self.dim = reader.index["layouts"][feature]
        self.levels = levels
        self.offsets = np.asarray(reader.index["offsets"][feature], dtype=np.int64)
        rows = int(self.offsets[-1])
        self.shape = (levels, rows, self.dim) if levels else (rows, self.dim)
        self.ndim = len(self.shape)
        self.dtype = numpy_dtype(reader.index["vitok_dtype"])

    def _image(self, i: int) -> np.ndarray:
        return np.load(io.BytesIO(self.reader.member(f"{self.reader.index['members'][i]}.{self.feature}.npy")))

    def __getitem__(self, item) -> np.ndarray:
        rows = item[-2] if isinstance(item, tuple) and len(item) >= 2 else slice(None)
        start, stop, _ = rows.indices(self.shape[-2])
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = [self._image(i) for i in range(max(first, 0), len(self.offsets) - 1) if self.offsets[i] < stop]
        if not parts:
            return np.zeros((*self.shape[:-2], 0, self.dim), dtype=self.dtype)
        joined = np.concatenate(parts, axis=-2)
        base = int(self.offsets[max(first, 0)])
        return joined[..., start - base : stop - base, :]

    def __array__(self, dtype=None, copy=None):
        return self[...] if dtype is None else self[...].astype(dtype)


class WdsReader(ShardDataReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar = tarfile.open(path, "r")
        self._members = {m.name: m for m in self._tar.getmembers()}
        self.index = json.loads(self.member(INDEX))

    def member(self, name: str) -> bytes:
        return self._tar.extractfile(self._members[name]).read()

    def keys(self) -> list[str]:
        return list(self.index["keys"])

    def grids(self) -> np.ndarray | None:
        return np.asarray(self.index["grids"], dtype=np.int32).reshape(-1, 3)

    def offsets(self, feature: str) -> np.ndarray:
        return np.asarray(self.index["offsets"][feature], dtype=np.int64)

    def array(self, feature: str):
        return _FeatureMembers(self, feature)

    def stored_dtype(self, feature: str) -> str:
        return self.index["vitok_dtype"]

    def close(self) -> None:
        self._tar.close()


@register_format
class WdsFormat(ShardFormat):
    name = "wds"
    suffix = ".tar"
    reads_back = True

    def create(self, path, layouts, store_dtype, compression=None) -> WdsWriter:
        return WdsWriter(path, layouts, store_dtype)

    def open(self, path) -> WdsReader:
        return WdsReader(path)

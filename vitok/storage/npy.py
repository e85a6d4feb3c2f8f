"""NPY shards: a folder ``<shard>/`` of plain ``.npy`` files, readable with ``numpy.load`` alone.

    keys.npy               (n,) unicode strings
    grids.npy              (n, 3) int32: each image's (t, h, w) in patches
    <feature>.npy          (rows, dim), or (K, rows, dim) for deepstack
    <feature>_offsets.npy  (n + 1,) int64
    meta.json              {"vitok_dtype": ..., "shard": ...}

Rows are streamed to disk as batches finish: a 2-D array goes straight into its ``.npy`` file behind a fixed-size
header that is filled in at the end; a (K, rows, dim) array is streamed level by level into K part files that are
joined, block by block, when the shard is finished (C order puts each level's rows together).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from .format import FeatureLayout, ShardDataReader, ShardDataWriter, ShardFormat

HEADER_BYTES = 256  # a multiple of 64, room for any (K, rows, dim) shape
COPY_BLOCK = 16 << 20


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header padded to exactly HEADER_BYTES (numpy accepts any padding)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    room = HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > room:
        raise ValueError(f"npy header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + (text.ljust(room - 1) + "\n").encode("latin1")


class NpyWriter(ShardDataWriter):
    def __init__(self, path: Path, layouts: dict[str, FeatureLayout], store_dtype: str, compression=None):
        self.path, self.layouts, self.store_dtype = path, layouts, store_dtype
        path.mkdir()
        self._rows = dict.fromkeys(layouts, 0)
        self._handles = {}
        for feature, layout in layouts.items():
            if layout.levels:
                self._handles[feature] = [open(path / f"{feature}.level{k}.part", "w+b") for k in range(layout.levels)]
            else:
                handle = open(path / f"{feature}.npy", "w+b")  # + : read_rows reads back
                handle.write(b"\0" * HEADER_BYTES)
                self._handles[feature] = [handle]

    def append(self, feature: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.layouts[feature].numpy_dtype(self.store_dtype))
        levels = array if self.layouts[feature].levels else array[None]
        for handle, level in zip(self._handles[feature], levels):
            handle.write(level.tobytes())
        self._rows[feature] += array.shape[-2]

    def read_rows(self, feature: str, image: int, start: int, stop: int) -> np.ndarray:
        layout = self.layouts[feature]
        dtype = layout.numpy_dtype(self.store_dtype)
        row_bytes = layout.dim * dtype.itemsize
        levels = []
        for handle in self._handles[feature]:
            handle.flush()
            skip = 0 if layout.levels else HEADER_BYTES
            data = os.pread(handle.fileno(), (stop - start) * row_bytes, skip + start * row_bytes)
            levels.append(np.frombuffer(data, dtype=dtype).reshape(stop - start, layout.dim))
        return np.stack(levels) if layout.levels else levels[0]

    def finish(self, keys: list[str], offsets: dict[str, np.ndarray], grids: np.ndarray) -> None:
        for feature, layout in self.layouts.items():
            dtype = layout.numpy_dtype(self.store_dtype)
            handles = self._handles[feature]
            if layout.levels:
                with open(self.path / f"{feature}.npy", "wb") as out:
                    out.write(npy_header(dtype, (layout.levels, self._rows[feature], layout.dim)))
                    for handle in handles:
                        handle.close()
                        with open(handle.name, "rb") as part:
                            shutil.copyfileobj(part, out, COPY_BLOCK)
                        os.unlink(handle.name)
            else:
                handle = handles[0]
                handle.seek(0)
                handle.write(npy_header(dtype, (self._rows[feature], layout.dim)))
                handle.close()
            np.save(self.path / f"{feature}_offsets.npy", offsets[feature].astype(np.int64))
        np.save(self.path / "keys.npy", np.array(keys, dtype=np.str_).reshape(-1))
        np.save(self.path / "grids.npy", grids.astype(np.int32).reshape(-1, 3))
        (self.path / "meta.json").write_text(json.dumps({"vitok_dtype": self.store_dtype, "shard": self.path.name}))
        for file in self.path.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())

    def abort(self) -> None:
        for handles in self._handles.values():
            for handle in handles:
                try:
                    handle.close()
                except OSError:  # a full disk fails the final flush; the folder is deleted anyway
                    pass


class NpyReader(ShardDataReader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._dtype = json.loads((path / "meta.json").read_text())["vitok_dtype"]

    def keys(self) -> list[str]:
        return [str(k) for k in np.load(self.path / "keys.npy")]

    def grids(self) -> np.ndarray | None:
        path = self.path / "grids.npy"
        return np.load(path) if path.exists() else None

    def offsets(self, feature: str) -> np.ndarray:
        return np.load(self.path / f"{feature}_offsets.npy")

    def array(self, feature: str):
        try:
            return np.load(self.path / f"{feature}.npy", mmap_mode="r")
        except ValueError:  # numpy cannot memory-map an array without rows
            return np.load(self.path / f"{feature}.npy")

    def stored_dtype(self, feature: str) -> str:
        return self._dtype


class RangedNpy:
    """A stored ``.npy`` array read by byte ranges (``read_range(start, size)``): the header once, then only the
    rows asked for, ``[..., start:stop, :]`` (K reads for a (K, rows, dim) array); ``[...]`` reads it whole."""

    def __init__(self, read_range) -> None:
        self._read = read_range
        head = read_range(0, HEADER_BYTES)
        handle = io.BytesIO(head)
        version = np.lib.format.read_magic(handle)
        if len(head) < 12 or version not in ((1, 0), (2, 0)):
            raise ValueError("not a .npy file vitok wrote")
        length = int.from_bytes(head[8:10] if version == (1, 0) else head[8:12], "little")
        start = (10 if version == (1, 0) else 12) + length
        if start > len(head):
            handle = io.BytesIO(read_range(0, start))
            np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = reader(handle)
        if fortran:
            raise ValueError("Fortran-ordered .npy")
        self.ndim, self._start = len(self.shape), start

    def _rows(self, start: int, stop: int) -> np.ndarray:
        *levels, rows, dim = self.shape
        row_bytes = dim * self.dtype.itemsize
        parts = []
        for k in range(levels[0] if levels else 1):
            offset = self._start + (k * rows + start) * row_bytes
            data = self._read(offset, (stop - start) * row_bytes) if stop > start else b""
            parts.append(np.frombuffer(data, dtype=self.dtype).reshape(stop - start, dim))
        return np.stack(parts) if levels else parts[0]

    def __getitem__(self, item) -> np.ndarray:
        if item is Ellipsis:
            return self._rows(0, self.shape[-2])
        if (isinstance(item, tuple) and len(item) == 3 and item[0] is Ellipsis and isinstance(item[1], slice)
                and item[2] == slice(None) and item[1].step in (None, 1)):
            start, stop, _ = item[1].indices(self.shape[-2])
            return self._rows(start, max(start, stop))
        return self[...][item]

    def __array__(self, dtype=None, copy=None):
        return self[...] if dtype is None else self[...].astype(dtype)


class RemoteNpyReader(NpyReader):
    """An NPY shard in an object store: the small files read whole, each feature by byte ranges (``RangedNpy``)."""

    def __init__(self, root, name: str) -> None:
        self.root, self.name, self.path = root, name, None
        self._dtype = json.loads(root.read(f"{name}/meta.json"))["vitok_dtype"]

    def _load(self, member: str) -> np.ndarray:
        return np.load(io.BytesIO(self.root.read(f"{self.name}/{member}")))

    def keys(self) -> list[str]:
        return [str(k) for k in self._load("keys.npy")]

    def grids(self) -> np.ndarray | None:
        try:
            return self._load("grids.npy")
        except FileNotFoundError:
            return None

    def offsets(self, feature: str) -> np.ndarray:
        return self._load(f"{feature}_offsets.npy")

    def array(self, feature: str):
        member = f"{self.name}/{feature}.npy"
        return RangedNpy(lambda start, size: self.root.read_range(member, start, size))


class NpyFormat(ShardFormat):
    name = "npy"
    suffix = ""  # a folder
    reads_back = True

    def create(self, path, layouts, store_dtype, compression=None) -> NpyWriter:
        return NpyWriter(path, layouts, store_dtype)

    def open(self, path) -> NpyReader:
        return NpyReader(path)

    def open_at(self, root, name: str) -> NpyReader:
        path = root.local_path(name)
        return NpyReader(path) if path is not None else RemoteNpyReader(root, name)

    def open_whole(self, root, name: str) -> NpyReader:
        """A folder of files: each small file is one GET, and a feature's ``[...]`` one ranged GET of all of it."""
        return self.open_at(root, name)

"""HDF5 shards: one file ``<shard>.h5``, rows streamed into resizable datasets as batches finish.

    keys               (n,) variable-length strings (UTF-8; names that are not UTF-8 keep their raw bytes)
    grids              (n, 3) int32: each image's (t, h, w) in patches
    <feature>          (rows, dim), or (K, rows, dim) for deepstack; attribute vitok_dtype
    <feature>_offsets  (n + 1,) int64: image i owns rows offsets[i]:offsets[i+1]
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path

import numpy as np

from .format import FeatureLayout, ShardDataReader, ShardDataWriter, ShardFormat, encode_keys

COMPRESSIONS = ("gzip", "lzf")  # the filters every h5py build has
CHUNK_BYTES = 1 << 20  # HDF5's default chunk cache: a chunk is read whole and cached


class _GuardedFile(io.FileIO):
    """The HDF5 file's bytes go through Python, and libhdf5 never sees a failed write. The first one (a full disk)
    is kept in ``error``, and from then on (or after ``abort``) writes are held in memory instead of the file, while
    reads see them: libhdf5's view of its file stays whole, so it can still close it (``Hdf5Writer`` raises
    ``error`` as soon as the HDF5 call returns, and the file is deleted). Held bytes are at most the rest of one
    call and the metadata flushed at close. (A failed write seen by libhdf5 left ids it could not release, "Can't
    decrement id ref count", and the interpreter crashed closing the file or at exit; discarded bytes read back as
    garbage crashed it too.)"""

    discard = False  # writes go to ``held``, not the file
    error: OSError | None = None  # the first failed write

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if not self.discard:
            done = 0
            try:
                while done < len(view):  # h5py ignores the count: a short write (a disk nearly full) would lose bytes
                    written = self.write_some(view[done:])
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += written
                return done
            except OSError as exc:
                self.discard, self.error = True, exc
                super().seek(-done, os.SEEK_CUR)
        self.hold(self.tell(), view)
        return len(view)

    def write_some(self, view: memoryview) -> int:
        """One write(2): it may write less than asked (the tests make it fail here, as a full disk does)."""
        return super().write(view)

    def hold(self, offset: int, view: memoryview) -> None:
        if not hasattr(self, "held"):
            self.held: list[tuple[int, bytes]] = []
        self.held.append((offset, bytes(view)))
        super().seek(offset + len(view))

    def readinto(self, buffer) -> int:
        start = self.tell()
        view = memoryview(buffer).cast("B")
        count = super().readinto(view) or 0
        held = getattr(self, "held", [])
        if not held:
            return count
        view[count:] = bytes(len(view) - count)  # (libhdf5 would take unread bytes as they are: garbage)
        for offset, data in held:  # in write order: later writes win
            lo, hi = max(start, offset), min(start + len(view), offset + len(data))
            if lo < hi:
                view[lo - start : hi - start] = data[lo - offset : hi - offset]
                count = max(count, hi - start)
        super().seek(start + count)
        return count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END and getattr(self, "held", None):  # libhdf5 asks for the end of its file so
            end = max([super().seek(0, os.SEEK_END)] + [o + len(d) for o, d in self.held])
            return super().seek(end + offset)
        return super().seek(offset, whence)

    def truncate(self, size=None) -> int:
        if not self.discard:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.discard, self.error = True, exc
        return size if size is not None else self.tell()


class Hdf5Writer(ShardDataWriter):
    def __init__(self, path: Path, layouts: dict[str, FeatureLayout], store_dtype: str, compression: str | None):
        import h5py

        self.path, self.layouts, self.store_dtype, self.compression = path, layouts, store_dtype, compression
        self._raw = _GuardedFile(path, "w+")
        self._file = None
        self._datasets = {}
        try:
            with self._write_errors():
                self._file = h5py.File(self._raw, "w")
                self._create_datasets()
        except BaseException:
            self.abort()  # else the half-made file is closed by the garbage collector, writing, at exit
            raise

    def _create_datasets(self) -> None:
        layouts, store_dtype, compression = self.layouts, self.store_dtype, self.compression
        for feature, layout in layouts.items():
            leading = (layout.levels,) if layout.levels else ()
            row_bytes = layout.dim * (layout.levels or 1) * layout.numpy_dtype(store_dtype).itemsize
            chunks = (*leading, max(16, min(1024, CHUNK_BYTES // row_bytes)), layout.dim)
            ds = self._file.create_dataset(
                feature, shape=(*leading, 0, layout.dim), maxshape=(*leading, None, layout.dim), chunks=chunks,
                dtype=layout.numpy_dtype(store_dtype), compression=compression,
            )
            ds.attrs["vitok_dtype"] = store_dtype
            self._datasets[feature] = ds

    def append(self, feature: str, array: np.ndarray) -> None:
        with self._write_errors():
            ds = self._datasets[feature]
            start = ds.shape[-2]
            ds.resize(start + array.shape[-2], axis=ds.ndim - 2)
            ds[..., start:, :] = array

    def read_rows(self, feature: str, image: int, start: int, stop: int) -> np.ndarray:
        return self._datasets[feature][..., start:stop, :]

    @contextlib.contextmanager
    def _write_errors(self):
        """Report a failed write as the OSError it was (libhdf5 may surface it as another exception)."""
        try:
            yield
        except Exception:
            if self._raw.error is not None:
                raise self._raw.error from None
            raise
        if self._raw.error is not None:
            raise self._raw.error

    def finish(self, keys: list[str], offsets: dict[str, np.ndarray], grids: np.ndarray) -> None:
        import h5py

        with self._write_errors():
            self._file.create_dataset("keys", data=np.array(encode_keys(keys), dtype=object),
                                      dtype=h5py.string_dtype("utf-8"))
            self._file.create_dataset("grids", data=grids.astype(np.int32).reshape(-1, 3))
            for feature, values in offsets.items():
                self._file.create_dataset(f"{feature}_offsets", data=values.astype(np.int64))
            self._file.attrs["vitok_shard"] = self.path.name
            self._file.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def abort(self) -> None:
        self._raw.discard = True  # the file is deleted anyway: let HDF5 close without writing
        self._datasets.clear()  # no h5py object may outlive the file it belongs to
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self._raw.close()


class Hdf5Reader(ShardDataReader):
    """A shard's HDF5 file, by path or through a seekable file (an object store's ranged reads)."""

    def __init__(self, path) -> None:
        import h5py

        self.path = path
        self._file = h5py.File(path, "r")
        self._handle = None if isinstance(path, (str, os.PathLike)) else path

    def keys(self) -> list[str]:
        return [_decode(k) for k in self._file["keys"][()]]

    def grids(self) -> np.ndarray | None:
        return self._file["grids"][()] if "grids" in self._file else None

    def offsets(self, feature: str) -> np.ndarray:
        return self._file[f"{feature}_offsets"][()]

    def array(self, feature: str):
        return self._file[feature]

    def stored_dtype(self, feature: str) -> str:
        return str(self._file[feature].attrs["vitok_dtype"])

    def close(self) -> None:
        self._file.close()
        if self._handle is not None:
            self._handle.close()


def _decode(key) -> str:
    return os.fsdecode(key) if isinstance(key, bytes) else str(key)


class Hdf5Format(ShardFormat):
    name = "hdf5"
    suffix = ".h5"
    reads_back = True

    def create(self, path, layouts, store_dtype, compression=None) -> Hdf5Writer:
        return Hdf5Writer(path, layouts, store_dtype, compression)

    def open(self, path) -> Hdf5Reader:
        return Hdf5Reader(path)

    def open_at(self, root, name: str) -> Hdf5Reader:
        path = root.local_path(name)
        return Hdf5Reader(path if path is not None else root.open(name))  # h5py reads only what it needs

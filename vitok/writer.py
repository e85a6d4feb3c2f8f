"""Shard writers: ragged per-image tokens stored flat with offsets, no padding, committed atomically.

HDF5 shard ``shard-NNNNNN.h5`` (one file) and NPY shard ``shard-NNNNNN/`` (a folder of ``.npy`` files) hold the
same arrays:

    keys                 (n,) utf-8 strings, the images stored in this shard, in row order
    <feature>            (rows, dim)       patch / merged tokens of all images, concatenated
                         (K, rows, dim)    deepstack
    <feature>_offsets    (n + 1,) int64    image i owns rows offsets[i]:offsets[i+1]

Every data array carries its stored dtype in the attribute/metadata ``vitok_dtype``; ``bfloat16`` is stored as
raw ``uint16`` bits (read it back with ``vitok.open``, or shift left by 16 bits into float32).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import StoreError, VitokError
from .manifest import atomic_write_text, shards_dir, sidecar_path

STORE_DTYPES = ("float16", "float32", "bfloat16")
FLOAT16_MAX = 65504.0


def to_store_tensor(tensor: torch.Tensor, store_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in their stored dtype, still on their device (bfloat16 as int16 bits), and the number of finite
    values that overflow float16 as a 0-d tensor (zero for the other dtypes). Nothing here waits for the device."""
    tensor = tensor.detach()
    if store_dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16), tensor.new_zeros((), dtype=torch.int64)
    if store_dtype == "float16":
        as_float = tensor.float()
        overflow = ((as_float.abs() > FLOAT16_MAX) & torch.isfinite(as_float)).sum()
        return tensor.to(torch.float16), overflow
    return tensor.float(), tensor.new_zeros((), dtype=torch.int64)


def stored_to_numpy(stored: torch.Tensor, store_dtype: str) -> np.ndarray:
    """A host tensor from ``to_store_tensor`` -> the numpy array written to the shard."""
    array = stored.numpy()
    return array.view(np.uint16) if store_dtype == "bfloat16" else array


def to_store_array(tensor: torch.Tensor, store_dtype: str) -> tuple[np.ndarray, int]:
    """Convert tokens to the stored numpy array; also return how many finite values overflowed float16."""
    stored, overflow = to_store_tensor(tensor, store_dtype)
    return stored_to_numpy(stored.cpu(), store_dtype), int(overflow)


def from_store_array(array: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored array -> float32 (bfloat16 bits are widened exactly)."""
    if store_dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


@dataclass
class ShardWriter:
    """Collects one shard's images, then commits data and sidecar (see ``vitok.manifest`` for the order)."""

    out: Path
    name: str
    fmt: str  # hdf5 | npy
    features: tuple[str, ...]
    store_dtype: str
    compression: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    _arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _counts: dict[str, list[int]] = field(default_factory=dict)
    _keys: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """One successful image: its record and its arrays (rows, dim) or (K, rows, dim) per feature."""
        record = dict(record, status="ok", row=len(self._keys))
        record["tokens"] = {}
        for feature in self.features:
            array = arrays[feature]
            rows = array.shape[-2]
            self._arrays.setdefault(feature, []).append(array)
            self._counts.setdefault(feature, []).append(rows)
            record["tokens"][feature] = rows
        self._keys.append(record["key"])
        self.records.append(record)

    def skip(self, record: dict[str, Any], reason: str) -> None:
        self.records.append(dict(record, status="skipped", reason=reason))

    @property
    def data_path(self) -> Path:
        return shards_dir(self.out) / (f"{self.name}.h5" if self.fmt == "hdf5" else self.name)

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the data under a temporary name, rename it, then write the sidecar that makes it count."""
        folder = shards_dir(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{self.data_path.name}.{os.getpid()}.tmp"
        try:
            self._write_hdf5(tmp) if self.fmt == "hdf5" else self._write_npy(tmp)
            if self.data_path.exists():  # a stale shard from a run killed before its sidecar: replace it
                _remove(self.data_path)
            os.replace(tmp, self.data_path)
            sidecar = {
                "shard": self.name,
                "format": self.fmt,
                "data": self.data_path.name,
                "bytes": _size(self.data_path),
                "num_ok": len(self._keys),
                "num_skipped": len(self.records) - len(self._keys),
                "features": {f: int(sum(self._counts.get(f, []))) for f in self.features},
                "records": sorted(self.records, key=lambda r: r["key"]),
                **(extra or {}),
            }
            atomic_write_text(sidecar_path(self.out, self.name), json.dumps(sidecar, ensure_ascii=False))
        except OSError as exc:
            with contextlib.suppress(OSError):
                _remove(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise VitokError(
                    f"out of disk space writing {self.data_path}: shard {self.name} is not listed as done; "
                    "free space and rerun the same command to resume"
                ) from None
            raise StoreError(f"cannot write {self.data_path}: {exc}") from None
        return sidecar

    def _stacked(self, feature: str) -> np.ndarray:
        parts = self._arrays.get(feature, [])
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts, axis=-2)

    def _offsets(self, feature: str) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self._counts.get(feature, []), dtype=np.int64)]).astype(np.int64)

    def _write_hdf5(self, path: Path) -> None:
        import h5py

        with h5py.File(path, "w") as handle:
            handle.create_dataset("keys", data=np.array(self._keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
            for feature in self.features:
                data = self._stacked(feature)
                chunks = None
                if data.size:
                    chunks = (*data.shape[:-2], min(data.shape[-2], 1024), data.shape[-1])
                ds = handle.create_dataset(
                    feature, data=data, chunks=chunks, compression=self.compression if data.size else None
                )
                ds.attrs["vitok_dtype"] = self.store_dtype
                handle.create_dataset(f"{feature}_offsets", data=self._offsets(feature))
            handle.attrs["vitok_shard"] = self.name
            handle.flush()

    def _write_npy(self, path: Path) -> None:
        path.mkdir()
        np.save(path / "keys.npy", np.array(self._keys, dtype=np.str_))
        for feature in self.features:
            np.save(path / f"{feature}.npy", self._stacked(feature))
            np.save(path / f"{feature}_offsets.npy", self._offsets(feature))
        (path / "meta.json").write_text(json.dumps({"vitok_dtype": self.store_dtype, "shard": self.name}))
        for file in path.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

"""Reading a store back: ``store = vitok.open(OUT)``; ``store[key]``; ``store.get(key, "deepstack")``; verify.

Also readable without vitok: see the README (plain h5py / numpy).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .manifest import iter_sidecars, read_meta, read_plan, shards_dir
from .writer import from_store_array


def check_shard(out: Path, sidecar: dict[str, Any]) -> list[str]:
    """Problems with one committed shard's data (empty list = it checks out)."""
    path = shards_dir(out) / sidecar["data"]
    if not path.exists():
        return [f"{sidecar['shard']}: data {path.name} is missing"]
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    if size != sidecar["bytes"]:
        return [f"{sidecar['shard']}: data {path.name} has {size} bytes, the manifest says {sidecar['bytes']}"]
    reader = None
    try:
        reader = ShardReader(path, sidecar["format"])
        keys = reader.keys()
        ok = sorted((r for r in sidecar["records"] if r["status"] == "ok"), key=lambda r: r["row"])
        expected = [r["key"] for r in ok]
        if keys != expected:
            return [f"{sidecar['shard']}: keys in the data do not match the manifest"]
        for feature, rows in sidecar["features"].items():
            offsets = reader.offsets(feature)
            if len(offsets) != len(keys) + 1 or int(offsets[-1]) != rows or reader.rows(feature) != rows:
                return [f"{sidecar['shard']}: {feature} has {reader.rows(feature)} rows, the manifest says {rows}"]
    except StoreError as exc:
        return [str(exc)]
    except Exception as exc:  # h5py/numpy raise many types for damaged files
        return [f"{sidecar['shard']}: cannot read {path.name} ({type(exc).__name__}: {exc})"]
    finally:
        if reader is not None:
            reader.close()
    return []


class ShardReader:
    """Arrays of one shard file (HDF5) or folder (NPY)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self._handle = None
        self._offsets: dict[str, np.ndarray] = {}  # read once per feature, not once per key
        self._arrays: dict[str, tuple] = {}
        if fmt == "hdf5":
            import h5py

            self._handle = h5py.File(path, "r")
        elif fmt == "npy":
            meta = json.loads((path / "meta.json").read_text())
            self._npy_dtype = meta["vitok_dtype"]
        else:
            raise StoreError(f"{path}: unknown shard format {fmt!r}")

    def keys(self) -> list[str]:
        if self._handle is not None:
            return [k.decode() if isinstance(k, bytes) else str(k) for k in self._handle["keys"][()]]
        return [str(k) for k in np.load(self.path / "keys.npy")]

    def offsets(self, feature: str) -> np.ndarray:
        if feature not in self._offsets:
            if self._handle is not None:
                self._offsets[feature] = self._handle[f"{feature}_offsets"][()]
            else:
                self._offsets[feature] = np.load(self.path / f"{feature}_offsets.npy")
        return self._offsets[feature]

    def _data(self, feature: str):
        if feature not in self._arrays:
            if self._handle is not None:
                self._arrays[feature] = (self._handle[feature], self._handle[feature].attrs["vitok_dtype"])
            else:
                self._arrays[feature] = (np.load(self.path / f"{feature}.npy", mmap_mode="r"), self._npy_dtype)
        return self._arrays[feature]

    def rows(self, feature: str) -> int:
        data, _ = self._data(feature)
        return int(data.shape[-2]) if data.ndim >= 2 else 0

    def read(self, feature: str, row: int) -> np.ndarray:
        offsets = self.offsets(feature)
        data, dtype = self._data(feature)
        start, stop = int(offsets[row]), int(offsets[row + 1])
        return from_store_array(data[..., start:stop, :], str(dtype))

    def close(self) -> None:
        self._arrays.clear()
        if self._handle is not None:
            self._handle.close()


@dataclass
class Store:
    """A finished (or partly finished) extraction. Only committed shards are visible."""

    root: Path
    meta: dict[str, Any]
    _index: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # key -> (shard, record)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard name -> sidecar (without records)
    _readers: dict[str, ShardReader] = field(default_factory=dict)

    @property
    def features(self) -> list[str]:
        return list(self.meta["settings"]["features"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return sorted(self._index)

    def __iter__(self):
        return iter(self.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key, self.features[0])

    def get(self, key: str, feature: str | None = None) -> np.ndarray:
        """float32 tokens of one image: (n, dim), or (K, n, dim) for deepstack."""
        feature = feature or self.features[0]
        if feature not in self.features:
            raise KeyError(f"feature {feature!r} not in this store; it has: {', '.join(self.features)}")
        if key not in self._index:
            reason = self.skipped.get(key)
            raise KeyError(f"{key!r} was skipped: {reason}" if reason else f"{key!r} is not in this store")
        shard, record = self._index[key]
        return self._reader(shard).read(feature, record["row"])

    def info(self, key: str) -> dict[str, Any]:
        """The image's manifest record: source, grid_thw, shard, row, token counts, original size, status."""
        shard, record = self._index[key]
        return {**record, "shard": shard, "grid_thw": record.get("grid")}

    def _reader(self, shard: str) -> ShardReader:
        if shard not in self._readers:
            sidecar = self.shards[shard]
            self._readers[shard] = ShardReader(shards_dir(self.root) / sidecar["data"], sidecar["format"])
        return self._readers[shard]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def torch_dataset(self, feature: str | None = None):
        """A map-style ``torch.utils.data.Dataset`` of (key, float32 tensor) in sorted key order."""
        return StoreDataset(self, feature)


class StoreDataset:
    def __init__(self, store: Store, feature: str | None) -> None:
        self.store, self.feature, self._keys = store, feature, store.keys()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int):
        import torch

        key = self._keys[index]
        return key, torch.from_numpy(np.ascontiguousarray(self.store.get(key, self.feature)))


def open_store(out: str | Path) -> Store:
    """Open an output folder written by ``vitok extract`` (any number of processes)."""
    root = Path(out)
    store = Store(root, read_meta(root))
    for shard, sidecar in iter_sidecars(root):
        records = sidecar.pop("records")
        store.shards[shard] = sidecar
        for record in records:
            if record["status"] == "ok":
                store._index[record["key"]] = (shard, record)
            else:
                store.skipped[record["key"]] = record.get("reason", "")
    return store


@dataclass
class VerifyReport:
    shards_ok: int
    images_ok: int
    images_skipped: int
    problems: list[str]
    incomplete: list[str]  # planned shards with no committed sidecar

    @property
    def clean(self) -> bool:
        return not self.problems and not self.incomplete


def verify_store(out: str | Path) -> VerifyReport:
    """Check every committed shard against the manifest and the plan: opens, counts, no key missing or repeated."""
    root = Path(out)
    read_meta(root)
    problems: list[str] = []
    seen: Counter[str] = Counter()
    shards_ok = images_ok = images_skipped = 0
    done: set[str] = set()
    for shard, sidecar in iter_sidecars(root):
        done.add(shard)
        shard_problems = check_shard(root, sidecar)
        problems += shard_problems
        shards_ok += not shard_problems
        for record in sidecar["records"]:
            seen[record["key"]] += 1
            images_ok += record["status"] == "ok"
            images_skipped += record["status"] != "ok"
    problems += [f"key {k!r} appears in {n} shards" for k, n in seen.items() if n > 1]
    incomplete: list[str] = []
    plan = read_plan(root)
    if plan is not None:
        missing: list[str] = []
        for index in range(plan.num_shards):
            name = plan.shard_name(index)
            if name not in done:
                incomplete.append(name)
            else:
                missing += [plan.keys[j] for j in plan.shard_range(index) if plan.keys[j] not in seen]
        planned = set(plan.keys)
        problems += [f"key {k!r} is planned but missing from its shard" for k in missing[:20]]
        problems += [f"key {k!r} is not in the plan" for k in seen if k not in planned][:20]
    return VerifyReport(shards_ok, images_ok, images_skipped, problems, incomplete)

"""Reading a store back: ``store = vitok.open(OUT)``; ``store[key]``; ``store.get(key, "deepstack")``.

Only committed shards are visible. Records of later attempts supersede earlier ones (a retry shard's records replace
the failed ones it retried); only the plan generation that holds an input now counts (``Plan.current``: a changed
archive re-extracted by ``--update`` replaces the old one whole, samples it no longer has included); inputs removed
from the sources are left out of ``keys()`` and their keys listed in ``removed``. Open shard files are cached, at most
``MAX_OPEN`` at a time.
Also readable without vitok: see ``OUT/README.txt`` (plain h5py / numpy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .plan import load_plan
from .retries import sidecar_attempt
from .storage import RunHeader, read_header
from .storage.dtypes import from_store_array
from .storage.format import ShardDataReader
from .storage.records import ImageRecord, Sidecar
from .storage.shards import get_format, iter_sidecars, shards_dir

MAX_OPEN = 64  # shard files held open at once (far below the usual limit of 1024 open files)


def attempt_order(sidecars: list[Sidecar]) -> list[Sidecar]:
    """Originals before the shards that supersede them (retries, later plan generations)."""
    def order(sidecar: Sidecar):
        base, attempt = sidecar_attempt(sidecar)
        return (int(sidecar.unit.get("plan_generation", 0)), base, attempt)

    return sorted(sidecars, key=order)


def current_records(sidecar: Sidecar, plan) -> list[ImageRecord]:
    """The records of a committed shard that hold their input now (all of them without a plan): a loose file's
    record counts in the generation that planned its key last, an archive's in the one that planned the archive."""
    if plan is None:
        return sidecar.records
    current = plan.current()
    generation = int(sidecar.unit.get("plan_generation", 0))
    if sidecar.unit.get("kind", plan.kind) != "files":
        path = sidecar.unit.get("path")
        return sidecar.records if path is None or current.is_current(path, generation) else []
    return [r for r in sidecar.records if current.is_current(r.key, generation)]


@dataclass
class Store:
    """A finished (or partly finished) extraction."""

    root: Path
    header: RunHeader
    shards: dict[str, Sidecar] = field(default_factory=dict)  # committed shards (records dropped after indexing)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason (could not be read; a rerun retries)
    removed: set[str] = field(default_factory=set)  # inputs removed from the sources by --update
    _index: dict[str, tuple[str, ImageRecord]] = field(default_factory=dict)  # key -> (shard, record)
    _sorted_keys: list[str] | None = field(default=None, repr=False)  # filled on first use (a store does not change)
    _readers: OrderedDict[str, ShardDataReader] = field(default_factory=OrderedDict)

    @property
    def meta(self) -> dict[str, Any]:
        """The run header as stored (model, weights hash, resolved settings, environment)."""
        return self.header.to_json()

    @property
    def features(self) -> list[str]:
        return self.header.features

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: str) -> bool:
        return key in self._index and key not in self.removed

    def _keys(self) -> list[str]:
        if self._sorted_keys is None:
            self._sorted_keys = sorted(k for k in self._index if k not in self.removed)
        return self._sorted_keys

    def keys(self) -> list[str]:
        return list(self._keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key, self.features[0])

    def _lookup(self, key: str) -> tuple[str, ImageRecord]:
        if key not in self._index:
            reason = self.skipped.get(key) or self.failed.get(key)
            status = "skipped" if key in self.skipped else "failed"
            raise KeyError(f"{key!r} was {status}: {reason}" if reason else f"{key!r} is not in this store")
        return self._index[key]

    def get(self, key: str, feature: str | None = None) -> np.ndarray:
        """float32 tokens of one image: (n, dim), or (K, n, dim) for deepstack."""
        feature = self._feature(feature)
        shard, record = self._lookup(key)
        reader = self._reader(shard)
        offsets = reader.offsets(feature)
        start, stop = int(offsets[record.row]), int(offsets[record.row + 1])
        return from_store_array(reader.array(feature)[..., start:stop, :], reader.stored_dtype(feature))

    def info(self, key: str) -> dict[str, Any]:
        """The image's record: source, grid_thw, shard, row, token counts, original size, status, notes."""
        shard, record = self._lookup(key)
        return {**record.to_json(), "shard": shard, "grid_thw": record.grid}

    def _feature(self, feature: str | None) -> str:
        feature = feature or self.features[0]
        if feature not in self.features:
            raise KeyError(f"feature {feature!r} not in this store; it has: {', '.join(self.features)}")
        return feature

    def _reader(self, shard: str) -> ShardDataReader:
        if shard in self._readers:
            self._readers.move_to_end(shard)
            return self._readers[shard]
        sidecar = self.shards[shard]
        reader = get_format(sidecar.format).open(shards_dir(self.root) / sidecar.data)
        self._readers[shard] = reader
        while len(self._readers) > MAX_OPEN:
            _, oldest = self._readers.popitem(last=False)
            oldest.close()
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def torch_dataset(self, feature: str | None = None):
        """A map-style ``torch.utils.data.Dataset`` of (key, float32 tensor) in sorted key order; batch it with
        ``collate_fn=vitok.store.pack_tokens`` to get ragged tokens packed with ``cu_seqlens``."""
        return StoreDataset(self, feature)

    # ---- consumers ---------------------------------------------------------------------------------------------

    def image_embeds(self, key: str, dtype=None):
        """vLLM's precomputed image embeddings for Qwen3-VL: ``(E, G)`` torch tensors, ``E`` = the merger's tokens
        and the K DeepStack levels concatenated along the last dimension, ``[tokens, O * (1 + K)]``, and ``G`` =
        ``[[t, h, w]]``. Pass ``{"image_embeds": E, "image_grid_thw": G}`` as the image of a prompt."""
        import torch

        missing = [f for f in ("merged", "deepstack") if f not in self.features]
        if missing:
            raise KeyError(f"image_embeds needs the features merged and deepstack; this store lacks "
                           f"{', '.join(missing)} (extract with --features merged,deepstack and no --pool)")
        if self.header.settings["pool"] != "none":
            raise KeyError("image_embeds needs every token; this store is pooled")
        merged, deepstack = self.get(key, "merged"), self.get(key, "deepstack")  # (n, O), (K, n, O)
        embeds = torch.from_numpy(np.concatenate([merged, *deepstack], axis=-1))
        grid = torch.tensor([self.info(key)["grid"]], dtype=torch.long)
        return (embeds.to(dtype) if dtype is not None else embeds), grid

    def iter_shards(self, feature: str | None = None, dtype: str | None = "float32"):
        """Whole shards at a time: ``(keys, tokens, offsets)`` per committed shard, image i owning
        ``tokens[..., offsets[i]:offsets[i+1], :]``. Keys another shard supersedes, or --update removed, are left
        out. ``dtype=None`` keeps the stored dtype (bfloat16 as uint16 bits)."""
        feature = self._feature(feature)
        for shard in sorted(self.shards):
            reader = self._reader(shard)
            keys = reader.keys()
            offsets = np.asarray(reader.offsets(feature), dtype=np.int64)
            data = reader.array(feature)
            if not isinstance(data, np.ndarray):  # an HDF5 dataset: read it whole
                data = data[...]
            wanted = [i for i, key in enumerate(keys) if self._index.get(key, (None,))[0] == shard
                      and key not in self.removed]
            if len(wanted) < len(keys):  # drop rows of keys that live elsewhere
                rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in wanted] or [np.zeros(0, int)])
                data = data[..., rows, :]
                offsets = np.concatenate([[0], np.cumsum([offsets[i + 1] - offsets[i] for i in wanted])]).astype(
                    np.int64)
                keys = [keys[i] for i in wanted]
            if dtype is not None:
                data = from_store_array(data, reader.stored_dtype(feature)).astype(dtype, copy=False)
            yield keys, data, offsets

    def array(self, feature: str | None = None, dtype: str | None = "float32") -> tuple[list[str], np.ndarray]:
        """A pooled store as one ``(N, D)`` array and its keys, in shard order. A store of one NPY shard kept in its
        stored dtype (``dtype=None``) is returned memory-mapped, without a copy."""
        if self.header.settings["pool"] == "none":
            raise ValueError("array() reads pooled stores (one row per image); use iter_shards() for tokens")
        parts = list(self.iter_shards(feature, dtype))
        keys = [k for part_keys, _, _ in parts for k in part_keys]
        if len(parts) == 1:
            return keys, parts[0][1]
        return keys, np.concatenate([tokens for _, tokens, _ in parts], axis=-2) if parts else np.zeros((0, 0))


class StoreDataset:
    def __init__(self, store: Store, feature: str | None) -> None:
        self.store, self.feature, self._keys = store, feature, store.keys()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int):
        import torch

        key = self._keys[index]
        return key, torch.from_numpy(np.ascontiguousarray(self.store.get(key, self.feature)))


def pack_tokens(batch):
    """A ``collate_fn`` for ``Store.torch_dataset()``: ragged (n_i, D) tensors packed into one (sum n_i, D) tensor
    with int32 ``cu_seqlens`` (B+1,), the layout of variable-length attention kernels. Returns
    ``(keys, tokens, cu_seqlens)``."""
    import torch

    keys = [key for key, _ in batch]
    tensors = [tensor for _, tensor in batch]
    lengths = torch.tensor([t.shape[-2] for t in tensors], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(tensors) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return keys, torch.cat(tensors, dim=-2), cu_seqlens


def open_store(out: str | Path) -> Store:
    """Open an output folder written by ``vitok extract`` (any number of processes, finished or not)."""
    root = Path(out)
    store = Store(root, read_header(root))
    try:
        plan = load_plan(root)
    except StoreError:
        plan = None
    stale: set[str] = set()
    for sidecar in attempt_order(list(iter_sidecars(root))):
        store.shards[sidecar.shard] = sidecar
        records = current_records(sidecar, plan)
        if len(records) < len(sidecar.records):
            stale.update(r.key for r in sidecar.records)
        for record in records:
            key = record.key
            for table in (store.skipped, store.failed):
                table.pop(key, None)
            if record.status == "ok":
                store._index[key] = (sidecar.shard, record)
            else:
                store._index.pop(key, None)
                (store.skipped if record.status == "skipped" else store.failed)[key] = record.reason or ""
        sidecar.records = []
    store.removed = {key for key in stale if key not in store._index and key not in store.skipped
                     and key not in store.failed}
    return store

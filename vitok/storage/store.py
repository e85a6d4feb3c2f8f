"""Reading a store back: ``store = vitok.open(OUT)``; ``store[key]``; ``store.get(key, "deepstack")``.

Only committed shards are visible. Records of later attempts supersede earlier ones (a retry shard's records replace
the failed ones it retried); only the plan generation that holds an input now counts (``Plan.current``: a changed
archive re-extracted by ``--update`` replaces the old one whole, samples it no longer has included); inputs removed
from the sources are left out of ``keys()`` and their keys listed in ``removed``. Open shard files are cached
(``ReaderCache``): at most ``MAX_OPEN`` at a time, fewer when the process may open few files (``ulimit -n``), the
least recently used closed first.
Also readable without vitok: see ``OUT/README.txt`` (plain h5py / numpy).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from . import RunHeader, read_header
from .dtypes import from_store_array
from .format import ShardDataReader, row_offsets
from .plan import load_plan
from .plan.retries import sidecar_attempt
from .records import ImageRecord, Sidecar
from .roots import StoreRoot, store_root
from .shards import data_name, get_format, iter_retired, iter_sidecars

logger = logging.getLogger(__name__)

MAX_OPEN = 64  # shard files held open at once (far below the usual limit of 1024 open files)
TOO_MANY_FILES = (errno.EMFILE, errno.ENFILE)


def open_files_allowed() -> int:
    """Shard readers this process may hold open: a quarter of the file descriptors it may still open (a reader
    can hold more than one: a memory map, a tar, libhdf5), within 1..MAX_OPEN."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_OPEN
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return max(1, min(MAX_OPEN, (soft - in_use) // 4))


class ReaderCache:
    """Open shard readers by shard name, least recently used closed first. The bound is read from the limit on open
    files when the first reader opens; should opening still fail for want of file descriptors (other code took
    them), every cached reader is closed and the open retried once."""

    def __init__(self, opener: Callable[[str], ShardDataReader]) -> None:
        self.opener = opener
        self.limit: int | None = None
        self._open: OrderedDict[str, ShardDataReader] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def get(self, shard: str) -> ShardDataReader:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if self.limit is None:
            self.limit = min(MAX_OPEN, open_files_allowed())
        while len(self._open) >= self.limit:
            self._open.popitem(last=False)[1].close()
        try:
            reader = self.opener(shard)
        except OSError as exc:
            if exc.errno not in TOO_MANY_FILES or not self._open:
                raise
            self.close()
            self.limit = max(1, self.limit // 2)
            reader = self.opener(shard)
        self._open[shard] = reader
        return reader

    def close(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()


def attempt_order(sidecars: list[Sidecar]) -> list[Sidecar]:
    """Originals before the shards that supersede them (retries, later plan generations)."""
    def order(sidecar: Sidecar):
        base, attempt = sidecar_attempt(sidecar)
        return (sidecar.unit.plan_generation, base, attempt)

    return sorted(sidecars, key=order)


def current_records(sidecar: Sidecar, plan) -> list[ImageRecord]:
    """The records of a committed shard that hold their input now (all of them without a plan): a loose file's
    record counts in the generation that planned its key last, an archive's in the one that planned the archive."""
    if plan is None:
        return sidecar.records
    current = plan.current()
    generation = sidecar.unit.plan_generation
    if sidecar.unit.kind != "files" or plan.kind != "files":
        path = sidecar.unit.path
        return sidecar.records if path is None or current.is_current(path, generation) else []
    return [r for r in sidecar.records if current.is_current(r.key, generation)]


@dataclass
class Store:
    """A finished (or partly finished) extraction."""

    root: StoreRoot  # where the store lives (``roots.py``)
    header: RunHeader
    shards: dict[str, Sidecar] = field(default_factory=dict)  # committed shards (records dropped after indexing)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason (could not be read; a rerun retries)
    removed: set[str] = field(default_factory=set)  # inputs removed from the sources by --update
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> why its sidecar cannot be read (left out)
    _index: dict[str, tuple[str, ImageRecord]] = field(default_factory=dict)  # key -> (shard, record)
    _sorted_keys: list[str] | None = field(default=None, repr=False)  # filled on first use (a store does not change)
    _readers: ReaderCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._readers = ReaderCache(self._open_reader)

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
        rows = reader.array(feature)[..., start:stop, :]
        if isinstance(rows, np.memmap):  # a view would keep the shard's file open for as long as the caller keeps it
            rows = np.array(rows)
        return from_store_array(rows, reader.stored_dtype(feature))

    def info(self, key: str) -> dict[str, Any]:
        """The image's record: source, grid_thw, shard, row, token counts, original size, status, notes."""
        shard, record = self._lookup(key)
        return {**record.to_json(), "shard": shard, "grid_thw": record.grid}

    def _feature(self, feature: str | None) -> str:
        feature = feature or self.features[0]
        if feature not in self.features:
            raise KeyError(f"feature {feature!r} not in this store; it has: {', '.join(self.features)}")
        return feature

    def _open_reader(self, shard: str) -> ShardDataReader:
        sidecar = self.shards[shard]
        return get_format(sidecar.format).open_at(self.root, data_name(sidecar.data))

    def _reader(self, shard: str) -> ShardDataReader:
        return self._readers.get(shard)

    def close(self) -> None:
        self._readers.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def torch_dataset(self, feature: str | None = None):
        """A map-style ``torch.utils.data.Dataset`` of (key, float32 tensor) in sorted key order; batch it with
        ``collate_fn=vitok.storage.store.pack_tokens`` to get ragged tokens packed with ``cu_seqlens``."""
        return StoreDataset(self, feature)

    # ---- consumers ---------------------------------------------------------------------------------------------

    def image_embeds(self, key: str, dtype=None):
        """vLLM's precomputed image embeddings: ``(E, G)`` torch tensors, ``E`` = the merger's tokens and, for
        Qwen3-VL, the K DeepStack levels concatenated along the last dimension, ``[tokens, O * (1 + K)]`` (families
        without DeepStack: the merger's tokens alone), and ``G`` = ``[[t, h, w]]``. Pass
        ``{"image_embeds": E, "image_grid_thw": G}`` as the image of a prompt."""
        import torch

        config = self.header.settings.model.config
        levels = None
        if config.get("family", "qwen3_vl") == "qwen3_vl":  # the blocks tapped (an index past the last never is)
            indexes = config.get("deepstack_visual_indexes") or ()
            levels = [i for i in range(int(config.get("depth", max(indexes, default=-1) + 1))) if i in indexes]
        needed = ("merged", "deepstack") if levels or not config else ("merged",)
        missing = [f for f in needed if f not in self.features]
        if missing:
            raise KeyError(f"image_embeds needs the features {' and '.join(needed)}; this store lacks "
                           f"{', '.join(missing)} (extract with --features {','.join(needed)} and no --pool)")
        if self.header.settings.pool != "none":
            raise KeyError("image_embeds needs every token; this store is pooled")
        parts = [self.get(key, "merged")]  # (n, O)
        if "deepstack" in needed:
            parts += list(self.get(key, "deepstack"))  # K x (n, O)
        embeds = torch.from_numpy(np.concatenate(parts, axis=-1))
        grid = torch.tensor([self.info(key)["grid"]], dtype=torch.long)
        return (embeds.to(dtype) if dtype is not None else embeds), grid

    def video_embeds(self, key: str, dtype=None):
        """vLLM's precomputed video embeddings, as ``image_embeds`` (the same rows: the merger's tokens, with
        Qwen3-VL's DeepStack levels concatenated) with ``G`` = ``[[t, h, w]]`` the video's ``video_grid_thw``, and
        the metadata its prompt's timestamps come from. Pass ``{"video_embeds": E, "video_grid_thw": G}`` as the
        video of a prompt; ``M`` (``fps``, ``frames_indices``, ``total_num_frames``, ``duration``) is the video
        metadata Qwen3-VL's processor reads."""
        record = self._lookup(key)[1]
        if record.video is None:
            raise KeyError(f"{key!r} is not a video; use image_embeds")
        embeds, grid = self.image_embeds(key, dtype)
        video = record.video
        metadata = {"fps": video.fps if video.fps else 24.0, "frames_indices": list(video.indices),
                    "total_num_frames": video.frame_count, "duration": video.duration}
        return embeds, grid, metadata

    def nonfinite(self) -> dict[str, int]:
        """Images whose tokens hold NaN/Inf values, as counted at extraction (float16 overflow included): key ->
        count. Exports leave them out."""
        found = {}
        for key in self._keys():
            count = self._lookup(key)[1].nonfinite_values
            if count:
                found[key] = count
        return found

    def iter_shards(self, feature: str | None = None, dtype: str | None = "float32"):
        """Whole shards at a time: ``(keys, tokens, offsets)`` per committed shard, image i owning
        ``tokens[..., offsets[i]:offsets[i+1], :]``. Keys another shard supersedes, or --update removed, are left
        out. ``dtype=None`` keeps the stored dtype (bfloat16 as uint16 bits)."""
        feature = self._feature(feature)
        for shard in sorted(self.shards):
            sidecar = self.shards[shard]
            reader = get_format(sidecar.format).open_whole(self.root, data_name(sidecar.data))  # (a bucket: one GET)
            try:
                keys = reader.keys()
                offsets = np.asarray(reader.offsets(feature), dtype=np.int64)
                data = reader.array(feature)
                if not isinstance(data, np.ndarray):  # an HDF5 dataset: read it whole
                    data = data[...]
                wanted = self._owned(shard, keys)
                if len(wanted) < len(keys):  # drop rows of keys that live elsewhere
                    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in wanted]
                                          or [np.zeros(0, int)])
                    data = data[..., rows, :]
                    offsets = row_offsets([offsets[i + 1] - offsets[i] for i in wanted])
                    keys = [keys[i] for i in wanted]
                if dtype is not None:
                    data = from_store_array(data, reader.stored_dtype(feature)).astype(dtype, copy=False)
                yield keys, data, offsets
            finally:
                reader.close()

    def _owned(self, shard: str, keys: list[str]) -> list[int]:
        """Positions of the shard's keys that are its own (not superseded by another shard, not removed)."""
        index, removed = self._index, self.removed
        return [i for i, key in enumerate(keys) if index.get(key, (None,))[0] == shard and key not in removed]

    def array(self, feature: str | None = None, dtype: str | None = "float32") -> tuple[list[str], np.ndarray]:
        """A pooled store as one ``(N, D)`` array and its keys, in shard order. A store of one NPY shard kept in its
        stored dtype (``dtype=None``) is returned memory-mapped, without a copy."""
        if self.header.settings.pool == "none":
            raise ValueError("array() reads pooled stores (one row per image); use iter_shards() for tokens")
        several = len(self.shards) > 1
        parts = [(k, np.array(t) if several else t, o) for k, t, o in self.iter_shards(feature, dtype)]  # (a
        # memory map holds a file descriptor: parts of many shards are copied before they are joined)
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


def open_store(out: str | Path | StoreRoot, index: bool = True, storage_options: dict | None = None) -> Store:
    """Open a store written by ``vitok extract`` (any number of processes, finished or not): a folder, or
    ``s3://BUCKET/PREFIX`` (``storage_options``: keyword arguments of the client, e.g. ``endpoint_url``; the
    client's own configuration, ``AWS_*`` variables and profiles, applies first).

    With ``index`` (the default) through the store's key index (``vitok.storage.index``): built from the sidecars
    on the first open after a change and cached in ``OUT/.index`` (an object store's on this machine), then opened
    without reading a sidecar; a key's rows are then read by byte range, not the whole shard."""
    root = store_root(out, storage_options=storage_options)
    header = read_header(root)
    if index:
        from .index import open_index

        return IndexedStore.from_index(root, header, open_index(root, lambda digest: build_index(root, header,
                                                                                                 digest)))
    return _open_from_sidecars(root, header)


def _open_from_sidecars(root: StoreRoot, header: RunHeader, on_sidecar=None) -> Store:
    """The store as its sidecars say (later attempts superseding earlier ones, only the records of inputs the plan
    holds now counting); ``on_sidecar`` sees each sidecar with its records before they are dropped."""
    store = Store(root, header)
    try:
        plan = load_plan(root)
    except StoreError:
        plan = None
    stale: set[str] = set()
    for sidecar in attempt_order(list(iter_sidecars(root, store.damaged))):
        store.shards[sidecar.shard] = sidecar
        if on_sidecar is not None:
            on_sidecar(sidecar)
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
    for sidecar, _ in iter_retired(root):  # superseded shards: their keys are gone unless held elsewhere now
        stale.update(r.key for r in sidecar.records)
    store.removed = {key for key in stale if key not in store._index and key not in store.skipped
                     and key not in store.failed}
    for shard, why in store.damaged.items():
        logger.warning("shard %s: %s", shard, why)
    return store


# ---- the indexed store: key lookups without the sidecars (vitok.storage.index) -------------------------------------


def build_index(root: StoreRoot, header: RunHeader, digest: str):
    """The key and content index of a store, from its sidecars (what ``open_store`` without the index reads)."""
    from .index import Entry, StoreIndex, feature_layout

    starts: dict[str, dict[str, list[int]]] = {}  # shard -> feature -> first row of each ok image (by row)

    def note(sidecar: Sidecar) -> None:
        ok = sidecar.ok_records()
        if all(r.tokens for r in ok):
            starts[sidecar.shard] = {f: row_offsets([r.tokens.get(f, 0) for r in ok]).tolist()
                                     for f in header.features}

    store = _open_from_sidecars(root, header, note)
    names = sorted(store.shards)
    position = {name: i for i, name in enumerate(names)}
    entries = []
    for key, (shard, record) in store._index.items():  # removed keys too: get() still reads them, as Store's
        if shard not in starts:  # records without token counts (an old store): the data's offsets
            reader = store._reader(shard)
            starts[shard] = {f: [int(v) for v in reader.offsets(f)] for f in header.features}
        rows = {f: (starts[shard][f][record.row], starts[shard][f][record.row + 1]) for f in header.features}
        entries.append(Entry(key, position[shard], record.row, rows, record.content_id, key not in store.removed))
    store.close()
    catalog = {"digest": digest, "shards": [store.shards[name].to_json() for name in names],
               "skipped": store.skipped, "failed": store.failed, "removed": sorted(store.removed),
               "damaged": store.damaged}
    layouts = []
    for name in names:
        sidecar = store.shards[name]
        try:
            layouts.append({f: feature_layout(sidecar.format, root, sidecar.data, f)
                            for f in header.features})
        except Exception:  # unreadable data: its keys are read (and fail) through the format's reader
            layouts.append({})
    return StoreIndex.build(catalog, entries, header.features, layouts)


class _IndexView:
    """What ``Store`` methods ask of ``_index`` (membership, a key's shard), answered by the key index."""

    def __init__(self, store: IndexedStore) -> None:
        self.store = store

    def __contains__(self, key: str) -> bool:
        return self.store._index_position(key) is not None

    def get(self, key: str, default=None):
        position = self.store._index_position(key)
        return default if position is None else (self.store._shard_names[self.store._ix.arrays["shard"][position]],)


@dataclass
class IndexedStore(Store):
    """A store opened through its key index: the same answers as ``Store``, with sidecars read only for ``info``
    (one shard's at a time) and rows read by position (memory-mapped where the format allows)."""

    _ix: Any = None  # vitok.storage.index.StoreIndex
    _shard_names: list[str] = field(default_factory=list)
    _sidecar_records: OrderedDict[str, dict[str, ImageRecord]] = field(default_factory=OrderedDict)
    _layouts: list[dict[str, tuple]] = field(default_factory=list)  # per shard: features readable by byte range
    _owned_counts: list[int] | None = None  # keys the index places in each shard

    @classmethod
    def from_index(cls, root: StoreRoot, header: RunHeader, index) -> IndexedStore:
        catalog = index.catalog
        sidecars = [Sidecar.from_json(data) for data in catalog["shards"]]
        store = cls(root, header, shards={s.shard: s for s in sidecars}, skipped=dict(catalog["skipped"]),
                    failed=dict(catalog["failed"]), removed=set(catalog["removed"]),
                    damaged=dict(catalog.get("damaged", {})), _ix=index,
                    _shard_names=[s.shard for s in sidecars])
        store._index = _IndexView(store)
        store._layouts = index.layouts()
        for shard, why in store.damaged.items():
            logger.warning("shard %s: %s", shard, why)
        return store

    def _index_position(self, key: str) -> int | None:
        return self._ix.find(key)

    def close(self) -> None:
        """Close the shards' files and drop the index's memory maps now (each map holds a file descriptor, and the
        store and its key view refer to each other, so without this they would wait for the garbage collector)."""
        super().close()
        self._ix = None
        self._layouts = []
        self._index = {}

    def _owned(self, shard: str, keys: list[str]) -> list[int]:
        if self._owned_counts is None:
            self._owned_counts = np.bincount(self._ix.arrays["shard"], minlength=len(self._shard_names)).tolist()
        if self._owned_counts[self._shard_names.index(shard)] == len(keys) and not self.removed:
            return list(range(len(keys)))  # the usual case: every key of the shard is its own
        return super()._owned(shard, keys)

    def __len__(self) -> int:
        return int(self._ix.catalog["visible"])

    def __contains__(self, key: str) -> bool:
        return key not in self.removed and self._ix.find(key) is not None

    def _keys(self) -> list[str]:
        if self._sorted_keys is None:
            self._sorted_keys = self._ix.sorted_keys()
        return self._sorted_keys

    def _lookup(self, key: str) -> tuple[str, ImageRecord]:
        position = self._ix.find(key)
        if position is None:
            return Store._lookup(self, key)  # the KeyError naming why
        shard = self._shard_names[self._ix.arrays["shard"][position]]
        if shard not in self._sidecar_records:
            from .shards import read_sidecar

            records = read_sidecar(self.root, shard).records
            self._sidecar_records[shard] = {r.key: r for r in records if r.status == "ok"}
            while len(self._sidecar_records) > 8:
                self._sidecar_records.popitem(last=False)
        self._sidecar_records.move_to_end(shard)
        return shard, self._sidecar_records[shard][key]

    def stored_rows(self, key: str, feature: str | None = None) -> np.ndarray:
        """One image's rows of a feature in the stored dtype (bfloat16 as uint16 bits), as written: a read-only view
        where the shard's file is memory-mapped."""
        return self._stored_rows(key, self._feature(feature))

    def _stored_rows(self, key: str, feature: str) -> np.ndarray:
        arrays = self._ix.arrays
        position = self._ix.find(key)
        if position is None:
            self._lookup(key)  # raises the KeyError naming why
        start, stop = arrays[feature][position].tolist()
        shard = int(arrays["shard"][position])
        layout = self._layouts[shard].get(feature) if self._layouts else None
        reader = self._reader(self._shard_names[shard])
        return reader.read(feature, start, stop) if layout is None else reader.read_range(layout, start, stop)

    def get(self, key: str, feature: str | None = None) -> np.ndarray:
        feature = self._feature(feature)
        tokens = from_store_array(self._stored_rows(key, feature), self.header.settings.store_dtype)
        return tokens if tokens.flags.writeable else tokens.copy()  # (float32 rows of a memory map: a view)

    def find_content(self, content_id: str) -> str | None:
        """The key of an ok image whose pixels have this content id (``vitok.inputs.identity``), or None."""
        position = self._ix.find_content(content_id)
        return None if position is None else self._ix.key(position)

    def _open_reader(self, shard: str):
        """The shard's RowReader (reads by byte range; also answers as its format's reader), cached like any reader
        (``ReaderCache``: at most MAX_OPEN, fewer under a low ``ulimit -n``)."""
        from .index import RowReader

        sidecar = self.shards[shard]
        return RowReader(get_format(sidecar.format), self.root, sidecar.data)

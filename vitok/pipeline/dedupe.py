"""Each distinct image encoded once: the decisions the run loop makes per image, by pixel content id.

An ok image (decoded on the CPU, so it has a ``content_id``, see ``vitok.inputs.identity``) is, in this order:

1. **copied from a committed shard** when an image with the same content id is in one: a shard of a ``--reuse``
   store made with the same token settings (looked up first, through its content index), or a shard of this store
   committed before this run started or during it, or superseded by ``--update`` while its data is kept
   (``Donors``). Its rows are read back in the stored dtype and written to this image's shard: bit for bit the
   donor's tokens. The record says ``copied_from``: the record it was copied from, ``<shard>/<key>`` (or
   ``STORE::<shard>/<key>`` for another store), which holds these pixels whatever its key holds later.
2. **a duplicate within its unit** when an earlier image of the same unit had the same content id: it is not
   batched; the committer writes its first copy's rows again under its key once they are in the shard
   (``CopyRows``, ``ShardSink.add_copy``); ``copied_from`` is ``<this shard>/<first key>``.
3. **encoded** otherwise (its first copy may be in a unit of this run that is not committed yet: one unit never
   waits for another, so a run over parts or a resumed run decides the same way for every image of a unit).
   A video cut in time is always encoded (its content id is known only after its last piece; ``first`` makes it
   the first copy of what follows in its unit).

Rows are copied, not pointed to: every shard stays self-contained (a shard can be moved, verified, exported or read
by h5py/numpy/webdataset alone) and every reader works unchanged; the cost is the duplicates' bytes on disk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SettingsMismatchError, StoreError, UsageError
from ..storage import RunHeader, read_header
from ..storage.format import ShardDataReader
from ..storage.layout import SHARDS_DIR
from ..storage.records import ImageRecord, Settings, Sidecar, diff_settings
from ..storage.roots import StoreRoot, store_root
from ..storage.shards import RETIRED_DIR, get_format, iter_retired, iter_sidecars
from ..storage.verify import verify_store
from .committer import Commit, CopyRows, WriteBatch, WriteRecord
from .types import EncodedBatch, RunCounts, UnitEnd

logger = logging.getLogger(__name__)
MAX_OPEN = 16  # donor shard files held open


@dataclass(frozen=True)
class Donor:
    """One committed image whose rows can be copied."""

    root: StoreRoot  # the store
    fmt: str
    data: str  # the shard's data name in ``folder``
    row: int
    key: str
    label: str  # "" for this store, else how records name the store (its path)
    files: tuple = ()  # the shard's (file, FileSum) pairs: its checksums, checked before any row is copied
    shard: str = ""
    folder: str = SHARDS_DIR  # shards/, or shards/.superseded/ for a superseded shard (in the store)

    @property
    def name(self) -> str:
        """How a copy's record names it: ``<shard>/<key>``, after ``STORE::`` for another store."""
        return f"{self.label}::{self.shard}/{self.key}" if self.label else f"{self.shard}/{self.key}"


class Donors:
    """Committed images by content id: this store's committed shards (growing as the run commits) and the
    ``--reuse`` stores'. The first committed image of a content id (in shard name order) is its donor."""

    def __init__(self, features: list[str]) -> None:
        self.features = features
        self._by_content: dict[str, Donor] = {}
        self._stores: list[tuple[str, Any]] = []  # (label, IndexedStore) of --reuse stores: their content index
        self._readers: OrderedDict[tuple[str, str, str], tuple[ShardDataReader, dict[str, np.ndarray]]] = \
            OrderedDict()
        self._intact: dict[tuple[str, str, str], bool] = {}  # (store, shard data) -> its files match their checksums

    def __len__(self) -> int:
        return len(self._by_content)

    def add_sidecar(self, root: Path | StoreRoot, sidecar: Sidecar, label: str = "", folder: str = SHARDS_DIR
                    ) -> None:
        """Index a committed shard's ok images (called from the committer's thread as shards commit: a dict
        insertion is atomic, and the loop only looks entries up); ``folder``: where its data is (shards/)."""
        files = tuple(sidecar.files.items())
        root = store_root(root)
        for record in sidecar.records:
            if record.status == "ok" and record.content_id and record.row is not None:
                self._by_content.setdefault(record.content_id,
                                            Donor(root, sidecar.format, sidecar.data, record.row, record.key,
                                                  label, files, sidecar.shard, folder))

    def add_store(self, root: Path | StoreRoot, fingerprint: str | None = None, exclude: set[str] = frozenset(),
                  label: str = "") -> None:
        """Index a store's committed shards (those of ``fingerprint`` when given, minus ``exclude``), then its
        superseded shards whose data is still kept."""
        root = store_root(root)

        def wanted(sidecar: Sidecar) -> bool:
            return sidecar.shard not in exclude and (fingerprint is None or sidecar.fingerprint in (None, fingerprint))

        for sidecar in iter_sidecars(root):
            if wanted(sidecar):
                self.add_sidecar(root, sidecar, label)
        for sidecar, kept in iter_retired(root):
            if kept and wanted(sidecar):
                self.add_sidecar(root, sidecar, label, RETIRED_DIR)

    def add_reuse(self, root: Path | StoreRoot) -> None:
        """A ``--reuse`` store, looked up through its content index (``vitok.storage.index``), not loaded."""
        from ..storage.store import open_store

        root = store_root(root)
        self._stores.append((root.where, open_store(root)))

    def take(self, record: ImageRecord) -> tuple[dict[str, np.ndarray], bool] | None:
        """The stored rows of a committed image with the record's content id and whether they come from another
        store (the record is marked as copied), or None: none, or its shard could not be read (it is then encoded)."""
        if not record.content_id:
            return None
        arrays = self._take_reused(record) if self._stores else None  # first: it does not depend on timing
        if arrays is not None:
            return arrays, True
        donor = self._by_content.get(record.content_id)
        if donor is None:
            return None
        arrays = self.rows(donor, record.key)
        if arrays is None:
            self._by_content.pop(record.content_id, None)
            return None
        record.copied_from = donor.name
        return arrays, bool(donor.label)

    def rows(self, donor: Donor, key: str | None = None) -> dict[str, np.ndarray] | None:
        """A donor's stored rows, per feature; None when its shard fails its checksums or cannot be read (a
        damaged or vanished donor shard costs an encoding, not the run)."""
        if not self._checks_out(donor.root, donor.folder, donor.data, donor.files):
            return None
        try:
            return self._read(donor)
        except Exception as exc:
            logger.warning("cannot copy %s's tokens from %s (%s: %s); encoding it", key or donor.key, donor.data,
                           type(exc).__name__, exc)
            return None

    def _take_reused(self, record: ImageRecord) -> dict[str, np.ndarray] | None:
        for label, store in self._stores:
            key = store.find_content(record.content_id)
            if key is None:
                continue
            shard = store.info(key)["shard"]
            sidecar = store.shards[shard]
            if not self._checks_out(store.root, SHARDS_DIR, sidecar.data, tuple(sidecar.files.items())):
                continue
            try:
                arrays = {f: np.array(store.stored_rows(key, f)) for f in self.features}
            except Exception as exc:  # a damaged donor shard costs an encoding, not the run
                logger.warning("cannot copy %s's tokens from %s (%s: %s); encoding it", record.key, label,
                               type(exc).__name__, exc)
                continue
            record.copied_from = f"{label}::{shard}/{key}"
            return arrays
        return None

    def _checks_out(self, root: StoreRoot, folder: str, data: str, files: tuple) -> bool:
        """Whether a donor shard's files (in ``folder`` of store ``root``) still match the checksums its sidecar
        recorded (read once per shard and run): rows are never copied from damaged data, which a copy would carry
        into a shard that verifies clean."""
        where = (root.where, folder, data)
        if where not in self._intact:
            problems = []
            for relative, expected in files:
                try:
                    if expected.blake2b and root.checksum(f"{folder}/{relative}") != expected.blake2b:
                        problems.append(relative)
                except OSError as exc:
                    problems.append(f"{relative} ({exc.strerror})")
            if problems:
                logger.warning("shard data %s in %s does not match its checksums (%s): its images are encoded again, "
                               "not copied; run 'vitok verify %s'", data, root, ", ".join(problems), root)
            self._intact[where] = not problems
        return self._intact[where]

    def _read(self, donor: Donor) -> dict[str, np.ndarray]:
        where = (donor.root.where, donor.folder, donor.data)
        if where in self._readers:
            self._readers.move_to_end(where)
        else:
            reader = get_format(donor.fmt).open_at(donor.root, f"{donor.folder}/{donor.data}")
            self._readers[where] = (reader, {})
            while len(self._readers) > MAX_OPEN:
                self._readers.popitem(last=False)[1][0].close()
        reader, offsets = self._readers[where]
        arrays = {}
        for feature in self.features:
            if feature not in offsets:
                offsets[feature] = np.asarray(reader.offsets(feature), dtype=np.int64)
            start, stop = offsets[feature][donor.row], offsets[feature][donor.row + 1]
            arrays[feature] = np.array(reader.array(feature)[..., start:stop, :])
        return arrays

    def close(self) -> None:
        for reader, _ in self._readers.values():
            reader.close()
        self._readers.clear()
        for _, store in self._stores:
            store.close()


def check_reuse(root: Path | StoreRoot, settings: Settings) -> RunHeader:
    """A ``--reuse`` store's header, refused unless it is a finished store (as ``vitok verify`` and export judge it)
    whose tokens were made with the same token settings."""
    try:
        header = read_header(root)
    except StoreError as exc:
        raise StoreError(f"--reuse {root}: {exc}") from None
    differences = diff_settings(header.settings.token_json(), settings.token_json())
    if differences:
        raise SettingsMismatchError(f"--reuse {root} was made with other token settings ({'; '.join(differences)}); "
                                    "reuse only stores made with the same model, weights and settings")
    unfinished = verify_store(root, quick=True).unfinished
    if unfinished:
        raise UsageError(f"--reuse {root} is not a finished store: {'; '.join(unfinished)}; finish it first "
                         f"(vitok extract -o {root}), or leave it out")
    return header


def copied_batch(unit: int, records: list[ImageRecord], arrays: list[dict[str, np.ndarray]]):
    """One EncodedBatch of images copied from donors (rows in the stored dtype, as read)."""

    features = arrays[0].keys()
    joined = {f: np.concatenate([a[f] for a in arrays], axis=-2) for f in features}
    rows = {f: [int(a[f].shape[-2]) for a in arrays] for f in features}
    return EncodedBatch(unit, records, joined, rows)


class Deduplicator:
    """The run loop's per-image decision (this module's docstring), and the one owner of its bookkeeping.

    ``skips`` an image that needs no encoding and counts why; ``deliver`` hands what the device stage finished to
    the committer, releasing after each batch the within-unit duplicates whose first copy it holds (the committer's
    queue keeps that order, so the rows are in the shard when a copy reads them); ``send_copies`` hands the rows
    gathered for a unit from committed shards to the committer as one batch."""

    def __init__(self, donors: Donors, committer, counts: RunCounts, within_units: bool = True,
                 names: dict[int, str] | None = None) -> None:
        self.donors, self.committer, self.counts, self.within_units = donors, committer, counts, within_units
        self.names = names or {}  # unit -> its shard's name (how a within-unit copy names its first copy)
        self._firsts: dict[int, dict[str, str]] = {}  # per open unit: content id -> key of its first image
        self._copied: dict[int, list] = {}  # per unit: (record, rows) copied from committed shards, not handed on
        # per unit: content id -> (first key, skip reason) once its batch went to the committer; duplicates waiting
        # for their first copy's batch
        self._queued: defaultdict[int, dict[str, tuple[str, str | None]]] = defaultdict(dict)
        self._waiting: defaultdict[int, defaultdict[str, list[ImageRecord]]] = defaultdict(lambda: defaultdict(list))

    def skips(self, unit: int, item) -> bool:
        record = item.record
        taken = self.donors.take(record)
        if taken is not None:
            self._copied.setdefault(unit, []).append((record, taken[0]))
            if taken[1]:
                self.counts.reused += 1
            else:
                self.counts.duplicates += 1
            return True
        if not self.within_units or record.content_id is None:
            return False
        firsts = self._firsts.setdefault(unit, {})
        if record.content_id in firsts:
            record.copied_from = f"{self.names.get(unit, unit)}/{firsts[record.content_id]}"
            self._duplicate(unit, record)
            self.counts.duplicates += 1
            return True
        firsts[record.content_id] = record.key
        return False

    def first(self, unit: int, record: ImageRecord) -> None:
        """An input encoded without asking ``skips`` (a video cut in time: its content id is known only once its
        pieces were encoded): later inputs of the unit with its pixels are its copies."""
        if self.within_units and record.content_id is not None:
            self._firsts.setdefault(unit, {}).setdefault(record.content_id, record.key)

    def deliver(self, events: list[EncodedBatch | UnitEnd]) -> None:
        """What the device stage finished, in its order, to the committer: batches to write, unit ends to commit."""
        for event in events:
            if isinstance(event, UnitEnd):
                self._queued.pop(event.unit, None)
                assert not self._waiting.pop(event.unit, None), "a duplicate's first copy never came back"
                self.committer.send(Commit(event.unit, event.info))
                continue
            self.committer.send(WriteBatch(event.unit, event))
            for record in event.records:
                self._first_queued(event.unit, record, None)
            for record in event.skipped:
                self._first_queued(event.unit, record, record.reason or "skipped")

    def send_copies(self, unit: int) -> None:
        """The rows copied for ``unit`` from committed shards since the last call, as one batch."""
        copied = self._copied.pop(unit, None)
        if copied:
            self.deliver([copied_batch(unit, *map(list, zip(*copied)))])

    def end(self, unit: int) -> None:
        self._firsts.pop(unit, None)

    def _duplicate(self, unit: int, record: ImageRecord) -> None:
        """An image with the same pixels as an earlier image of its unit (``record.copied_from``): a copy of its
        rows once the first copy's batch went to the committer, or skipped with it."""
        queued = self._queued[unit].get(record.content_id)
        if queued is None:
            self._waiting[unit][record.content_id].append(record)
        else:
            self._send_copy(unit, record, *queued)

    def _first_queued(self, unit: int, record: ImageRecord, skipped: str | None) -> None:
        if record.content_id is None or record.copied_from is not None:
            return
        self._queued[unit].setdefault(record.content_id, (record.key, skipped))
        for duplicate in self._waiting[unit].pop(record.content_id, ()):
            self._send_copy(unit, duplicate, record.key, skipped)

    def _send_copy(self, unit: int, record: ImageRecord, first: str, skipped: str | None) -> None:
        if skipped is None:
            self.committer.send(CopyRows(unit, record, first))
        else:
            record.status, record.reason = "skipped", f"same pixels as {record.copied_from}: {skipped}"
            record.copied_from = None
            self.committer.send(WriteRecord(unit, record))

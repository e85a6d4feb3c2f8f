"""Where an export goes: DEST, a local folder or an object-store prefix (``s3://BUCKET/PREFIX``), each one class
behind ``ExportTarget`` (chosen once by ``open_target``, from the root ``storage.roots.store_root`` makes of DEST).
DEST is either new, empty, or an earlier export of the same store: nothing else is touched. Layouts write their files
into a local folder (``begin``) and hand each one over when it is finished (``done``); ``commit`` writes the marker:

    DEST/.vitok-export.json     the marker (``ExportMarker``): which store (its identity and path), which layout and
                                options, how many images, which were left out and why; written last, so a DEST
                                holding it is a finished export

**A local folder** (``FolderTarget``): the export is written whole in a temporary folder beside DEST and swapped in
at the end, so a reader sees the old export or the new one, never a mix of two stores or a half-written folder.
The temporary folder is ``.<DEST name>.vitok-export-<pid>-<random>.tmp`` beside DEST, holding (until the swap) the
exporting process's record ``.vitok-export-owner.json`` (host, pid, its start time, PID namespace and boot id, as
shard claims record them: ``vitok.storage.claims``). SIGTERM and SIGINT remove it before the process ends; a process
killed outright (SIGKILL, the OOM killer) leaves it, and the next export to the same DEST removes it:

- at once, when the record shows a process of this host, PID namespace and boot that is gone (its pid not running,
  or running a process started at another time);
- otherwise (no readable record, another container or boot, so the pid cannot be judged here), once its pid does not
  run here and nothing in the folder changed for 10 minutes (``STALE_AFTER``): an export running in another PID
  namespace keeps writing and is never touched.

**An object store** (``RootTarget``, over the ``StoreRoot`` interface): there is no rename of a prefix, so files go
to their final names one by one, each a whole object (a PUT, or a multipart upload visible only once complete), and
the marker is what makes the export finished:

1. ``DEST/.vitok-export-pending.json`` (``PENDING``: the store's identity and the exporting process's record) is
   created exclusively (``If-None-Match: *``): one export writes DEST at a time. Another export into DEST is refused
   while the record's process runs (on this host: its pid; elsewhere: a heartbeat, the record rewritten with
   ``If-Match`` every minute by a thread of the export, younger than ``STALE_AFTER`` by the store's clock); a record
   left by a process that is gone is taken over by a compare-and-swap that one taker wins.
2. Each file is written in a local staging folder (``StoreRoot.staging``) and uploaded as soon as the layout closes
   it, then removed: local space holds the files being written, not the export. A file whose object is there already
   with its size and its MD5 as ETag (a rerun of a stopped export; the same tokens exported again) is not uploaded
   again; any other ETag (multipart, KMS) never matches, so that file is.
3. Before DEST's first change, the earlier export's marker is deleted: from then on DEST is unfinished.
4. At the end: the record is checked to still be ours (``If-Match``), objects under DEST this export did not write
   (an earlier export's files) are deleted, the marker is created, the record deleted.

A reader mid-export finds no marker (a pending record instead): files appear whole one by one, an earlier export's
files stay until step 4. A failed export (an error, SIGTERM/SIGINT) into a new DEST deletes what it wrote; one that
replaced an earlier export leaves DEST unfinished with its record marked ownerless, and the next export to DEST takes
it over at once and finishes it (step 2 skips what is up already); one killed outright is taken over once its
process is judged gone (as above). A failure before any change leaves an earlier export as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError, UsageError, VitokError
from ..interrupts import signals_held
from ..storage.claims import STALE_AFTER, RunIdentity, process_alive, read_claim
from ..storage.files import fsync_dir, is_no_space, raise_store_error
from ..storage.records import RunHeader, dumps
from ..storage.roots import StoreRoot

logger = logging.getLogger(__name__)

MARKER = ".vitok-export.json"
MARKER_SCHEMA = 1
OWNER = ".vitok-export-owner.json"  # in the temporary folder only: which process writes it
PENDING = ".vitok-export-pending.json"  # in an object-store DEST while an export writes it
HEARTBEAT = 60.0  # seconds between rewrites of PENDING (a thread of the export, during uploads too)
_TEMP_TAG = ".vitok-export-"
_TRANSIENT = (".vitok-probe", f"{_TEMP_TAG}clock-")  # objects a root or a takeover writes and deletes at once


def store_identity(header: RunHeader) -> str:
    """Names one store whatever its path: its creation time and settings fingerprint (two stores made with equal
    settings at different times are different stores)."""
    text = f"{header.created}\n{header.fingerprint}\n{header.settings.model.weights}"
    return "blake2b:" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass
class ExportMarker:
    """``DEST/.vitok-export.json``: what DEST holds. ``left_out`` maps keys of ok images that were not exported to
    the reason (NaN/Inf values); ``contract`` is the serving layouts' shape contract, read by ``verify --embeds``."""

    layout: str
    store: str  # the store's absolute path (or URL) when exported
    store_id: str
    fingerprint: str
    images: int  # images exported
    vitok_version: str
    created: str
    options: dict[str, Any] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # --allow-partial: what the store lacked
    contract: dict[str, Any] | None = None
    schema: int = MARKER_SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"vitok_export": self.schema, **{k: v for k, v in asdict(self).items() if k != "schema"}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportMarker:
        known = {name for name in cls.__dataclass_fields__ if name != "schema"}
        return cls(**{k: v for k, v in data.items() if k in known}, schema=int(data["vitok_export"]))


def read_marker(folder: Path | StoreRoot) -> ExportMarker | None:
    """The marker of an export (a local folder, or a root: ``s3://...``); None when there is none or it cannot be
    read as one."""
    try:
        data = folder.read(MARKER) if isinstance(folder, StoreRoot) else (Path(folder) / MARKER).read_bytes()
        return ExportMarker.from_json(json.loads(data))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _within(inner: str, outer: str) -> bool:
    """Whether the location ``inner`` is ``outer`` or under it (absolute paths, or URLs)."""
    inner, outer = inner.rstrip("/"), outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


class ExportTarget(ABC):
    """DEST checked when made (nothing is created until ``begin``), filled through ``begin``/``done``, finished by
    ``commit``.

    Usage::

        target = open_target(dest, store_id, store_root)     # refuses unrelated folders and prefixes: UsageError
        folder = target.begin()                              # the local folder to fill
        try:
            ...write files into folder, target.done(path) after each...
            target.commit(marker)
        except BaseException:
            target.abort()
            raise
    """

    shown: str  # DEST as messages name it

    def __init__(self, where: str, store_id: str, store_root: StoreRoot) -> None:
        self.store_id = store_id
        self.store = store_root.where
        if _within(where, store_root.where):
            raise UsageError(f"DEST {self.shown} is inside the store {store_root}; export to a folder outside it")
        if _within(store_root.where, where):
            raise UsageError(f"DEST {self.shown} holds the store {store_root}; export to a folder outside it")

    def show(self, name: str) -> str:
        """How messages name one of DEST's files."""
        return f"{str(self.shown).rstrip('/')}/{name}"

    def _check_existing(self, entries: list[str], marker, pending=None) -> None:
        """Refuse DEST unless it is empty or holds an export of this store (``marker()``), or (an object store) an
        unfinished one of this store (``pending()``: its record)."""
        shown = self.shown
        if not entries:
            return
        if MARKER in entries:
            found = marker()
            if found is None:
                raise UsageError(f"DEST {shown} has a damaged {MARKER}; remove it or give another")
            if found.store_id != self.store_id:
                raise UsageError(f"DEST {shown} holds an export of another store ({found.store}, {found.store_id});"
                                 " give a new or empty folder, or remove it first")
        elif pending is not None and PENDING in entries:
            record = pending()
            if record is None or record.get("store_id") != self.store_id:
                store = (record or {}).get("store", "unknown")
                raise UsageError(f"DEST {shown} holds an unfinished export of another store ({store}); give a new "
                                 "or empty prefix, or remove it first")
        else:
            sample = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(f"DEST {shown} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that are "
                             f"not a vitok export ({sample}); give a new or empty folder (an earlier export of this "
                             "store is replaced whole)")

    @abstractmethod
    def begin(self) -> Path:
        """Start the export; returns the local folder the layout writes its files in."""

    @abstractmethod
    def done(self, path: Path) -> None:
        """A file of the export (under ``begin``'s folder) is finished and will not change."""

    @abstractmethod
    def commit(self, marker: ExportMarker) -> None:
        """Every file written: put the export in place, marked finished."""

    @abstractmethod
    def abort(self) -> None:
        """The export failed: undo what can be undone (see each class)."""


def open_target(dest: str | os.PathLike, store_id: str, store_root: StoreRoot, storage_options=None) -> ExportTarget:
    """The target for DEST: a local folder, or an object store's prefix (``storage_options`` for its client)."""
    from ..storage.roots import store_root as root_of

    root = root_of(dest, "DEST", storage_options)
    folder = root.local_path()
    if folder is not None:
        return FolderTarget(folder, store_id, store_root)
    return RootTarget(root, store_id, store_root)


class FolderTarget(ExportTarget):
    """A local DEST, written in a temporary folder beside it and swapped in whole (module docstring)."""

    def __init__(self, dest: str | Path, store_id: str, store_root: StoreRoot) -> None:
        self.dest = Path(os.path.abspath(dest))
        self.shown = str(dest)
        self.tmp: Path | None = None
        self._made: list[Path] = []  # parent folders created by begin(), removed again by abort()
        super().__init__(str(self.dest), store_id, store_root)
        if self.dest.is_symlink() or (self.dest.exists() and not self.dest.is_dir()):
            raise UsageError(f"DEST {dest} is not a folder; give a new or empty folder, or an earlier export of this "
                             "store")
        self.replacing = self.dest.is_dir()
        self._inode = self.dest.stat().st_ino if self.replacing else None
        if self.replacing:
            try:
                entries = sorted(p.name for p in self.dest.iterdir())
            except OSError as exc:
                raise StoreError(f"cannot read DEST {dest}: {exc.strerror or exc}") from None
            self._check_existing(entries, lambda: read_marker(self.dest))
            if not os.access(self.dest, os.W_OK):
                raise StoreError(f"DEST {dest} is not writable")

    def begin(self) -> Path:
        """Create the temporary folder beside DEST (and DEST's missing parents); returns it."""
        parent = self.dest.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._made.append(folder)
            self._remove_stale_temps()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}{_TEMP_TAG}{os.getpid()}-", suffix=".tmp",
                                             dir=parent))
            os.chmod(self.tmp, 0o777 & ~_umask())
            (self.tmp / OWNER).write_text(RunIdentity.current().to_json())
        except OSError as exc:
            self.abort()
            if is_no_space(exc):
                raise_store_error(exc, self.dest)
            raise StoreError(f"cannot write beside DEST {self.dest}: {exc.strerror or exc}") from None
        return self.tmp

    def done(self, path: Path) -> None:
        """Nothing to do: the file is in the temporary folder, swapped in whole by ``commit``."""

    def _remove_stale_temps(self) -> None:
        prefix = f".{self.dest.name}{_TEMP_TAG}"
        here = RunIdentity.current()
        for path in self.dest.parent.glob(f"{prefix}*.tmp"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit():
                continue
            owner = read_claim(path / OWNER)
            gone = here.judges_gone(owner) if owner is not None and owner.get("pid") == int(pid) else None
            if gone is None:  # the pid cannot be judged here (another PID namespace looks dead): wait for quiet
                gone = not process_alive(int(pid)) and _untouched_for(path, STALE_AFTER)
            if gone:
                logger.info("removing %s, left by an interrupted export", path.name)
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, marker: ExportMarker) -> None:
        """Write the marker into the temporary folder and swap it in for DEST (old content removed)."""
        assert self.tmp is not None, "begin() first"
        try:
            (self.tmp / MARKER).write_text(dumps(marker.to_json()) + "\n")
            with signals_held():  # SIGTERM/SIGINT wait for the swap: never DEST gone and the old export aside
                (self.tmp / OWNER).unlink()
                if self.replacing and self.dest.is_dir():
                    if self.dest.stat().st_ino != self._inode:
                        raise StoreError(f"DEST {self.dest} changed during the export; nothing was replaced")
                    if not _exchange(self.tmp, self.dest):  # no renameat2: two renames, a moment without DEST
                        old = self.tmp.with_name(self.tmp.name[:-len(".tmp")] + "-old.tmp")
                        os.rename(self.dest, old)
                        os.rename(self.tmp, self.dest)
                        self.tmp = old
                    shutil.rmtree(self.tmp, ignore_errors=True)  # now the old export
                else:
                    os.rename(self.tmp, self.dest)  # fails if DEST appeared meanwhile with content
                self.tmp = None
            fsync_dir(self.dest.parent)
        except OSError as exc:
            self.abort()
            if is_no_space(exc):
                raise_store_error(exc, self.dest)
            raise StoreError(f"cannot put the export in place at {self.dest}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        """Remove the temporary folder and any parent this export created."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made = []


class RootTarget(ExportTarget):
    """DEST under a store root that is not a local folder (an S3 prefix): files put one by one as whole objects, the
    marker last, one export at a time through ``PENDING`` (module docstring)."""

    def __init__(self, root: StoreRoot, store_id: str, store_root: StoreRoot) -> None:
        self.root = root
        self.shown = root.url
        self.folder: Path | None = None
        self.version: str | None = None  # of our PENDING record while we hold it
        self.written: set[str] = set()  # names put by this export
        self.identity = RunIdentity.current()
        super().__init__(root.where, store_id, store_root)
        entries = [entry.name for entry in root.list("") if not entry.name.startswith(_TRANSIENT)]
        self.state = "new" if not entries else "finished" if MARKER in entries else "unfinished"
        self._check_existing(entries, lambda: read_marker(root), self._pending)
        self._started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self._lock = threading.Lock()  # (the heartbeat thread and the export both rewrite PENDING)
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._lost: StoreError | None = None  # set by the heartbeat thread when another export took DEST over
        self._there: dict[str, Any] | None = None  # what DEST held when the first file went up: name -> Entry
        self._unfinished = False  # the earlier export's marker deleted

    def _pending(self) -> dict | None:
        try:
            record = json.loads(self.root.read(PENDING))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _record(self, owned: bool = True) -> bytes:
        record = {"vitok_export_pending": 1, "store_id": self.store_id, "store": self.store,
                  "started": self._started,
                  "run": json.loads(self.identity.to_json()) if owned else None}
        return (json.dumps(record) + "\n").encode()

    def begin(self) -> Path:
        """Take DEST (``PENDING`` created, or taken over from an export that is gone) and make the staging folder."""
        self.root.prepare()  # the bucket exists, the credentials may write, conditional writes are honoured
        record = self._record()
        version = self.root.create(PENDING, record)
        self.version = version if version is not None else self._take_over(record)
        self._beats = threading.Thread(target=self._beat, name="vitok-export-heartbeat", daemon=True)
        self._beats.start()
        try:
            self.folder = self.root.staging(f"{_TEMP_TAG.lstrip('.')}{self.identity.token}")
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot make local staging space for DEST {self.shown}: {exc.strerror or exc}") from None
        return self.folder

    def _busy(self, holder: dict) -> StoreError:
        run = holder.get("run") or {}
        return StoreError(f"DEST {self.shown} is being written by another export (pid {run.get('pid', '?')} on "
                          f"{run.get('host', '?')}, since {holder.get('started', '?')}); run one export into a DEST "
                          f"at a time (a stopped one's {PENDING} is taken over once its process is gone, or after "
                          f"{STALE_AFTER / 60:.0f} minutes without a heartbeat)")

    def _take_over(self, record: bytes) -> str:
        """PENDING exists: take it over if its export is gone (an ownerless record, a process judged gone here, or
        no heartbeat for ``STALE_AFTER`` by the store's clock); else the DEST is busy."""
        try:
            data, old = self.root.read_with_version(PENDING)
            holder = json.loads(data)
        except FileNotFoundError:  # finished or given up meanwhile
            holder, old = {}, None
        except ValueError:
            holder = {}
        if old is None:
            version = self.root.create(PENDING, record)
            if version is None:
                raise self._busy({})
            return version
        if holder.get("store_id", self.store_id) != self.store_id:
            raise UsageError(f"DEST {self.shown} holds an unfinished export of another store ({holder.get('store')}); "
                             "give a new or empty prefix, or remove it first")
        owner = holder.get("run")
        gone = True if owner is None else self.identity.judges_gone(owner)
        if gone is None:  # another host, container or boot: judged by its heartbeat's age, on the store's clock
            entry = self.root.stat(PENDING)
            clock = f"{_TEMP_TAG}clock-{self.identity.token}"
            now = self.root.touch(clock, b"")
            self.root.delete(clock)
            gone = entry is None or now - entry.modified > STALE_AFTER
        if not gone:
            raise self._busy(holder)
        version = self.root.swap(PENDING, record, old)
        if version is None:  # another taker won
            raise self._busy(self._pending() or {})
        logger.info("taking over %s from an export that stopped (%s)", self.show(PENDING),
                    "ownerless" if owner is None else f"pid {owner.get('pid')} on {owner.get('host')}")
        return version

    def _renew(self) -> None:
        """Rewrite PENDING if it still holds our version: the heartbeat, and the check that no one took DEST over."""
        with self._lock:
            if self._lost is None and self.version is not None:
                version = self.root.swap(PENDING, self._record(), self.version)
                if version is None:
                    self.version = None
                    self._lost = StoreError(f"DEST {self.shown}: another export took it over while this one wrote "
                                            "it; this one stopped, nothing marked finished (that export finishes it)")
                else:
                    self.version = version
            if self._lost is not None:
                raise self._lost

    def _beat(self) -> None:
        """The heartbeat thread: PENDING rewritten every ``HEARTBEAT`` seconds until the export ends (a store that
        fails now is retried at the next beat; a record taken over stops it)."""
        while not self._stop.wait(HEARTBEAT):
            try:
                self._renew()
            except StoreError:
                if self._lost is not None:
                    return
            except Exception:  # noqa: BLE001 (the export's own requests report the store's faults)
                pass

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
            self._beats = None

    def done(self, path: Path) -> None:
        """Upload a finished file at its name under DEST (whole, or not visible) and remove the local copy."""
        assert self.folder is not None, "begin() first"
        if self._lost is not None:  # (found by the heartbeat thread)
            raise self._lost
        path = Path(path)
        name = path.relative_to(self.folder).as_posix()
        if self._there is None:
            self._there = {entry.name: entry for entry in self.root.walk("")}
        if _same_object(self._there.get(name), path):  # (a rerun, an export of the same tokens again)
            path.unlink()
        else:
            self._unfinish()
            self.root.put(name, path)
        self.written.add(name)
        parent = path.parent
        while parent != self.folder:  # (a vllm-ec entry's folder)
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        if self._lost is not None:
            raise self._lost

    def _unfinish(self) -> None:
        """Before DEST's first change: an earlier export's marker goes (from now on that export is not whole)."""
        if self.state == "finished" and not self._unfinished:
            self.root.delete(MARKER)
        self._unfinished = True

    def commit(self, marker: ExportMarker) -> None:
        """Upload what the layout did not hand over, delete what an earlier export left that this one did not write,
        then create the marker and delete PENDING."""
        assert self.folder is not None and self.version is not None, "begin() first"
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            self.done(path)
        self._stop_beating()
        self._renew()
        self._unfinish()
        for entry in self.root.walk(""):
            if entry.name not in self.written and entry.name not in (PENDING, MARKER):
                self.root.delete(entry.name)
        with signals_held():  # SIGTERM/SIGINT wait: never the marker created and PENDING left ours
            if self.root.create(MARKER, (dumps(marker.to_json()) + "\n").encode()) is None:
                raise StoreError(f"DEST {self.shown}: another export finished it while this one wrote it; nothing "
                                 "of this one marked finished")
            self.root.delete(PENDING, self.version)
            self.version = None
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def abort(self) -> None:
        """Into a new DEST: delete what this export put there. Before any change: DEST as it was. Else: DEST left
        unfinished, PENDING ownerless, so the next export takes it over at once. (Errors of the store here are
        dropped: the one that stopped the export is the one reported.)"""
        self._stop_beating()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self.version is None:
            return
        with contextlib.suppress(VitokError, OSError):
            if self.state == "new":
                for name in sorted(self.written):
                    self.root.delete(name)
            if self.state == "new" or (self.state == "finished" and not self._unfinished):
                self.root.delete(PENDING, self.version)
            else:
                self.root.swap(PENDING, self._record(owned=False), self.version)
        self.version = None


def _same_object(entry, path: Path) -> bool:
    """Whether an object already holds exactly this local file: same size, and an ETag that is the file's MD5 (a
    single-part upload without KMS encryption; any other ETag never matches, so the file is uploaded again)."""
    if entry is None or entry.size != path.stat().st_size:
        return False
    etag = entry.version.strip('"')
    if len(etag) != 32 or "-" in etag:
        return False
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest() == etag


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (file system without exchange), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def _untouched_for(folder: Path, seconds: float) -> bool:
    """Nothing in ``folder`` (it, or a file or folder directly in it) was modified in the last ``seconds``."""
    import time

    try:
        newest = folder.stat().st_mtime
        with os.scandir(folder) as entries:
            for entry in entries:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return True  # gone, or unreadable: nothing to protect
    return time.time() - newest > seconds

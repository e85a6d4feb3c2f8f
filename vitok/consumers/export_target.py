"""Where an export goes. DEST is either new, an empty folder, or an earlier export of the same store: nothing else is
touched. The export is written whole in a temporary folder beside DEST and swapped in at the end, so a reader sees
the old export or the new one, never a mix of two stores or a half-written folder.

    DEST/.vitok-export.json     the marker (``ExportMarker``): which store (its identity and path), which layout and
                                options, how many images, which were left out and why; written last, inside the
                                temporary folder, so a folder holding it is a finished export

The temporary folder is ``.<DEST name>.vitok-export-<pid>-<random>.tmp`` beside DEST, holding (until the swap) the
exporting process's record ``.vitok-export-owner.json`` (host, pid, its start time, PID namespace and boot id, as
shard claims record them: ``vitok.storage.claims``). SIGTERM and SIGINT remove it before the process ends; a process
killed outright (SIGKILL, the OOM killer) leaves it, and the next export to the same DEST removes it:

- at once, when the record shows a process of this host, PID namespace and boot that is gone (its pid not running,
  or running a process started at another time);
- otherwise (no readable record, another container or boot, so the pid cannot be judged here), once its pid does not
  run here and nothing in the folder changed for 10 minutes (``STALE_AFTER``): an export running in another PID
  namespace keeps writing and is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError, UsageError
from ..interrupts import signals_held
from ..storage.claims import STALE_AFTER, RunIdentity, process_alive, read_claim
from ..storage.files import fsync_dir, is_no_space, raise_store_error
from ..storage.records import RunHeader, dumps

logger = logging.getLogger(__name__)

MARKER = ".vitok-export.json"
MARKER_SCHEMA = 1
OWNER = ".vitok-export-owner.json"  # in the temporary folder only: which process writes it
_TEMP_TAG = ".vitok-export-"


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
    store: str  # the store's absolute path when exported
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


def read_marker(folder: Path) -> ExportMarker | None:
    """The marker of an export folder; None when there is none or it cannot be read as one."""
    try:
        return ExportMarker.from_json(json.loads((Path(folder) / MARKER).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ExportTarget:
    """DEST checked when made (nothing is created until ``begin``), written aside, swapped in by ``commit``.

    Usage::

        target = ExportTarget(dest, store_id, store_root)   # refuses unrelated folders: UsageError
        folder = target.begin()                              # the temporary folder to fill
        try:
            ...write into folder...
            target.commit(marker)
        except BaseException:
            target.abort()
            raise
    """

    def __init__(self, dest: str | Path, store_id: str, store_root: Path) -> None:
        self.dest = Path(os.path.abspath(dest))
        self.store_id = store_id
        self.tmp: Path | None = None
        self._made: list[Path] = []  # parent folders created by begin(), removed again by abort()
        root = Path(os.path.abspath(store_root))
        if self.dest == root or root in self.dest.parents:
            raise UsageError(f"DEST {dest} is inside the store {store_root}; export to a folder outside it")
        if self.dest in root.parents:
            raise UsageError(f"DEST {dest} holds the store {store_root}; export to a folder outside it")
        if self.dest.is_symlink() or (self.dest.exists() and not self.dest.is_dir()):
            raise UsageError(f"DEST {dest} is not a folder; give a new or empty folder, or an earlier export of this "
                             "store")
        self.replacing = self.dest.is_dir()
        self._inode = self.dest.stat().st_ino if self.replacing else None
        if self.replacing:
            self._check_existing(dest)

    def _check_existing(self, shown) -> None:
        try:
            entries = sorted(p.name for p in self.dest.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot read DEST {shown}: {exc.strerror or exc}") from None
        if not entries:
            pass
        elif MARKER not in entries:
            sample = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(f"DEST {shown} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that are "
                             f"not a vitok export ({sample}); give a new or empty folder (an earlier export of this "
                             "store is replaced whole)")
        else:
            marker = read_marker(self.dest)
            if marker is None:
                raise UsageError(f"DEST {shown} has a damaged {MARKER}; remove the folder or give another")
            if marker.store_id != self.store_id:
                raise UsageError(f"DEST {shown} holds an export of another store ({marker.store}, {marker.store_id});"
                                 " give a new or empty folder, or remove it first")
        if not os.access(self.dest, os.W_OK):
            raise StoreError(f"DEST {shown} is not writable")

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

"""Where a store lives: one interface (``StoreRoot``) for a local folder and an object store (``s3.py``).

Everything vitok writes or reads in a store goes through it, by name relative to the store (``vitok.json``,
``shards/shard-000000.h5``, ``.claims/runs/<run>``); the commit protocol (``shards.py``), the header's and the plan's
exclusive creation, the claims and their heartbeats (``claims.py``), the index's digest and every reader are written
once, over these operations:

    read(name) / read_range(name, start, size) / open(name)    bytes, a byte range, a seekable file to read
    local_copy(name)                                            a local file of it while the context lasts (the file
                                                                itself; a bucket's object in one GET: a whole shard)
    stat(name) -> Entry | None, list(folder) -> [Entry]         size, version (changes on every rewrite), the store's
                                                                time of the last write; entries directly in a folder
    walk(folder) -> [Entry]                                     every file under a folder, at any depth (one paged
                                                                listing of a bucket)
    write(name, data)                                           whole or not at all (a rename; one PUT)
    create(name, data) -> version | None                        only if absent: of many writers exactly one wins
                                                                (a hard link; PUT If-None-Match: *)
    swap(name, data, version) -> version | None                 only if it still holds ``version`` (claims' takeover:
                                                                a rename aside; PUT If-Match)
    put(name, path, exclusive)                                  a finished local file or folder, whole (a rename; an
                                                                upload, multipart when large, never visible partly)
    move(source, target)                                        a superseded shard aside (a rename; copy, delete)
    delete(name, version) / delete_tree(name)
    touch(name) -> time                                         rewrite a heartbeat, return the store's clock now
    clock() -> time                                             the store's clock, nothing written (verify)
    staging(folder)                                             local room for a shard being written (the folder
                                                                itself; bounded temporary space for a bucket)
    leftovers(folder)                                           what killed writers left (temporary files;
                                                                incomplete multipart uploads)

A location is turned into a root once, by ``store_root`` (a local path, ``file://``, or ``s3://BUCKET/PREFIX``); a
URL it cannot serve is refused (``location.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat as stat_module
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import UsageError
from .files import atomic_write_bytes, checksum, create_exclusive, fsync_dir, leftover_temps, raise_store_error, remove
from .location import local_store_path, url_scheme

CHECKSUM_BLOCK = 8 << 20
SERVED = ("s3",)  # URL schemes served by a root (others, but file://, are refused)
STORAGE_OPTION_HELP = ("Stores in S3 (s3://BUCKET/PREFIX): a KEY=VALUE for the client, on top of its own configuration "
                       "(AWS_* variables, profiles): endpoint_url, region_name, profile, aws_access_key_id, "
                       "multipart_threshold... (repeatable; never recorded in the store).")


@dataclass(frozen=True)
class Entry:
    """One file or object of a store, as a listing or a stat sees it."""

    name: str  # relative to the folder listed (``stat``: the name asked for)
    size: int
    version: str  # changes whenever it is rewritten (local: mtime in ns; S3: the ETag)
    modified: float  # when it was last written, by the store's clock (seconds since the epoch)
    folder: bool = False  # a folder (an NPY shard), not a file


@dataclass(frozen=True)
class Leftover:
    """Something a killed writer left: a temporary file, or an upload never completed."""

    name: str  # as shown to users
    becomes: str  # the name it was being written for, relative to its folder (``shard-000001.h5``)
    size: int
    handle: str = ""  # what the root needs to remove it (an upload id)


class StoreRoot(ABC):
    """The place a store lives; names are relative to it, ``/``-separated (see the module docstring)."""

    url: str  # how messages name it: the path as given, or ``s3://bucket/prefix``

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def where(self) -> str:
        """Names this store whatever the working directory (an absolute path, a URL): for records."""
        return self.url

    def show(self, name: str) -> str:
        """How messages name one of its files."""
        return f"{self.url.rstrip('/')}/{name}"

    def local_path(self, name: str = "") -> Path | None:
        """The local file or folder holding ``name``; None where the store is not a local folder."""
        return None

    # ---- reading ---------------------------------------------------------------------------------------------

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole file; FileNotFoundError when there is none."""

    @abstractmethod
    def read_range(self, name: str, start: int, size: int) -> bytes:
        """``size`` bytes from ``start`` (fewer at the end of the file)."""

    @abstractmethod
    def open(self, name: str) -> BinaryIO:
        """A seekable binary file to read (HDF5 and tar readers)."""

    @abstractmethod
    def stat(self, name: str) -> Entry | None:
        """The file's entry, None when there is none."""

    @abstractmethod
    def list(self, folder: str = "") -> list[Entry]:
        """Files and folders directly in ``folder``, sorted by name (empty when it does not exist)."""

    def walk(self, folder: str = "") -> list[Entry]:
        """Every file under ``folder`` at any depth, named relative to it (``a/b.npy``), sorted by name."""
        found = []
        for entry in self.list(folder):
            inner = f"{folder}/{entry.name}" if folder else entry.name
            if entry.folder:
                found += [Entry(f"{entry.name}/{e.name}", e.size, e.version, e.modified) for e in self.walk(inner)]
            else:
                found.append(entry)
        return sorted(found, key=lambda e: e.name)

    def read_with_version(self, name: str) -> tuple[bytes, str]:
        """The file and the version it had when read (for ``swap``)."""
        data = self.read(name)
        entry = self.stat(name)
        if entry is None:
            raise FileNotFoundError(name)
        return data, entry.version

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def is_folder(self, name: str) -> bool:
        return bool(self.list(name))

    def fetch(self, name: str) -> Path:
        """A local file holding ``name``'s bytes (the file itself in a local folder, else a cached copy)."""
        path = self.local_path(name)
        assert path is not None, "a root that is not a local folder implements fetch"
        return path

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """A local file holding ``name``'s bytes while the context lasts, for reading all of it: the file itself in
        a local folder; elsewhere a copy in this process's temporary space (one request), removed at exit. A reader
        opened inside keeps its file open after (POSIX), so the space is held only while it is read."""
        path = self.local_path(name)
        assert path is not None, "a root that is not a local folder implements local_copy"
        yield path

    def checksum(self, name: str) -> str:
        """blake2b-128 of the file's bytes (what sidecars record), read in blocks."""
        digest = hashlib.blake2b(digest_size=16)
        with self.open(name) as handle:
            while chunk := handle.read(CHECKSUM_BLOCK):
                digest.update(chunk)
        return digest.hexdigest()

    def cache_folder(self, name: str) -> Path:
        """A local folder for a cache derived from the store (the key index): inside a local store, else under
        ``$VITOK_CACHE_DIR/stores/``."""
        from ..environment import cache_dir

        return cache_dir() / "stores" / hashlib.blake2b(self.where.encode(), digest_size=8).hexdigest() / name

    # ---- writing ---------------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self) -> None:
        """Make sure the store can be written here (a local folder is created)."""

    @abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Write a file whole: readers see the old one or all of the new one."""

    @abstractmethod
    def create(self, name: str, data: bytes) -> str | None:
        """Create a file only if there is none: its version, or None when another writer's is there."""

    @abstractmethod
    def swap(self, name: str, data: bytes, version: str) -> str | None:
        """Replace a file only if it still holds ``version``: the new version, or None when it changed or is gone."""

    @abstractmethod
    def put(self, name: str, path: Path, exclusive: bool = False) -> bool:
        """Put a finished local file or folder (from ``staging``) at ``name`` whole; the local copy is gone after.
        ``exclusive``: False, and nothing written, when something is at ``name`` already."""

    @abstractmethod
    def move(self, source: str, target: str) -> bool:
        """Move a file or folder to another name (replacing what is there); False when ``source`` is gone. Not
        atomic on an object store (each object copied, then deleted): callers order their moves so that a move
        killed midway leaves both names or the target, never neither."""

    @abstractmethod
    def delete(self, name: str, version: str | None = None) -> bool:
        """Delete a file (only if it still holds ``version``, when given); whether it was deleted."""

    @abstractmethod
    def delete_tree(self, name: str) -> list[tuple[str, OSError]]:
        """Delete a file or everything under a folder; what could not be deleted (gone already is no failure)."""

    @abstractmethod
    def touch(self, name: str, data: bytes) -> float:
        """Write ``name`` (a heartbeat) and return the store's time of that write: the clock every staleness is
        judged by, so that the hosts' clocks never matter."""

    def clock(self) -> float:
        """The store's time now, read without writing anything (for readers that judge heartbeats: ``verify``): a
        local folder, this host's clock; an object store, the time its server answers with."""
        return time.time()

    @abstractmethod
    def staging(self, folder: str) -> Path:
        """A local folder where temporary files for ``folder`` are written before ``put``."""

    @abstractmethod
    def leftovers(self, folder: str, untouched_for: float = 0.0) -> list[Leftover]:
        """What killed writers left for ``folder`` and have not touched for ``untouched_for`` seconds."""

    @abstractmethod
    def remove_leftover(self, folder: str, leftover: Leftover) -> None: ...


# ---- a local folder --------------------------------------------------------------------------------------------


class LocalRoot(StoreRoot):
    """A store in a local (or mounted) folder: renames, hard links and ``O_EXCL``, as the store always used."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.url = str(self.path)

    @property
    def where(self) -> str:
        return os.path.abspath(self.path)

    def local_path(self, name: str = "") -> Path:
        return self.path / name if name else self.path

    def show(self, name: str) -> str:
        return str(self.path / name)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    # ---- reading

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def read_range(self, name: str, start: int, size: int) -> bytes:
        with open(self.path / name, "rb") as handle:
            return os.pread(handle.fileno(), size, start)

    def open(self, name: str) -> BinaryIO:
        return open(self.path / name, "rb")

    def stat(self, name: str) -> Entry | None:
        try:
            st = (self.path / name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Entry(name, st.st_size, str(st.st_mtime_ns), st.st_mtime, stat_module.S_ISDIR(st.st_mode))

    def list(self, folder: str = "") -> list[Entry]:
        try:
            entries = list(os.scandir(self.path / folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            found.append(Entry(entry.name, st.st_size, str(st.st_mtime_ns), st.st_mtime, entry.is_dir()))
        return sorted(found, key=lambda e: e.name)

    def is_folder(self, name: str) -> bool:
        return (self.path / name).is_dir()

    def checksum(self, name: str) -> str:
        return checksum(self.path / name)

    def cache_folder(self, name: str) -> Path:
        return self.path / name

    # ---- writing

    def prepare(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise_store_error(exc, self.path)

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path / name, data)

    def create(self, name: str, data: bytes) -> str | None:
        path = self.path / name
        if not create_exclusive(path, data):
            return None
        fsync_dir(path.parent)
        entry = self.stat(name)
        return entry.version if entry is not None else ""

    def swap(self, name: str, data: bytes, version: str) -> str | None:
        """Move the file aside (a rename: one of many takers succeeds), check it is the version expected (else put
        it back), then create the new one exclusively."""
        path = self.path / name
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        try:
            moved = str(aside.stat().st_mtime_ns)
        except OSError:
            moved = None
        if moved != version:  # someone replaced it meanwhile: put theirs back
            with contextlib.suppress(OSError):
                os.link(aside, path)
            remove(aside)
            return None
        remove(aside)
        return self.create(name, data)

    def put(self, name: str, path: Path, exclusive: bool = False) -> bool:
        final = self.path / name
        if Path(path) == final:
            return True
        if exclusive and (final.exists() or final.is_symlink()):
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        fsync_dir(final.parent)
        return True

    def move(self, source: str, target: str) -> bool:
        """A rename (a folder at ``target``, an older copy, is removed first: a rename cannot replace one)."""
        origin, final = self.path / source, self.path / target
        if not (origin.exists() or origin.is_symlink()):
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and not final.is_symlink():
            remove(final)
        os.replace(origin, final)
        fsync_dir(origin.parent)
        fsync_dir(final.parent)
        return True

    def delete(self, name: str, version: str | None = None) -> bool:
        path = self.path / name
        if version is not None:
            entry = self.stat(name)
            if entry is None or entry.version != version:
                return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            shutil.rmtree(path, ignore_errors=True)
        return True

    def delete_tree(self, name: str) -> list[tuple[str, OSError]]:
        import sys

        path = self.path / name
        failures: list[tuple[str, OSError]] = []
        try:
            if path.is_dir() and not path.is_symlink():
                if sys.version_info >= (3, 12):
                    shutil.rmtree(path, onexc=lambda _f, p, exc: failures.append((p, exc)))
                else:
                    shutil.rmtree(path, onerror=lambda _f, p, info: failures.append((p, info[1])))
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as exc:
            failures.append((str(path), exc))
        failures = [(p, exc) for p, exc in failures if not isinstance(exc, FileNotFoundError)]
        if not failures and (path.exists() or path.is_symlink()):
            failures.append((str(path), OSError()))
        return failures

    def touch(self, name: str, data: bytes) -> float:
        """The file system's time now: ``os.utime`` on the file (written first if it is not there)."""
        path = self.path / name
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return path.stat().st_mtime

    def staging(self, folder: str) -> Path:
        path = self.path / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def leftovers(self, folder: str, untouched_for: float = 0.0) -> list[Leftover]:
        found = []
        for path in leftover_temps(self.path / folder, untouched_for):
            try:
                size = path.stat().st_size if path.is_file() else 0
            except OSError:
                size = 0
            found.append(Leftover(path.name, _temp_target(path.name), size))
        return found

    def remove_leftover(self, folder: str, leftover: Leftover) -> None:
        remove(self.path / folder / leftover.name)


def _temp_target(name: str) -> str:
    """``.shard-000001.h5.<run>.tmp`` -> ``shard-000001.h5`` (run ids and mkstemp suffixes have no dots)."""
    return name[1 : -len(".tmp")].rsplit(".", 1)[0] if name.startswith(".") and name.endswith(".tmp") else name


class ReadAhead(io.RawIOBase):
    """A seekable file read by byte ranges through ``fetch(start, size)``, in blocks of ``block`` bytes, the last
    ``keep`` of them kept: HDF5 and tar readers make many small reads near one another."""

    def __init__(self, fetch, size: int, block: int = 1 << 18, keep: int = 16) -> None:
        self._fetch, self._size, self._block, self._keep = fetch, size, block, keep
        self._position = 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def prime(self, start: int, data: bytes) -> None:
        """Bytes already read from ``start`` (a multiple of the block size): kept as blocks."""
        for offset in range(0, len(data), self._block):
            self._blocks[(start + offset) // self._block] = data[offset : offset + self._block]

    def _get(self, index: int) -> bytes:
        data = self._blocks.pop(index, None)
        if data is None:
            data = self._fetch(index * self._block, self._block)
        self._blocks[index] = data  # most recently used last
        while len(self._blocks) > self._keep:
            self._blocks.pop(next(iter(self._blocks)))
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self._size - self._position))
        if want > 2 * self._block:  # a large read: one request, not kept
            data = self._fetch(self._position, want)
            view[: len(data)] = data
            self._position += len(data)
            return len(data)
        done = 0
        while done < want:
            index, within = divmod(self._position, self._block)
            data = self._get(index)[within : within + want - done]
            if not data:
                break
            view[done : done + len(data)] = data
            done += len(data)
            self._position += len(data)
        return done


def parse_storage_options(values) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--storage-option``) as a dict; a dict is returned as it is."""
    if not values:
        return {}
    if isinstance(values, dict):
        return dict(values)
    options = {}
    for value in values:
        key, sep, text = str(value).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option {value!r} is not KEY=VALUE (e.g. endpoint_url=http://host:9000)")
        options[key.strip()] = text
    return options


def check_location(location: str | os.PathLike, what: str = "the store") -> None:
    """Refuse a location no root serves (before anything else is done), without connecting to it."""
    if url_scheme(location) not in SERVED:
        local_store_path(location, what)


def store_root(location: str | os.PathLike | StoreRoot, what: str = "the store",
               storage_options=None) -> StoreRoot:
    """The root a location names: a local folder, or an object store it serves; anything else is refused."""
    if isinstance(location, StoreRoot):
        return location
    if url_scheme(location) == "s3":
        from .s3 import S3Root

        return S3Root.from_url(str(location), parse_storage_options(storage_options), what)
    if storage_options:
        raise UsageError(f"--storage-option applies to object stores (s3://...); {what} {location} is a local folder")
    return LocalRoot(local_store_path(location, what))

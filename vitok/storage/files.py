"""Small file primitives the store is built on: atomic writes, exclusive creation, checksums, the user's umask.

Temporary files are created with ``tempfile.mkstemp`` (mode 0600); every file the store keeps is given the mode a
plain ``open`` would give it (0666 minus the umask), so colleagues on a shared file system can read the store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

from ..atomic import AtomicFile
from ..errors import DiskFullError, StoreError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library (h5py) only says so in its message."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        return True
    text = str(exc)
    return "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see either nothing or all of it; errors become store errors naming the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with AtomicFile(path.parent, path.name, path) as atomic:
            atomic.handle.write(data)
    except OSError as exc:
        raise_store_error(exc, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def create_exclusive(path: Path, text: str | bytes) -> bool:
    """Create ``path`` with ``text`` only if it does not exist yet, atomically; False if someone else won."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with AtomicFile(path.parent, path.name, path, exclusive=True) as atomic:
            atomic.handle.write(text.encode() if isinstance(text, str) else text)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise_store_error(exc, path)


def raise_store_error(exc: OSError, path: Path, needed: int | None = None):
    """Turn an OSError while writing the store into the error a user can act on."""
    if is_no_space(exc):
        need = f" (needed ~{max(1, needed // 2**20)} MB more)" if needed else ""
        raise DiskFullError(f"no space left on the device holding {path}{need}; free space and rerun the same "
                            "command to resume") from None
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        raise StoreError(f"cannot write {path}: read-only file system") from None
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        raise StoreError(f"cannot write {path}: permission denied") from None
    raise StoreError(f"cannot write {path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") \
        from None


def checksum(path: Path, block: int = 8 << 20) -> str:
    """blake2b of a file's bytes, read in blocks (hashlib releases the GIL on large updates)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing if it is gone."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def leftover_temps(folder: Path, untouched_for: float = 0.0) -> list[Path]:
    """Temporary files (``.<name>.<random>.tmp``, ``AtomicFile``'s) in ``folder`` not modified for ``untouched_for``
    seconds: a writer that is still going keeps touching its file, a killed one leaves it behind."""
    import time

    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    now = time.time()
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime >= untouched_for:
                    found.append(Path(entry.path))
            except OSError:
                continue
    return sorted(found)

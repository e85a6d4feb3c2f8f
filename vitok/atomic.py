"""Files that appear whole or not at all, with the mode a plain ``open`` would give them. Shared by the store
(``vitok.storage.files``), the plan and the machine's kernel-choice cache: one implementation of write-aside,
flush, fsync and rename."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from pathlib import Path

# what os.link raises on a file system without hard links (EPERM: exFAT, vfat, gcsfuse; ENOTSUP/EOPNOTSUPP: s3fs,
# some SMB mounts; EXDEV, ENOSYS, EMLINK: other FUSE and network file systems)
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK,
                 errno.EACCES}


@functools.cache
def file_mode() -> int:
    """0666 minus the process umask (read once: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class AtomicFile:
    """A file that appears whole or not at all: written under a temporary name in its folder, flushed to disk, given
    the store's file mode, then renamed to a name that may be decided only after writing (content-addressed files).

        with AtomicFile(folder, "plan") as atomic:
            atomic.handle.write(data)
            atomic.path = folder / f"{digest}.jsonl"   # where it goes on success; left out: nothing is kept

    On any exception inside the block, or without a path, the temporary file is removed. ``exclusive``: put it in
    place only if ``path`` does not exist yet (a hard link, or an ``O_EXCL`` copy where the file system has no hard
    links, so the first writer wins; FileExistsError otherwise).
    """

    def __init__(self, folder: Path, name: str, path: Path | None = None, buffering: int = -1,
                 exclusive: bool = False) -> None:
        self.folder, self.path, self.exclusive = Path(folder), path, exclusive
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.fchmod(fd, file_mode())
        self.handle = os.fdopen(fd, "wb", buffering=buffering)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None and self.path is not None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None and self.path is not None:
                if self.exclusive:
                    self._link_or_create()
                    self._discard()
                else:
                    os.replace(self.tmp, self.path)
                return
        except BaseException:
            self._discard()
            raise
        self._discard()

    def _link_or_create(self) -> None:
        """Put the written file at ``path`` only if nothing is there: a hard link where the file system has them;
        elsewhere (exFAT, gcsfuse, s3fs, some SMB mounts) an ``O_CREAT | O_EXCL`` copy, flushed to disk, so the first
        writer still wins (a reader racing the copy could see it partly written: the window is one small write)."""
        try:
            os.link(self.tmp, self.path)
            return
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
        with open(self.tmp, "rb") as source:
            data = source.read()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())  # FileExistsError: lost
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise
        os.close(fd)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

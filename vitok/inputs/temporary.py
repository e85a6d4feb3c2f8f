"""Local copies of inputs in the temporary space (``TMPDIR``): a tar's video member too large to hold in memory, a
remote file FFmpeg must seek in. The reader removes each copy when its input is done; a process killed with
SIGKILL cannot, and a video's copy may be gigabytes. So each copy is named ``vitok-<kind>-<pid>-<random>``, and the
first copy a process makes in a folder removes the copies there of processes gone from this machine and untouched
for ``ORPHANED_AFTER`` (a process of another PID namespace sharing the folder looks gone: the wait protects it)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time

from ..processes import process_alive

ORPHANED_AFTER = 600.0  # seconds a dead process's copy is left alone (a live one writes or reads it meanwhile)
_COPY = re.compile(r"vitok-(?:member|remote)-(\d+)-")
_swept: set[tuple[int, str]] = set()  # (pid, folder): where this process has looked
logger = logging.getLogger(__name__)


def temporary_copy(kind: str, folder: str | None = None, suffix: str = ""):
    """A new file for a copy of an input (``kind``: ``member`` or ``remote``) in ``folder``, else ``TMPDIR``, open
    for writing and not deleted on close (the reader removes it)."""
    folder = folder or tempfile.gettempdir()
    if (os.getpid(), folder) not in _swept:  # (a forked decode worker looks again: its parent's pid is in the key)
        _swept.add((os.getpid(), folder))
        remove_orphaned_copies(folder)
    return tempfile.NamedTemporaryFile(prefix=f"vitok-{kind}-{os.getpid()}-", suffix=suffix, dir=folder,
                                       delete=False)


def remove_orphaned_copies(folder: str, untouched_for: float = ORPHANED_AFTER) -> list[str]:
    """Remove the copies in ``folder`` left by processes that are gone and untouched for ``untouched_for`` seconds;
    their names."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            match = _COPY.match(entry.name)
            if match is None or int(match[1]) == os.getpid() or process_alive(int(match[1])):
                continue
            with contextlib.suppress(OSError):  # (gone meanwhile: another process removed it)
                if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime >= untouched_for:
                    os.unlink(entry.path)
                    removed.append(entry.name)
    if removed:
        logger.info("removed %d temporary input copies in %s left by processes that are gone", len(removed), folder)
    return removed

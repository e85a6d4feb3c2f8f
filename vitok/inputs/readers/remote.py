"""Opening local paths and URLs alike: URLs (``s3://``, ``gs://``, ``https://``, ``memory://``...) go through fsspec,
an optional dependency (``pip install 'vitok[remote]'`` plus the file system's own package: s3fs for s3://, gcsfs
for gs://, aiohttp for https://).

A remote video is never held in memory: ``fetch_to_temporary`` streams it (fsspec's ``get_file``, a block at a time)
into a file of the local temporary space (``TMPDIR``), hashing it as it comes; its decoder opens that copy, which is
removed once the video is decoded. One video per decode worker is held there at a time; one larger than the space
free there is not fetched (recorded as failed: a later run, with more space, retries it).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, BinaryIO

from ...errors import InputUnavailableError, UsageError
from ..identity import Sha256
from ..sources import is_url, open_regular, url_path
from ..temporary import temporary_copy

if TYPE_CHECKING:
    from ..decode import SourceFile


def fsspec_module():
    try:
        import fsspec
    except ImportError:
        raise UsageError("reading URLs needs fsspec: pip install 'vitok[remote]' (and the file system's package, "
                         "e.g. s3fs for s3://, gcsfs for gs://)") from None
    return fsspec


def open_binary(path: str) -> BinaryIO:
    """A readable binary stream; OSError (FileNotFoundError...) when it cannot be opened, NotRegularFileError for
    a local path that is not a regular file (a FIFO named ``x.tar`` would block the run)."""
    if not is_url(path):
        return open_regular(path)
    fsspec = fsspec_module()
    try:
        return fsspec.open(path, "rb").open()
    except ImportError as exc:  # the protocol's package (s3fs, gcsfs, ...) is missing
        raise UsageError(f"{path}: {exc}") from None


class _HashingWriter(io.RawIOBase):
    """What fsspec's ``get_file`` writes a download to: the temporary file, hashed and counted as it is written."""

    def __init__(self, handle: BinaryIO) -> None:
        super().__init__()
        self.handle, self.digest, self.size = handle, Sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def fetch_to_temporary(url: str, folder: str | None = None) -> SourceFile:
    """A remote file streamed to a temporary local file (``SourceFile.local``; the caller's ``close`` removes it),
    with its size and sha256. InputUnavailableError when it cannot be fetched now (missing, the network, larger than
    the temporary space free in ``folder`` (else ``TMPDIR``), checked before fetching when the size is known, or
    that space filled while fetching): recorded as failed, a later run retries it."""
    from ..decode import SourceFile  # (Pillow: only where a file is fetched, not where a URL is listed)

    fs, inner = fsspec_module().core.url_to_fs(url)
    folder = folder or tempfile.gettempdir()
    try:
        size = fs.size(inner)
    except FileNotFoundError:
        raise InputUnavailableError("cannot fetch: not found") from None
    except Exception:  # a server that gives no size: the copy's own writes tell
        size = None
    free = shutil.disk_usage(folder).free
    if size is not None and size > free:
        raise InputUnavailableError(f"cannot fetch: {size} bytes, more than the {free} bytes free in the temporary "
                                    f"space {folder} (set TMPDIR to a larger one; a later run retries it)")
    suffix = re.sub(r"[^0-9A-Za-z.]", "", os.path.splitext(url_path(url))[1])[:16]  # (FFmpeg reads by content)
    handle = temporary_copy("remote", folder, suffix)
    source = SourceFile(None, 0, local=handle.name)
    try:
        with handle:
            writer = _HashingWriter(handle)
            fs.get_file(inner, writer)
    except BaseException as exc:
        source.close()
        if isinstance(exc, FileNotFoundError):
            raise InputUnavailableError("cannot fetch: not found") from None
        if isinstance(exc, Exception):
            text = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
            raise InputUnavailableError(f"cannot fetch: {reason}") from None
        raise
    source.size, source.sha256 = writer.size, writer.digest.hexdigest()
    return source

"""Opening local paths and URLs alike: URLs (``s3://``, ``gs://``, ``https://``, ``memory://``...) go through fsspec,
an optional dependency (``pip install 'vitok[remote]'`` plus the file system's own package, e.g. s3fs)."""

from __future__ import annotations

from typing import BinaryIO

from ...errors import UsageError
from ..sources import is_url, open_regular


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

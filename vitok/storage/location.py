"""Where a store is, as the user wrote it: a local folder, or a URL.

A URL (``scheme://...``) is never taken for a local path: ``Path("s3://bucket/feats")`` is the relative folder
``s3:/bucket/feats``, and a run would write it in the working directory while its user believes the tokens are in
the bucket. ``s3://`` is served by ``s3.py`` (``roots.store_root``); any other URL is refused with one line naming
what is served (``UsageError``, exit 2). ``file://`` URLs are local paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import UsageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(location: str | os.PathLike) -> str | None:
    """The scheme of a ``scheme://...`` location, lower-cased; None for a plain path."""
    match = _SCHEME.match(os.fspath(location)) if isinstance(location, str) else None
    return match.group(1).lower() if match else None


def _local_path(location: str | os.PathLike, refusal) -> Path:
    """A plain path or a ``file://`` URL as a path; any other URL is refused with ``refusal(scheme)``."""
    scheme = url_scheme(location)
    if scheme is None:
        return Path(location)
    if scheme == "file":
        return Path(unquote(urlsplit(str(location)).path))
    raise UsageError(refusal(scheme))


def local_store_path(location: str | os.PathLike, what: str = "the store") -> Path:
    """``location`` as a local folder; a URL vitok cannot serve as a store is refused (``UsageError``)."""
    return _local_path(location, lambda scheme: f"{what} {location}: vitok cannot keep a store at a {scheme}:// URL; "
                       "give a local folder (or a mounted file system) or s3://BUCKET/PREFIX")


def local_file_path(location: str | os.PathLike, what: str) -> Path:
    """``location`` as a local file that only a local path can name (a picture, a report); any URL but ``file://``
    is refused (``UsageError``) rather than written as the relative folder ``scheme:/...``."""
    return _local_path(location, lambda scheme: f"{what} {location}: only a local file can be written here, not a "
                       f"{scheme}:// URL; give a local path")

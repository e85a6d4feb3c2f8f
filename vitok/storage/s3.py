"""A store in an S3 bucket (AWS S3, or any server with S3's conditional writes: MinIO, R2, Ceph RGW...), through
boto3: ``s3://BUCKET/PREFIX``.

Why boto3: it sends every conditional S3 has (``If-None-Match: *`` on PutObject and CompleteMultipartUpload,
``If-Match`` on PutObject and DeleteObject), ranged GETs, paged listings and multipart uploads as plain calls, and
retries throttling (503 SlowDown), 5xx and dropped connections with exponential backoff itself (``standard``
mode). s3fs has no compare-and-swap (``If-Match``) for a claim's takeover and caches listings, which would hide
other processes' claims; obstore's create mode cannot be multipart (a 5 GiB cap on shards).

How the store's operations map (``roots.StoreRoot``):

- ``write`` is one PutObject: atomic per object, never visible partly.
- ``create`` is PutObject ``If-None-Match: *``; 412 means another writer's object is there, unless it is this
  writer's own (a retried request whose first answer was lost: every conditional write carries a nonce in its
  metadata, checked on a 412).
- ``swap`` (a stale claim taken over) is PutObject ``If-Match: <ETag read>``; ``delete(version)`` DeleteObject
  ``If-Match``, so a run never deletes a claim another run took over.
- ``put`` uploads a finished local file: one PutObject up to ``MULTIPART_BYTES``, else a multipart upload, which is
  invisible until it completes (``If-None-Match: *`` on the completion when exclusive) and aborted on any error; a
  killed upload is listed by ``leftovers`` (ListMultipartUploads) and aborted by the next run of its shard.
- ``read``, ``read_range``, ``open``, ``checksum``, ``fetch`` and ``local_copy`` (a whole shard in one GET) are GETs
  whose body, when a connection drops midway, is asked for again from the first byte missing (``_download``).
- a conditional write answered 409 (ConditionalRequestConflict) is settled by a HEAD, or sent again
  (``_conditional_put``; a multipart upload begun again).
- ``touch`` rewrites a heartbeat and returns its LastModified: the server's clock, never the hosts'.
- ``staging`` is local temporary space of the process (``$TMPDIR/vitok-staging/<store>/<pid>-<token>``), holding only
  the shards being written.

Credentials, region and endpoint come from boto3's own configuration (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL``, ``~/.aws/config``, instance roles), then ``--storage-option KEY=VALUE`` (``endpoint_url``,
``region_name``, ``profile``, ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
``max_attempts``, ``multipart_threshold``, ``multipart_chunksize``). What fails gets one line: credentials missing
or refused and a bucket that does not exist are ``StoreAccessError`` (exit 2: fix the configuration); throttling or
an endpoint that keeps failing after the retries is ``StoreUnavailableError`` (exit 75: rerun the same command to
resume).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from ..errors import StoreAccessError, StoreError, StoreUnavailableError, UsageError
from .files import remove
from .layout import PLAN_DIR
from .roots import Entry, Leftover, ReadAhead, StoreRoot

MULTIPART_BYTES = 64 << 20  # files larger than this are uploaded in parts
PART_BYTES = 32 << 20  # (at least 5 MiB; raised for files of more than 10,000 parts)
PARTS_IN_FLIGHT = 4  # parts of one upload sent at once (memory: this many parts)
READ_BLOCK = 1 << 18  # ranged reads of HDF5 and tar readers: blocks of 256 KiB, the last 16 kept
CONFLICT_RETRIES = 4  # a write answered 409 ConditionalRequestConflict is sent again at most this many times
MAX_ATTEMPTS = 8  # botocore's attempts per request (standard mode: exponential backoff with jitter)
CLIENT_OPTIONS = ("endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                  "verify", "use_ssl")
OWN_OPTIONS = ("profile", "max_attempts", "multipart_threshold", "multipart_chunksize")  # (s3transfer's names)
WRITER = "vitok-writer"  # metadata of every conditional write: a nonce that tells a lost answer of our own write
ACCESS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled",
          "InvalidToken", "ExpiredToken", "AccountProblem"}
UNAVAILABLE = {"SlowDown", "ServiceUnavailable", "503", "InternalError", "500", "RequestTimeout", "Throttling",
               "ThrottlingException", "RequestLimitExceeded", "502", "504"}


# what boto3 reads from the environment: a client is made again when one of them changes
CONFIGURATION = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
                 "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
logger = logging.getLogger(__name__)
_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def _bytes(value, name: str) -> int:
    """``8388608``, ``8MiB``, ``8MB``, ``512KiB``... as bytes."""
    text = str(value).strip()
    units = {"": 1, "B": 1, "KB": 1000, "KIB": 1 << 10, "MB": 1000**2, "MIB": 1 << 20, "GB": 1000**3, "GIB": 1 << 30}
    number = text.rstrip("KkMmGgIiBb")
    try:
        size = int(float(number) * units[text[len(number):].upper()])
    except (KeyError, ValueError, OverflowError):
        size = -1
    if size < 0:
        raise UsageError(f"--storage-option {name}={value!r} is not a size (bytes, or 8MiB...)")
    return size


def _flag_or_bundle(name: str, value) -> bool | str:
    """``verify``/``use_ssl`` as botocore takes them: true/false words; ``verify`` also takes a CA bundle's path."""
    text = str(value).strip()
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    if name == "verify" and text and os.path.isfile(text):
        return text
    also = " or the path of a CA bundle file" if name == "verify" else ""
    raise UsageError(f"--storage-option {name}={value!r} is not true or false{also}")


def _code(exc) -> str:
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code") or getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode"))


class S3Root(StoreRoot):
    """A store under ``s3://BUCKET/PREFIX`` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str, options: dict[str, str] | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - set(CLIENT_OPTIONS) - set(OWN_OPTIONS))
        if unknown:
            raise UsageError(f"--storage-option {unknown[0]} is not an option of the S3 client; options: "
                             f"{', '.join((*CLIENT_OPTIONS, *OWN_OPTIONS))}")
        self.multipart_bytes = _bytes(self.options.pop("multipart_threshold", MULTIPART_BYTES), "multipart_threshold")
        self.part_bytes = max(5 << 20, _bytes(self.options.pop("multipart_chunksize", PART_BYTES),
                                              "multipart_chunksize"))
        try:
            self.attempts = int(self.options.get("max_attempts", MAX_ATTEMPTS))  # (also a body cut's)
        except ValueError:
            self.attempts = 0
        if self.attempts < 1:
            raise UsageError(f"--storage-option max_attempts={self.options['max_attempts']!r} is not a whole "
                             "number of at least 1")
        for flag in ("verify", "use_ssl"):
            if flag in self.options:
                self.options[flag] = _flag_or_bundle(flag, self.options[flag])
        endpoint = self.options.get("endpoint_url")
        if endpoint is not None:
            parts = urlsplit(str(endpoint))
            if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
                raise UsageError(f"--storage-option endpoint_url={endpoint!r} is not an http:// or https:// URL "
                                 "with a host (e.g. endpoint_url=http://host:9000)")
        self._client = None
        self._lock = threading.Lock()
        self._staging: Path | None = None
        self._fetched: dict[str, Path] = {}

    @classmethod
    def from_url(cls, url: str, options: dict[str, str], what: str = "the store") -> S3Root:
        rest = url.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"{what} {url}: name the bucket (s3://BUCKET/PREFIX)")
        try:
            rest.encode("utf-8")
        except UnicodeEncodeError:  # a byte that is not UTF-8 (a surrogate escape): S3 names are UTF-8
            shown = url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"{what} {shown}: an S3 bucket or key must be UTF-8 text; rename the prefix") from None
        return cls(bucket, prefix, options)

    # ---- the client and its errors -----------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        """One client per configuration in a process (making one costs a second: boto3 loads S3's API model), shared
        by every root of that configuration and thread (boto3 clients are thread-safe)."""
        key = (tuple(sorted(self.options.items())), tuple(os.environ.get(name) for name in CONFIGURATION))
        with _CLIENTS_LOCK:
            if key not in _CLIENTS:
                _CLIENTS[key] = self._new_client()
            return _CLIENTS[key]

    def _new_client(self):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UsageError(f"{self.url}: stores in S3 need boto3 (pip install 'vitok[s3]')") from None
        options = dict(self.options)
        session = boto3.session.Session(profile_name=options.pop("profile", None) or None)
        attempts = int(options.pop("max_attempts", MAX_ATTEMPTS))  # (verify, use_ssl: parsed in __init__)
        config = Config(retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=10, read_timeout=60,
                        max_pool_connections=32)
        try:
            return session.client("s3", config=config, **options)
        except Exception as exc:  # a profile that does not exist, a malformed endpoint
            raise StoreAccessError(f"{self.url}: cannot set up the S3 client ({type(exc).__name__}: {exc})") from None

    @contextlib.contextmanager
    def _errors(self, name: str = ""):
        """botocore's exceptions as the store's: missing -> FileNotFoundError; the rest one line each."""
        from botocore import exceptions as bx

        where = self.show(name) if name else self.url
        try:
            yield
        except bx.ClientError as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(where) from None
            if code == "NoSuchBucket":
                raise StoreAccessError(f"{self.url}: the bucket {self.bucket!r} does not exist (create it, or check "
                                       "the name and the endpoint)") from None
            if code in ACCESS:
                raise StoreAccessError(f"{where}: the credentials were refused ({code}); check AWS_ACCESS_KEY_ID/"
                                       "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or --storage-option, and the bucket's "
                                       "policy") from None
            if code in UNAVAILABLE:
                raise StoreUnavailableError(f"{where}: the endpoint kept answering {code} (throttled or unavailable) "
                                            "after its retries; rerun the same command to resume") from None
            message = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(f"{where}: {code} {message}".rstrip()) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as exc:
            raise StoreAccessError(f"{self.url}: no credentials for S3 ({exc}); set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --storage-option") from None
        except bx.ProfileNotFound as exc:
            raise StoreAccessError(f"{self.url}: {exc}") from None
        except bx.EndpointResolutionError as exc:  # AWS_ENDPOINT_URL (or a profile's endpoint) not an http(s) URL
            raise StoreAccessError(f"{self.url}: cannot set up the S3 client ({exc})") from None
        except (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError, bx.ConnectTimeoutError,
                bx.ProxyConnectionError, bx.ResponseStreamingError) as exc:
            raise StoreUnavailableError(f"{where}: the endpoint cannot be reached after its retries "
                                        f"({type(exc).__name__}); rerun the same command to resume") from None

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix and name else (self.prefix or name)

    def _prefix(self, folder: str) -> str:
        key = self.key(folder)
        return f"{key}/" if key else ""

    # ---- reading ---------------------------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        return self.read_with_version(name)[0]

    def read_with_version(self, name: str) -> tuple[bytes, str]:
        buffer = io.BytesIO()
        version = self._download(name, buffer)[0]
        return buffer.getvalue(), version

    def read_range(self, name: str, start: int, size: int) -> bytes:
        if size <= 0:
            return b""
        buffer = io.BytesIO()
        try:
            self._download(name, buffer, start, size)
        except StoreError as exc:
            if "InvalidRange" in str(exc):  # at or past the end
                return b""
            raise
        return buffer.getvalue()

    def _download(self, name: str, target, start: int = 0, size: int | None = None,
                  version: str | None = None) -> tuple[str, dict]:
        """GET ``name`` (``size`` bytes from ``start``; to its end when None) into ``target`` (``write``; ``seek`` and
        ``truncate`` to start again), and the object's ETag and first answer's headers. botocore retries a request
        that fails before its answer begins; a body cut midway (a connection closed or reset after part of it) is
        retried here, from the first byte still needed, pinned to the ETag first read (``If-Match``: never one
        object's head spliced to another's tail; an object rewritten meanwhile is read again from its start, unless
        ``version`` was asked for), with backoff, ``max_attempts`` times in all; then one line and exit 75."""
        from botocore import exceptions as bx
        from urllib3.exceptions import HTTPError

        cut = (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError, bx.ConnectionClosedError,
               HTTPError)
        got, tag, first, failures = 0, version, None, 0
        while True:
            request: dict[str, str] = {"IfMatch": tag} if tag else {}
            if start + got or size is not None:
                request["Range"] = f"bytes={start + got}-{'' if size is None else start + size - 1}"
            try:
                with self._errors(name):
                    response = self.client.get_object(Bucket=self.bucket, Key=self.key(name), **request)
            except StoreError as exc:
                if "PreconditionFailed" not in str(exc) or version is not None or failures >= self.attempts:
                    raise
                failures += 1  # rewritten since the first part was read: all of it again
                target.seek(0)
                target.truncate()
                got, tag, first = 0, None, None
                continue
            tag, first = tag or response["ETag"], first or response
            body = response["Body"]
            try:
                for chunk in body.iter_chunks(1 << 20):
                    target.write(chunk)
                    got += len(chunk)
                return tag, first
            except cut as exc:
                failures += 1
                if failures >= self.attempts:
                    raise StoreUnavailableError(
                        f"{self.show(name)}: the connection dropped while reading it, {failures} times "
                        f"({type(exc).__name__}); rerun the same command to resume") from None
                logger.debug("%s: read cut after %d bytes (%s); again from byte %d", self.show(name), got,
                             type(exc).__name__, start + got)
                _backoff(failures - 1)
            finally:
                body.close()

    def open(self, name: str) -> BinaryIO:
        """A file read by ranged GETs, in blocks; its first block is the first request (which also tells the
        object's size, so no HEAD is needed)."""
        block = READ_BLOCK
        buffer = io.BytesIO()
        try:
            _, response = self._download(name, buffer, 0, block)
        except StoreError as exc:
            if "InvalidRange" not in str(exc):  # (an empty object)
                raise
            return ReadAhead(lambda start, size: b"", 0, block)
        first = buffer.getvalue()
        size = int(str(response.get("ContentRange", "")).rpartition("/")[2] or len(first))
        handle = ReadAhead(lambda start, size: self.read_range(name, start, size), size, block)
        handle.prime(0, first)
        return handle

    def stat(self, name: str) -> Entry | None:
        try:
            with self._errors(name):
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except FileNotFoundError:
            return None
        return Entry(name, int(head["ContentLength"]), head["ETag"], head["LastModified"].timestamp())

    def _pages(self, method: str, **kwargs) -> Iterator[dict]:
        with self._errors():
            yield from self.client.get_paginator(method).paginate(Bucket=self.bucket, **kwargs)

    def list(self, folder: str = "") -> list[Entry]:
        prefix = self._prefix(folder)
        found = []
        for page in self._pages("list_objects_v2", Prefix=prefix, Delimiter="/"):
            for item in page.get("Contents", ()):
                name = item["Key"][len(prefix):]
                if name:
                    found.append(Entry(name, int(item["Size"]), item["ETag"], item["LastModified"].timestamp()))
            for common in page.get("CommonPrefixes", ()):
                found.append(Entry(common["Prefix"][len(prefix):].rstrip("/"), 0, "", 0.0, True))
        return sorted(found, key=lambda e: e.name)

    def walk(self, folder: str = "") -> list[Entry]:
        """One listing without a delimiter: every object under ``folder/``, 1,000 a page."""
        prefix = self._prefix(folder)
        found = [Entry(item["Key"][len(prefix):], int(item["Size"]), item["ETag"], item["LastModified"].timestamp())
                 for page in self._pages("list_objects_v2", Prefix=prefix) for item in page.get("Contents", ())]
        return sorted((e for e in found if e.name), key=lambda e: e.name)

    def is_folder(self, name: str) -> bool:
        with self._errors(name):
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._prefix(name), MaxKeys=1)
        return bool(page.get("KeyCount") or page.get("Contents"))

    def checksum(self, name: str) -> str:
        digest = _Digest()
        self._download(name, digest)
        return digest.hexdigest()

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """The object in one GET (resumed where a connection drops, ``_download``) into this process's staging space
        (``staging``), removed at exit: a whole shard is one request, not one per block."""
        path = self.staging(".copies") / f"{uuid.uuid4().hex[:8]}-{name.rsplit('/', 1)[-1]}"
        try:
            with open(path, "wb") as handle:
                self._download(name, handle)
            yield path
        finally:
            remove(path)

    def fetch(self, name: str) -> Path:
        """A local copy, cached under the store's cache folder and taken again when the object changed (its ETag);
        for the plan's files, which are content-addressed and read by every unit (checked once per root)."""
        if name in self._fetched:
            return self._fetched[name]
        self._fetched[name] = path = self._fetch(name)
        return path

    def _fetch(self, name: str) -> Path:
        entry = self.stat(name)
        if entry is None:
            raise FileNotFoundError(self.show(name))
        path = self.cache_folder("files") / name
        tag = path.with_name(path.name + ".etag")
        with contextlib.suppress(OSError):
            if tag.read_text() == entry.version and path.stat().st_size == entry.size:
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(partial, "wb") as handle:
                self._download(name, handle, version=entry.version)
            os.replace(partial, path)
        finally:
            remove(partial)
        tag.write_text(entry.version)
        return path

    # ---- writing ---------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The bucket exists, the credentials may write, and the server honours ``If-None-Match: *`` (a server that
        ignores it would let two writers both create one claim or sidecar: refused)."""
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)
        probe = f".vitok-probe/{uuid.uuid4().hex}"
        if self.create(probe, b"") is None:
            raise StoreError(f"{self.url}: could not create a new object (conditional write refused)")
        try:
            second = self._conditional_put(probe, b"", IfNoneMatch="*")
        finally:
            self.delete(probe)
        if second is not None:
            raise StoreError(f"{self.url}: the server ignores 'If-None-Match: *' (a second exclusive create of one "
                             "object succeeded); vitok needs S3's conditional writes (AWS S3, MinIO, R2, Ceph RGW "
                             "with them) to keep two writers off one shard")

    def write(self, name: str, data: bytes) -> None:
        with self._errors(name):
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data)

    def _conditional_put(self, name: str, data, **condition) -> str | None:
        """PutObject with a condition; the new ETag, or None on 412 (unless the object is this very write, whose
        first answer was lost and whose retry met it). A 409 (ConditionalRequestConflict: a conditional write of the
        same key was in progress) is settled by looking: an object now there that is not this write's means another
        writer won (as a 412 would have said), else the write is sent again, with backoff, ``CONFLICT_RETRIES``
        times; then one line and exit 75."""
        nonce = uuid.uuid4().hex
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                with self._errors(name):
                    return self._put_object(name, data, nonce, **condition)
            except StoreError as exc:
                if "PreconditionFailed" in str(exc):
                    return self._if_ours(name, nonce)
                if "ConditionalRequestConflict" not in str(exc):
                    raise
            except FileNotFoundError:  # If-Match on an object that is gone
                return None
            settled = self._after_conflict(name, nonce, condition)
            if settled is not None:
                return settled or None
            _backoff(attempt)
        raise self._conflicted(name)

    def _after_conflict(self, name: str, nonce: str, condition: dict[str, Any]) -> str | None:
        """After a 409: the outcome when the object already tells it (this write's ETag; "" when another writer's
        object is there, which a conditional write loses), None when the write must be sent again."""
        entry = self._head(name)
        if entry is not None and entry.get("Metadata", {}).get(WRITER) == nonce:
            return entry["ETag"]  # (it landed after all)
        if "IfNoneMatch" in condition:
            return "" if entry is not None else None
        if "IfMatch" in condition:
            return "" if entry is None or entry["ETag"] != condition["IfMatch"] else None
        return None

    def _conflicted(self, name: str) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.show(name)}: the endpoint kept answering 409 ConditionalRequestConflict "
                                     f"({CONFLICT_RETRIES + 1} tries: another write of this object is in progress); "
                                     "rerun the same command to resume")

    def _put_object(self, name: str, data, nonce: str, **condition) -> str:
        if hasattr(data, "seek"):
            data.seek(0)
        response = self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data,
                                          Metadata={WRITER: nonce}, **condition)
        return response["ETag"]

    def _head(self, name: str) -> dict | None:
        with self._errors(name):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.key(name))
            except Exception as exc:
                if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def _if_ours(self, name: str, nonce: str) -> str | None:
        head = self._head(name)
        return head["ETag"] if head is not None and head.get("Metadata", {}).get(WRITER) == nonce else None

    def create(self, name: str, data: bytes) -> str | None:
        return self._conditional_put(name, data, IfNoneMatch="*")

    def swap(self, name: str, data: bytes, version: str) -> str | None:
        return self._conditional_put(name, data, IfMatch=version)

    def put(self, name: str, path: Path, exclusive: bool = False) -> bool:
        path = Path(path)
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.is_file()):
                if not self._put_file(f"{name}/{file.name}", file, exclusive):
                    return False
            shutil.rmtree(path, ignore_errors=True)
            return True
        if not self._put_file(name, path, exclusive):
            return False
        if name.startswith(f"{PLAN_DIR}/"):  # read back by this run: kept as the fetched copy
            self._fetched[name] = self._remember(name, path)
        else:
            remove(path)
        return True

    def _remember(self, name: str, path: Path) -> Path:
        entry = self.stat(name)
        cached = self.cache_folder("files") / name
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, cached)
        if entry is not None:
            cached.with_name(cached.name + ".etag").write_text(entry.version)
        return cached

    def _put_file(self, name: str, path: Path, exclusive: bool) -> bool:
        size = path.stat().st_size
        condition = {"IfNoneMatch": "*"} if exclusive else {}
        if size <= self.multipart_bytes:
            with open(path, "rb") as handle:
                if exclusive:
                    return self._conditional_put(name, handle, **condition) is not None
                with self._errors(name):
                    self._put_object(name, handle, uuid.uuid4().hex)
                return True
        return self._multipart(name, path, size, condition)

    def _multipart(self, name: str, path: Path, size: int, condition: dict[str, Any]) -> bool:
        """Parts of ``multipart_chunksize`` (more for files of over 10,000 parts), ``PARTS_IN_FLIGHT`` uploaded at
        once (each in memory while it is sent); the object appears only when the upload completes, and an upload
        that fails is aborted. A completion answered 409 (ConditionalRequestConflict) is settled as a PutObject's
        (``_after_conflict``): another writer's object there loses the race, else the upload is aborted and begun
        again (AWS: "start a new multipart upload"), ``CONFLICT_RETRIES`` times; then one line and exit 75."""
        nonce = uuid.uuid4().hex
        for attempt in range(CONFLICT_RETRIES + 1):
            done = self._upload_parts(name, path, size, condition, nonce)
            if done is not None:
                return done
            settled = self._after_conflict(name, nonce, condition)
            if settled is not None:
                return bool(settled)
            _backoff(attempt)
        raise self._conflicted(name)

    def _upload_parts(self, name: str, path: Path, size: int, condition: dict[str, Any], nonce: str) -> bool | None:
        """One multipart upload: True when it completed, False when its conditional completion lost (412, and the
        object is not this upload's), None when the completion was answered 409 (the upload aborted)."""
        from concurrent.futures import ThreadPoolExecutor

        part_bytes = max(self.part_bytes, -(-size // 10_000))
        key = self.key(name)
        checksum = self._part_checksum()
        with self._errors(name):
            upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata={WRITER: nonce},
                                                         **checksum)
        upload_id = upload["UploadId"]

        def send(number: int) -> dict[str, Any]:
            with open(path, "rb") as handle:
                chunk = os.pread(handle.fileno(), part_bytes, (number - 1) * part_bytes)
            with self._errors(name):
                part = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                               Body=chunk, **checksum)
            sums = {f"Checksum{a.upper()}": part[f"Checksum{a.upper()}"] for a in checksum.values()
                    if f"Checksum{a.upper()}" in part}
            return {"ETag": part["ETag"], "PartNumber": number, **sums}

        try:
            with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="vitok-upload") as pool:
                parts = list(pool.map(send, range(1, -(-size // part_bytes) + 1)))
            try:
                with self._errors(name):
                    self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                          MultipartUpload={"Parts": parts}, **condition)
            except StoreError as exc:
                if "PreconditionFailed" in str(exc):
                    self._abort(key, upload_id)  # (a failed conditional completion leaves the upload open)
                    return self._if_ours(name, nonce) is not None
                if "ConditionalRequestConflict" in str(exc):
                    self._abort(key, upload_id)
                    return None
                raise
            return True
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _part_checksum(self) -> dict[str, str]:
        """The checksum each part declares, as boto3's own transfer manager does (CRC32 unless the client is configured
        ``request_checksum_calculation = when_required``): the service checks every part's bytes on arrival and
        keeps the parts' composite checksum with the object, instead of computing a whole-object one at completion."""
        from botocore.httpchecksum import DEFAULT_CHECKSUM_ALGORITHM

        if getattr(self.client.meta.config, "request_checksum_calculation", None) == "when_required":
            return {}
        return {"ChecksumAlgorithm": DEFAULT_CHECKSUM_ALGORITHM}

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def move(self, source: str, target: str) -> bool:
        """Each object of ``source`` (a file, or every object under ``source/``) copied on the server (a managed
        copy: multipart above 5 GB), then the originals deleted; what was at ``target`` is replaced."""
        pairs = [(self.key(source), self.key(target))] if self.stat(source) is not None else []
        prefix = self._prefix(source)
        for page in self._pages("list_objects_v2", Prefix=prefix):
            pairs += [(item["Key"], self._prefix(target) + item["Key"][len(prefix):])
                      for item in page.get("Contents", ())]
        if not pairs:
            return False
        if len(pairs) > 1 or pairs[0][0] != self.key(source):
            self.delete_tree(target)  # an older copy of a folder of this name
        for origin, final in pairs:
            with self._errors(source):
                self.client.copy({"Bucket": self.bucket, "Key": origin}, self.bucket, final)
        for origin, _ in pairs:
            with self._errors(source):
                self.client.delete_object(Bucket=self.bucket, Key=origin)
        return True

    def delete(self, name: str, version: str | None = None) -> bool:
        condition = {"IfMatch": version} if version else {}
        try:
            with self._errors(name):
                self.client.delete_object(Bucket=self.bucket, Key=self.key(name), **condition)
        except FileNotFoundError:
            return False
        except StoreError as exc:
            if "PreconditionFailed" in str(exc):
                return False
            raise
        return True

    def delete_tree(self, name: str) -> list[tuple[str, OSError]]:
        """The object ``name`` and every object under ``name/``, in batches of 1,000; the uploads begun there are
        aborted."""
        import errno

        failures: list[tuple[str, OSError]] = []
        prefix = self._prefix(name)
        keys = [self.key(name)]
        for page in self._pages("list_objects_v2", Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", ())]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._errors(name):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            for error in response.get("Errors", ()):
                if error.get("Code") != "NoSuchKey":
                    failures.append((f"s3://{self.bucket}/{error['Key']}",
                                     OSError(errno.EACCES, f"{error.get('Code')}: {error.get('Message', '')}")))
        for upload in self._uploads(prefix)[0]:
            self._abort(upload["Key"], upload["UploadId"])
        return failures

    def touch(self, name: str, data: bytes) -> float:
        self.write(name, data)
        entry = self.stat(name)
        return entry.modified if entry is not None else time.time()

    def clock(self) -> float:
        """The server's time (the Date of a HEAD on the bucket), as LastModified is; the host's clock if it says
        none."""
        with self._errors():
            response = self.client.head_bucket(Bucket=self.bucket)
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(date).timestamp() if date else time.time()
        return time.time()

    def staging(self, folder: str) -> Path:
        """This process's own local space (``$TMPDIR/vitok-staging/<store>/<pid>-<token>/``): two processes on one
        machine stage files of the same name (a plan's content-addressed files). Spaces of processes gone from this
        machine and untouched for ``STALE_AFTER`` are removed when a process first stages here."""
        if self._staging is None:
            store = Path(tempfile.gettempdir()) / "vitok-staging" / hashlib.blake2b(self.url.encode(),
                                                                                      digest_size=8).hexdigest()
            self._staging = store / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self._staging.mkdir(parents=True, exist_ok=True)
            atexit.register(shutil.rmtree, self._staging, True)  # (ignore_errors)
            _remove_dead_staging(store, self._staging)
        path = self._staging / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _uploads(self, prefix: str) -> tuple[list[dict], float]:
        """Multipart uploads begun under ``prefix`` and never completed or aborted, and the server's time now."""
        uploads, now = [], None
        for page in self._pages("list_multipart_uploads", Prefix=prefix):
            uploads += page.get("Uploads", ())
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            with contextlib.suppress(TypeError, ValueError):
                now = parsedate_to_datetime(date).timestamp() if date else now
        return uploads, now if now is not None else time.time()

    def leftovers(self, folder: str, untouched_for: float = 0.0) -> list[Leftover]:
        """Uploads begun under ``folder`` and never completed (a killed run's; the parts are billed until aborted).
        Killed runs' local staging files are removed by ``staging``."""
        found = []
        prefix = self._prefix(folder)
        uploads, now = self._uploads(prefix)
        for upload in uploads:
            if now - upload["Initiated"].timestamp() >= untouched_for:
                becomes = upload["Key"][len(prefix):]
                found.append(Leftover(f"{becomes} (an upload never completed)", becomes, 0,
                                      f"upload:{upload['UploadId']}"))
        return found

    def remove_leftover(self, folder: str, leftover: Leftover) -> None:
        self._abort(self.key(f"{folder}/{leftover.becomes}"), leftover.handle[len("upload:"):])


def _backoff(attempt: int) -> None:
    """Exponential backoff with jitter (0.05 s doubled per attempt, at most 2 s)."""
    time.sleep(min(2.0, 0.05 * 2 ** (attempt + 1)) * (0.5 + random.random() / 2))


class _Digest:
    """blake2b-128 of what is written to it; ``truncate`` starts it again (``_download`` reading an object anew)."""

    def __init__(self) -> None:
        self._digest = hashlib.blake2b(digest_size=16)

    def write(self, data: bytes) -> None:
        self._digest.update(data)

    def seek(self, _offset: int) -> None:
        pass

    def truncate(self) -> None:
        self._digest = hashlib.blake2b(digest_size=16)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _remove_dead_staging(store: Path, mine: Path) -> None:
    """Staging spaces of this store left by processes that are gone (``<pid>-<token>``, the pid not running here) and
    untouched for ``STALE_AFTER`` (a pid of another PID namespace sharing this folder looks dead: the wait protects
    it)."""
    from .claims import STALE_AFTER, process_alive

    with contextlib.suppress(OSError):
        for path in store.iterdir():
            pid = path.name.split("-", 1)[0]
            if path == mine or not pid.isdigit() or process_alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
                if time.time() - newest > STALE_AFTER:
                    shutil.rmtree(path, ignore_errors=True)

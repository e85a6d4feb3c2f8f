"""Sources -> a listing of inputs: loose image files (with their keys), or archives (webdataset tars, parquet).

What a source may be:

- a folder: walked recursively for images (``--input-format files``), videos (``video``), tars (``wds``) or parquet
  files (``parquet``); with ``auto`` (the default) a folder holding images is a folder of images, else one of
  videos, else of tars, else of parquet;
- a file: an image, a video, a ``.tar``/``.tar.gz``/``.tgz`` (webdataset), or a ``.parquet``;
- a brace pattern, quoted so the shell leaves it: ``'/data/{00000..01023}.tar'`` (zero padding kept, as webdataset);
- a URL (``s3://``, ``gs://``, ``https://``...) of a tar or parquet file, read through fsspec (``vitok[remote]``);
- ``-``: one input per line on stdin; ``--files-from LIST`` reads them from a file (or ``-``). List lines are paths
  taken literally (a file may be named ``shot{1,2}.jpg``): never brace-expanded; CRLF line ends and a UTF-8 byte order
  mark are removed.

Keys of loose files are their paths relative to the folder given (prefixed with the folder's name when several
folders are given), or the path as given for files and list lines. Every path is kept absolute, so a store can be
resumed from any working directory. File names are bytes on POSIX: names that are not UTF-8 are kept as Python's
surrogate escapes (``os.fsdecode``), written to the plan and the shards as their original bytes, never refused.

Videos are found by extension (``VIDEO_EXTENSIONS``) and by content: a file whose name says nothing (no image,
video or archive extension) is a video when its first bytes are a video container's (``sniff_video``: MP4/MOV,
Matroska/WebM, AVI, MPEG-TS/PS). Content is read for such files named on the command line or in a list, and in a
folder of videos (``--input-format video``, or ``auto`` finding video extensions and no images: a folder's kind is
decided by extensions alone). One store holds images or videos, never both (a listing's ``media``); videos beside
the images of a folder are left out and reported.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import operator
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

from ..errors import UsageError
from ..storage.layout import is_store

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico .jp2 .j2k .avif"
    .split()
)
VIDEO_EXTENSIONS = frozenset(".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .m2ts .mts .3gp .ogv .flv .wmv".split())
ARCHIVE_SUFFIXES = {"wds": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
INPUT_FORMATS = ("auto", "files", "video", "wds", "parquet")


def is_tar(path: str) -> bool:
    """A webdataset tar by its name (``.tar``, ``.tar.gz``, ``.tgz``)."""
    return path.lower().endswith(ARCHIVE_SUFFIXES["wds"])


def is_url(text: str) -> bool:
    """``scheme://...`` (s3, gs, https, memory, file...): read through fsspec."""
    head = text.split("/", 1)[0]
    return head.endswith(":") and text[len(head):].startswith("//")


def url_path(url: str) -> str:
    """What a URL's name is judged by: an http(s) URL's path, without its query (a signed URL's ``?X-Amz-...``) or
    fragment; any other URL whole (``#`` and ``?`` may be part of an object's key)."""
    if url.lower().startswith(("http://", "https://")):
        return urlsplit(url).path
    return url


class NotRegularFileError(OSError):
    """A path that is not a regular file (a FIFO, a device, a socket, a folder): never opened, it could block or
    have side effects. Not an unavailable input: a rerun does not retry it."""


def _what(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_regular(path: str) -> None:
    """NotRegularFileError unless ``path`` is a regular file (symlinks followed); OSError when it cannot be seen."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"not a regular file ({_what(mode)}); not read")


def open_regular(path: str) -> BinaryIO:
    """A local file opened for reading, only if it is a regular file (symlinks followed); NotRegularFileError for
    anything else, checked before opening and again on the open handle (it cannot be swapped in between)."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO swapped in: no block
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFileError(f"not a regular file ({_what(mode)}); not read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def kind_of(path: str) -> str | None:
    """files | video | wds | parquet by the name's extension (any case); None for anything else."""
    lower = path.lower()
    for kind, suffixes in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffixes):
            return kind
    extension = os.path.splitext(lower)[1]
    return "files" if extension in IMAGE_EXTENSIONS else "video" if extension in VIDEO_EXTENSIONS else None


def sniff_video(head: bytes) -> bool:
    """The first bytes of a file are a video container's: ISO media (MP4, MOV, M4V, 3GP: a box type at 4), Matroska
    or WebM (the EBML magic), AVI (a RIFF ``AVI `` form), MPEG transport (sync bytes 188 apart) or program stream."""
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return True
    if head.startswith(b"\x1a\x45\xdf\xa3") or head.startswith(b"\x00\x00\x01\xba"):
        return True
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return True
    return len(head) > 376 and head[0] == head[188] == head[376] == 0x47


def is_video_file(path: str) -> bool:
    """``path`` holds a video container by its content (False when it cannot be read: the walk never fails)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as handle:
            return sniff_video(handle.read(512))
    except OSError:
        return False


def archive_stem(path: str) -> str:
    """``/data/00042.tar`` -> ``00042`` (every archive suffix removed)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    lower = name.lower()
    for suffixes in ARCHIVE_SUFFIXES.values():
        for suffix in suffixes:
            if lower.endswith(suffix):
                return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Root:
    """Where a group of keys lives: key = prefix + rel, path = dir/rel (or rel itself when dir is empty)."""

    dir: str
    prefix: str = ""

    def path(self, key: str) -> str:
        rel = key[len(self.prefix):]
        return f"{self.dir}/{rel}" if self.dir else rel


@dataclass
class FileListing:
    """Loose image or video files: per root, its keys sorted. ``items()`` merges them in key order."""

    roots: list[Root]
    keys: list[list[str]]
    ignored: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # folders that could not be listed: (path, why)
    beside: list[str] = field(default_factory=list)  # archives (and videos) found among the loose images (not read)
    media: str = "image"  # image | video: what the files hold (one store holds one)

    def items(self) -> Iterator[tuple[str, int]]:
        """(key, root index) in key order, each key once; two different files with one key are an error."""
        if len(self.keys) == 1:  # one root: sorted and without duplicates already (see _finish)
            yield from zip(self.keys[0], itertools.repeat(0))
            return
        merged = heapq.merge(*(zip(keys, itertools.repeat(r)) for r, keys in enumerate(self.keys)))
        previous: tuple[str, int] | None = None
        for key, root in merged:
            if previous is not None and previous[0] == key:
                first, second = self.roots[previous[1]].path(key), self.roots[root].path(key)
                if first != second and os.path.realpath(first) != os.path.realpath(second):
                    raise UsageError(f"two inputs have the same key {key!r}: {first} and {second}; rename one or "
                                     "give them in separate runs")
                continue
            previous = (key, root)
            yield key, root

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys)


@dataclass
class ArchiveListing:
    """Archives of one kind (``wds`` or ``parquet``), sorted by path."""

    kind: str
    paths: list[str]
    ignored: int = 0
    missing_ok: set[str] = field(default_factory=set)  # listed but absent (recorded when read)
    errors: list[tuple[str, str]] = field(default_factory=list)  # folders that could not be listed: (path, why)
    beside: list[str] = field(default_factory=list)
    media: str = "image"  # image | video: what the samples hold (video2dataset's tars with --input-format video)


Listing = FileListing | ArchiveListing


def listing_kind(listing: Listing | None) -> str:
    """``files`` for loose files (and for no listing), else the archives' kind (``wds``, ``parquet``)."""
    return listing.kind if isinstance(listing, ArchiveListing) else "files"


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (Windows editors write one): not part of the first path


def read_lines(stream: BinaryIO, block_size: int = 1 << 24) -> list[str]:
    """Non-empty, non-comment lines of a list of paths, decoded as file names (surrogate escapes for non-UTF-8).

    Each line is taken literally: split on ``\\n``, one trailing ``\\r`` removed (CRLF lists), a UTF-8 byte order mark
    at the start of the list removed; nothing else is stripped or expanded. Decoded and split a block at a time:
    ten million lines take seconds, not minutes."""
    lines: list[str] = []
    tail = b""
    first = True
    while block := stream.read(block_size):  # blocks cut after a newline: never the whole text and its lines at once
        block = tail + block
        cut = block.rfind(b"\n") + 1
        if not cut:
            tail = block
            continue
        tail, block = block[cut:], block[:cut]
        if first:
            block, first = block.removeprefix(BOM), False
        lines += block.replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape").split("\n")
        lines.pop()  # the empty text after the block's last newline
    if tail:
        if first:
            tail = tail.removeprefix(BOM)
        lines.append((tail[:-1] if tail.endswith(b"\r") else tail).decode("utf-8", "surrogateescape"))
    if any(not line or line[0] == "#" or line.isspace() for line in lines):  # filter only when needed: no copy
        lines = [line for line in lines if line and line[0] != "#" and not line.isspace()]
    return lines


def _has_urls(lines: list[str]) -> bool:
    return any("://" in line for line in lines)


def _needs_normalising(lines: list[str]) -> bool:
    return any(line.startswith("./") or "//" in line or "/." in line for line in lines)


def _normal(entry: str) -> str:
    """A list entry as a key: ``./a//b.jpg`` -> ``a/b.jpg``; the common clean case costs no call."""
    if entry.startswith("./") or "//" in entry or "/./" in entry or "/../" in entry or entry.endswith("/."):
        return os.path.normpath(entry)
    return entry


def expand(source: str) -> list[str]:
    """Brace patterns -> their paths, as webdataset expands them (braceexpand; zero padding kept)."""
    if "{" not in source:
        return [source]
    import braceexpand

    return list(braceexpand.braceexpand(source))


def remote_folder(url: str, kind: str) -> list[str]:
    """Archives of one kind under a URL folder, listed through fsspec."""
    from .readers.remote import fsspec_module

    fs, path = fsspec_module().core.url_to_fs(url)
    protocol = url.split("://", 1)[0]
    return sorted(p if is_url(p) else f"{protocol}://{p.lstrip('/')}" if protocol != "file" else f"file://{p}"
                  for p in fs.find(path) if kind_of(p) == kind)  # (http's file system lists whole URLs)


_PROTOCOLS_CHECKED: set[str] = set()


def check_protocol(url: str) -> None:
    """UsageError naming the package to install when fsspec cannot read ``url``'s protocol here (once per
    protocol)."""
    protocol = url.split("://", 1)[0]
    if protocol in _PROTOCOLS_CHECKED:
        return
    from .readers.remote import fsspec_module

    try:
        fsspec_module().core.url_to_fs(url)
    except ImportError as exc:
        raise UsageError(f"{url}: {exc}") from None
    _PROTOCOLS_CHECKED.add(protocol)


def remote_is_folder(url: str) -> bool:
    """The URL names a folder on its file system (False when that cannot be told: then it is taken as a file). An
    http(s) URL is a file: HTTP has no folders (fsspec would fetch the body to look for links in it)."""
    if url.lower().startswith(("http://", "https://")):
        return False
    from .readers.remote import fsspec_module

    try:
        fs, path = fsspec_module().core.url_to_fs(url)
        return bool(fs.isdir(path))
    except ImportError as exc:
        raise UsageError(f"{url}: {exc}") from None
    except Exception:
        return False


def is_readable(path: str) -> bool:
    """The input can be opened now (a URL: it exists on its file system)."""
    if is_url(path):
        from .readers.remote import fsspec_module

        try:
            fs, inner = fsspec_module().core.url_to_fs(path)
            return bool(fs.exists(inner))
        except Exception:  # the network or the file system's package: not readable now
            return False
    return os.access(path, os.R_OK)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Stores:
    """Folders a walk never enters: the run's output folder and any vitok store (a folder holding ``vitok.json`` and
    ``shards/`` or ``plan/``), so that a store written inside its own input folder is never read back as input.
    Remembers what it left out."""

    def __init__(self, out: Sequence[str] = ()) -> None:
        self.out: set[tuple[int, int]] = set()
        for path in out:
            try:
                st = os.stat(path)
            except OSError:  # not made yet: nothing of it to leave out
                continue
            self.out.add((st.st_dev, st.st_ino))
        self.left_out: list[str] = []

    def skip(self, dirpath: str, st: os.stat_result, dirnames: Sequence[str], filenames: Sequence[str]) -> bool:
        if is_store(filenames, dirnames) or (st.st_dev, st.st_ino) in self.out:
            if dirpath not in self.left_out:
                self.left_out.append(dirpath)
            return True
        return False


def _walk(root: str, wanted, errors: list[tuple[str, str]] | None = None,
          beside: list[str] | None = None, stores: Stores | None = None) -> tuple[list[str], int]:
    """Relative paths of the wanted files under root (``wanted(name, folder)``), following symlinks but never a folder
    twice (loop safe) nor a vitok store (``stores``). Folders that cannot be listed go to ``errors`` as (path, why);
    archives and videos among unwanted files to ``beside``."""
    found: list[str] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    errors = errors if errors is not None else []
    stores = stores if stores is not None else Stores()

    def failed(exc: OSError) -> None:
        errors.append((os.fsdecode(exc.filename) if exc.filename is not None else root, _reason(exc)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            failed(exc)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or stores.skip(dirpath, st, dirnames, filenames):
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        base = dirpath[len(root):].lstrip("/")
        for name in filenames:
            if wanted(name, dirpath):
                found.append(f"{base}/{name}" if base else name)
            else:
                ignored += 1
                if beside is not None and kind_of(name) in (*ARCHIVE_SUFFIXES, "video"):
                    beside.append(f"{dirpath}/{name}")
    return found, ignored


def _folder_kind(folder: str, requested: str, stores: Stores) -> str:
    if requested not in ("auto", "video"):
        return requested
    counts = dict.fromkeys(("files", "video", "wds", "parquet"), 0)
    for dirpath, dirs, names in os.walk(folder, followlinks=True):
        try:
            if stores.skip(dirpath, os.stat(dirpath), dirs, names):
                dirs[:] = []
                continue
        except OSError:
            pass
        for name in names:
            kind = kind_of(name)
            if kind:
                counts[kind] += 1
        if counts["files"] and requested == "auto":
            return "files"
    if requested == "video":  # a folder of videos, or of webdataset tars of videos
        return "wds" if counts["wds"] and not counts["video"] else "video"
    return next((kind for kind in ("video", "wds", "parquet") if counts[kind]), "files")


class _Collector:
    """Accumulates inputs of one kind; a second kind is a usage error (one store holds one kind of input). Loose
    images are kind ``files``, loose videos ``video``."""

    def __init__(self, input_format: str, cwd: str, stores: Stores) -> None:
        self.format, self.cwd, self.stores = input_format, cwd, stores
        # ``video``: loose videos, or webdataset tars of videos (video2dataset's): their kind is found
        self.kind: str | None = None if input_format in ("auto", "video") else input_format
        self.roots: dict[Root, list[str]] = {}
        self.archives: list[str] = []
        self.ignored = 0
        self.errors: list[tuple[str, str]] = []
        self.beside: list[str] = []

    def _set_kind(self, kind: str, what: str) -> None:
        if self.kind is None:
            self.kind = kind
        elif kind != self.kind:
            raise UsageError(f"{what} is a {kind} input, but this run reads {self.kind} inputs; one store holds one "
                             "kind of input (use another -o for the other kind)")

    def entries(self, lines: list[str]) -> None:
        """Many list lines: loose image files are taken in bulk (ten million lines in seconds), the rest one by one."""
        if self.format in ("auto", "files") and self.kind in (None, "files") and lines:
            extensions = {line[line.rfind("."):].lower() for line in lines}
            if extensions <= IMAGE_EXTENSIONS and not _has_urls(lines):
                self._set_kind("files", lines[0])
                mixed = any(line[0] == "/" for line in lines) and any(line[0] != "/" for line in lines)
                groups = ([(Root(self.cwd), [line for line in lines if line[0] != "/"]),
                           (Root(""), [line for line in lines if line[0] == "/"])] if mixed
                          else [(Root("" if lines[0][0] == "/" else self.cwd), lines)])
                for root, group in groups:
                    if _needs_normalising(group):
                        group = [_normal(line) for line in group]
                    if root in self.roots:
                        self.roots[root].extend(group)
                    else:
                        self.roots[root] = group  # ten million lines: no copy
                return
        for line in lines:  # literal: a list names paths, never patterns (a file may be named 'shot{1,2}.jpg')
            self.entry(line, explicit=False)

    def entry(self, entry: str, explicit: bool) -> None:
        """One path from the command line (explicit) or from a list."""
        if is_url(entry):
            check_protocol(entry)  # the file system's package is here (s3fs, gcsfs, aiohttp): else a usage error now
            kind = kind_of(url_path(entry))
            if kind is None and self.format in ("wds", "parquet"):  # a remote folder of archives
                self._set_kind(self.format, entry)
                self.archives += remote_folder(entry, self.format)
                return
            if kind is None and self.format == "video":  # a video named without an extension, or a folder of them
                folder = entry.endswith("/") or remote_is_folder(entry)
                videos = remote_folder(entry, "video") if folder else [entry]
                tars = remote_folder(entry, "wds") if folder and not videos else []
                if tars:  # a folder of webdataset tars of videos (as for a local folder)
                    self._set_kind("wds", entry)
                    self.archives += tars
                for video in videos:
                    self._remote_video(video)
                return
            if kind == "video" and self.format in ("auto", "video"):
                self._remote_video(entry)
                return
            if kind not in ("wds", "parquet") or (self.format == "video" and kind != "wds"):
                raise UsageError(f"{entry}: remote inputs must be .tar or .parquet files (or a folder of them with "
                                 "--input-format wds|parquet), or videos (a folder of them with --input-format "
                                 "video); a remote image is read from a tar or parquet file")
            self._set_kind(kind, entry)
            self.archives.append(entry)
            return
        path = entry if os.path.isabs(entry) else os.path.join(self.cwd, entry)
        if explicit and os.path.isdir(path):
            self.folder(entry, path)
            return
        kind = kind_of(entry)
        if kind is None and self.format in ("auto", "video") and is_video_file(path):
            kind = "video"  # by its content: a name that says nothing
        if kind is None and self.format in ("auto", "files", "video"):
            kind = "files" if self.format == "auto" else self.format
        video_tar = self.format == "video" and kind == "wds"  # a webdataset tar of videos
        if kind is None or (self.format != "auto" and kind != self.format and not video_tar):
            raise UsageError(f"{entry} is not a {self.format} input (by its extension)")
        if explicit and not os.path.exists(path):
            raise UsageError(f"source {entry!r} does not exist")
        self._set_kind(kind, entry)
        if kind in ("files", "video"):
            root = Root("" if os.path.isabs(entry) else self.cwd)
            self.roots.setdefault(root, []).append(_normal(entry))
        else:
            self.archives.append(os.path.normpath(path))

    def _remote_video(self, url: str) -> None:
        """A video file at a URL: a loose input keyed by the URL as given, fetched by its decode worker."""
        self._set_kind("video", url)
        self.roots.setdefault(Root(""), []).append(url)

    def folder(self, given: str, path: str, prefix: str = "") -> None:
        kind = _folder_kind(path, self.format, self.stores)
        self._set_kind(kind, given)
        path = os.path.normpath(path)
        if kind in ("files", "video"):
            rels, ignored = _walk(path, _wanted_images if kind == "files" else _wanted_videos, self.errors,
                                  self.beside, self.stores)
            self.roots.setdefault(Root(path, prefix), []).extend(prefix + rel for rel in rels)
        else:
            rels, ignored = _walk(path, lambda name, _: kind_of(name) == kind, self.errors, stores=self.stores)
            self.archives += [f"{path}/{rel}" for rel in rels]
        self.ignored += ignored


def _wanted_images(name: str, _folder: str) -> bool:
    return os.path.splitext(name.lower())[1] in IMAGE_EXTENSIONS


def _wanted_videos(name: str, folder: str) -> bool:
    kind = kind_of(name)
    return kind == "video" or (kind is None and is_video_file(f"{folder}/{name}"))


def list_inputs(
    sources: Sequence[str],
    files_from: str | None = None,
    stdin: BinaryIO | None = None,
    input_format: str = "auto",
    cwd: str | None = None,
    out: str | os.PathLike | None = None,
) -> Listing:
    """Expand sources into a listing; ``-`` (as a source or ``files_from``) reads one input per line from stdin.

    Folders are walked without entering ``out`` (the store being written) or any other vitok store."""
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"--input-format {input_format!r} is not one of: {', '.join(INPUT_FORMATS)}")
    cwd = cwd or os.getcwd()
    stores = Stores([os.path.join(cwd, out)] if out is not None else [])
    collect = _Collector(input_format, cwd, stores)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    folders = [s for s in sources if s != "-" and not is_url(s) and "{" not in s
               and os.path.isdir(s if os.path.isabs(s) else os.path.join(cwd, s))]
    for source in sources:
        if source == "-":
            collect.entries(read_lines(stdin))
        elif source in folders:
            path = source if os.path.isabs(source) else os.path.join(cwd, source)
            prefix = os.path.basename(os.path.normpath(os.path.abspath(path))) + "/" if len(folders) > 1 else ""
            collect.folder(source, path, prefix)
        else:
            expanded = expand(source)
            for entry in expanded:
                collect.entry(entry, explicit=len(expanded) == 1)
    if files_from is not None:
        if files_from == "-":
            lines = read_lines(stdin)
        else:
            try:
                with open(files_from if os.path.isabs(files_from) else os.path.join(cwd, files_from), "rb") as f:
                    lines = read_lines(f)
            except OSError as exc:
                raise UsageError(f"--files-from {files_from}: {exc.strerror}") from None
        collect.entries(lines)
    return _finish(collect, sources, files_from)


def tar_medium(paths: list[str]) -> str:
    """``image`` or ``video``: what webdataset tars hold, decided from their first members (extension, else content:
    ``readers.webdataset.tar_media``); image when no sample looked at holds either (as before media were told apart).
    Tars whose samples hold images and videos are refused: one store holds one kind."""
    from .readers.webdataset import tar_media

    found = tar_media(paths)
    if found.medium == "mixed":
        raise UsageError(f"these tars hold image and video samples ({found.image}, {found.video}); one store holds "
                         "one kind: pass --input-format wds for the images or --input-format video for the videos "
                         "(the other kind's samples are recorded as skipped) and extract the other into another -o")
    if found.medium == "video":
        logger.info("webdataset tars of videos (%s): extracted as videos", found.video)
    return found.medium or "image"


def _finish(collect: _Collector, sources: Sequence[str], files_from: str | None) -> Listing:
    what = ", ".join(sources) or files_from or "(no sources)"
    left_out = collect.stores.left_out
    if left_out:
        logger.info("left out %d folder(s) holding a vitok store, never read as input: %s%s", len(left_out),
                    left_out[0], ", ..." if len(left_out) > 1 else "")
    extra = f" ({collect.ignored} other file(s) ignored)" if collect.ignored else ""
    extra += f" (left out the vitok store {left_out[0]})" if left_out else ""
    if collect.kind in ("wds", "parquet"):
        paths = sorted(dict.fromkeys(collect.archives))
        if not paths:
            raise UsageError(f"no {collect.kind} archives found in {what}{extra}")
        stems: dict[str, str] = {}
        for path in paths:
            stem = archive_stem(path)
            if stem in stems:
                raise UsageError(f"two archives are both named {stem} ({stems[stem]} and {path}); their keys would "
                                 "clash: give them in separate runs")
            stems[stem] = path
        missing = {p for p in paths if not is_url(p) and not os.path.exists(p)}
        media = "video" if collect.format == "video" else "image"
        if collect.kind == "wds" and collect.format == "auto":
            media = tar_medium(paths)
        return ArchiveListing(collect.kind, paths, collect.ignored, missing, collect.errors, media=media)
    roots = list(collect.roots)
    keys = []
    for root in roots:
        group = collect.roots.pop(root)
        group.sort()
        if any(map(operator.eq, group, itertools.islice(group, 1, None))):  # a path listed twice: keep it once
            group = list(dict.fromkeys(group))
        keys.append(group)
    if not any(keys):
        unlisted = f"; {len(collect.errors)} folder(s) could not be listed ({collect.errors[0][0]}: " \
            f"{collect.errors[0][1]})" if collect.errors else ""
        beside = f"; it holds archives or videos ({collect.beside[0]}...): pass --input-format video, wds or " \
            "parquet" if collect.beside else ""
        found = "videos" if "video" in (collect.kind, collect.format) else "images"
        raise UsageError(f"no {found} found in {what}{extra}{unlisted}{beside}")
    return FileListing(roots, keys, collect.ignored, collect.errors, collect.beside,
                       "video" if collect.kind == "video" else "image")

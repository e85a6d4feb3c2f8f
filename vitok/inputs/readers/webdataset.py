"""Webdataset tars (what img2dataset writes): members grouped into samples webdataset's way, read sequentially.

Grouping follows webdataset's ``tariterators``: a member ``dir/name.ext1.ext2`` has the key ``dir/name`` (the path up
to the first dot of the basename) and the extension ``ext1.ext2``; consecutive members with one key form a sample;
``__*__`` members and folders are skipped; links and special files are not read (as webdataset), and a sample whose
image is one is recorded as skipped, saying so. The sample's image is its first member whose extension ends in an
image type (any case; the record's ``member`` is its real name); ``txt`` becomes the caption and ``json`` the
metadata kept in the record (or only the fields named with ``--meta-fields``). A vitok key is ``<tar stem>/<key>``.

Videos (video2dataset's tars, ``ReaderOptions.media`` ``video``): the sample's video is its first member with a video
extension, or whose name says nothing and whose first bytes are a video container's (``member_medium``); a sample of
the other medium is recorded as skipped naming the flag that reads it. A video member larger than ``SPOOL_BYTES`` is
copied to the temporary space a block at a time (``Sample.local``, removed by whoever takes the sample), never held
in memory; in a store of images it is never read. ``tar_media`` tells from a tar's first members which medium it
holds, for ``--input-format auto``.

Damage costs only what is damaged: a truncated tar gives every sample completed before the cut and raises
:class:`UnitReadError` naming where it stopped; a sample without an image is recorded as skipped; a key seen twice in
one tar is recorded under ``<key>#2`` (skipped, with the reason), never dropped or overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from ..sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, NotRegularFileError, sniff_video
from ..temporary import temporary_copy
from . import InputReader, KeyRule, Sample, UnitReadError
from .remote import open_binary

KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
META_MEMBER = re.compile(r"__[^/]*__($|/)")
IMAGE_TYPES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
VIDEO_TYPES = frozenset(ext.lstrip(".") for ext in VIDEO_EXTENSIONS)
# members that are never a sample's image or video, whatever their bytes (audio in an MP4 box is ``ftyp`` too)
NOT_MEDIA_TYPES = frozenset("txt json cls cls2 caption text npy npz pth pickle pyd mp3 m4a aac wav flac ogg oga opus "
                            "wma parquet".split())
SNIFF_BYTES = 512  # the head of a member whose name says nothing, read to tell a video container by its content


@dataclass
class Member:
    """One tar member of a sample: its real name, its bytes (None: not a regular file, not read, or copied to
    ``local``) and what it is."""

    name: str
    data: bytes | None
    not_regular: str | None = None
    local: str | None = None  # a large video member: the temporary file holding it (``spool``)
    first_bytes: bytes | None = None  # of a member in ``local``: its head, to tell what it is

    @property
    def head(self) -> bytes | None:
        return self.data[:SNIFF_BYTES] if self.data is not None else self.first_bytes

    @property
    def readable(self) -> bool:
        return self.data is not None or self.local is not None

    def discard(self) -> None:
        if self.local is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.local)
            self.local = None


SPOOL_BYTES = 64 << 20  # a video member larger than this is copied to the temporary space, not held in memory


class SpoolError(Exception):
    """The temporary space cannot take a member's copy (no space left)."""


def spool(handle, name: str, folder: str | None = None) -> Member:
    """A tar member's bytes copied a block at a time to a file in the temporary space (``folder``, else
    ``TMPDIR``). SpoolError when that space cannot take it; what reading the tar raises goes through. A partial copy
    is removed either way."""
    first = handle.read(SNIFF_BYTES)
    out = temporary_copy("member", folder)
    try:
        with out:
            block = first
            while block:
                try:
                    out.write(block)
                except OSError as exc:
                    raise SpoolError(exc.strerror or str(exc)) from None
                block = handle.read(1 << 20)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out.name)
        raise
    return Member(name, None, local=out.name, first_bytes=first)


def _not_regular(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link to {info.linkname}"
    if info.islnk():
        return f"a hard link to {info.linkname}"
    return "a FIFO" if info.isfifo() else "a device" if info.isdev() else "not a regular file"


def split_member(name: str) -> tuple[str | None, str | None]:
    match = KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def is_image_extension(extension: str) -> bool:
    return extension.lower().rsplit(".", 1)[-1] in IMAGE_TYPES


def is_video_extension(extension: str) -> bool:
    return extension.lower().rsplit(".", 1)[-1] in VIDEO_TYPES


def is_sniffable(extension: str) -> bool:
    """A member whose extension is neither an image's, a video's nor a known other kind (text, json, audio): its
    content decides whether it is a video."""
    last = extension.lower().rsplit(".", 1)[-1]
    return last not in IMAGE_TYPES and last not in VIDEO_TYPES and last not in NOT_MEDIA_TYPES


def member_medium(extension: str, head: bytes | None) -> str | None:
    """``image`` or ``video`` for a sample's member, by its extension, else by its first bytes (``sniff_video``;
    ``head`` None: not read); None when it is neither."""
    if is_image_extension(extension):
        return "image"
    if is_video_extension(extension):
        return "video"
    return "video" if head is not None and is_sniffable(extension) and sniff_video(head) else None


def _status(members: dict[str, Member]) -> str | None:
    """A sample's json ``status`` when it is not ``success`` (with its ``error_message``), else None."""
    info = members.get("json")
    try:
        data = json.loads(info.data) if info is not None and info.data is not None else None
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("status") in (None, "success"):
        return None
    message = str(data.get("error_message") or "").strip().splitlines()
    return f"{data['status']}" + (f" ({message[0]})" if message else "")


class WebDatasetReader(InputReader):
    """Samples of images, or of videos (``ReaderOptions.media``: video2dataset's tars, ``KEY.mp4`` + ``KEY.json``
    + ``KEY.txt``; a sample it could not fetch holds no video and a json ``status`` other than ``success``, and is
    recorded as skipped with that status and its ``error_message``)."""

    kind = "wds"

    def _wanted(self, extension: str, member: Member | None = None) -> bool:
        return member_medium(extension, member.head if member is not None else None) == self.options.media

    def _read(self, tar: tarfile.TarFile, info: tarfile.TarInfo, extension: str) -> Member:
        """A member's bytes; a large one that may be a video (by its extension, or a name that says nothing) is
        copied to the temporary space when videos are read (memory holds a block of it, never the video)."""
        handle = tar.extractfile(info)
        large = info.size > SPOOL_BYTES and (is_video_extension(extension) or is_sniffable(extension))
        if large and self.options.media == "image" and is_video_extension(extension):
            return Member(info.name, None)  # a video in a store of images: never decoded, so never read
        if not (large and self.options.media == "video"):
            return Member(info.name, handle.read())
        try:
            return spool(handle, info.name)
        except SpoolError as exc:  # no space left: the tar is read again by a later run
            raise UnitReadError(f"cannot copy member {info.name} ({info.size} bytes) to the temporary space: {exc} "
                                "(set TMPDIR to a larger one)", failed=True) from None

    def samples(self, unit, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        archive = unit.archive()
        path, stem = archive.path, archive.stem
        try:
            stream = open_binary(path)
        except NotRegularFileError as exc:
            raise UnitReadError(f"{path}: {exc}") from None
        except OSError as exc:
            raise UnitReadError(f"cannot open {path}: {exc.strerror or exc}", failed=True) from None
        seen = KeyRule()
        group: dict[str, Member] = {}
        group_key: str | None = None
        last_member = None
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if info.isdir() or META_MEMBER.match(info.name):
                        continue
                    key, extension = split_member(info.name)
                    if key is None:
                        continue
                    if info.isreg():
                        member = self._read(tar, info, extension)
                    else:  # a link or a special file: not read (as webdataset), recorded if it is the sample's image
                        member = Member(info.name, None, _not_regular(info))
                    last_member = info.name
                    extension = extension.lower()
                    if key != group_key:  # (the new member in its group first: held where ``finally`` sees it)
                        finished, finished_key = group, group_key
                        group_key, group = key, {extension: member}
                        if finished_key is not None:
                            yield self._sample(stem, path, finished_key, finished, seen)
                    else:
                        if extension in group:
                            extension = f"{extension}#{sum(e.startswith(extension) for e in group) + 1}"
                        group[extension] = member
                    tar.members = []  # streaming: do not keep every member's header
            if group_key is not None:
                yield self._sample(stem, path, group_key, group, seen)
        except UnitReadError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if group_key is not None and any(self._wanted(e.split("#")[0], m) for e, m in group.items()):
                yield self._sample(stem, path, group_key, group, seen)
            where = f"after member {last_member}" if last_member else "before the first member"
            raise UnitReadError(f"{path} is damaged or truncated {where}: {type(exc).__name__}: {exc}") from None
        finally:  # a reader stopped early, or damage: no temporary copy of a member left behind
            for member in group.values():
                member.discard()

    def _sample(self, stem: str, path: str, key: str, members: dict[str, Member], seen: KeyRule) -> Sample:
        """The sample of a group of members; a temporary copy it does not hand on is removed here, the one it does
        goes with the sample (``Sample.local``)."""
        sample = self._make_sample(stem, path, key, members, seen)
        for member in members.values():
            if member.local is not None and member.local == sample.local:
                member.local = None  # the sample's now
            member.discard()
        return sample

    def _make_sample(self, stem: str, path: str, key: str, members: dict[str, Member], seen: KeyRule) -> Sample:
        name, n = seen.assign(key)
        vitok_key = f"{stem}/{key}"
        images = [e for e, m in members.items() if self._wanted(e.split("#")[0], m)]
        what = "video" if self.options.media == "video" else "image"
        readable = [e for e in images if members[e].readable]
        meta = self._meta(members)
        if n > 1:
            return Sample(f"{stem}/{name}", path, member=key, meta=meta,
                          skip=f"duplicate key {key!r} in {stem}: recorded as {name!r}; the first is kept")
        if not readable:
            if images:
                first = members[images[0]]
                return Sample(vitok_key, path, member=first.name, meta=meta,
                              skip=f"the {what} member is {first.not_regular}: not read (links in a tar are not "
                                   "followed, as webdataset)")
            kinds = ", ".join(sorted(members)) or "nothing"
            other = _other_medium(members, self.options.media)
            if other is not None:  # a sample of the other medium: one store holds images or videos, never both
                flag = "video" if self.options.media == "image" else "wds"
                return Sample(vitok_key, path, member=other, meta=meta,
                              skip=f"a{'n' if what == 'video' else ''} {'video' if what == 'image' else 'image'} "
                                   f"sample ({other}) in a store of {what}s: one store holds one kind; extract it "
                                   f"into another store with --input-format {flag}")
            status = _status(members)  # the writer (video2dataset, img2dataset) says why there is nothing
            why = f"; its status is {status}" if status is not None else ""
            return Sample(vitok_key, path, member=key, meta=meta,
                          skip=f"no {what} in this sample (members: {kinds}){why}")
        first = members[readable[0]]
        sample = Sample(vitok_key, path, member=first.name, data=first.data, meta=meta, local=first.local)
        if len(images) > 1:
            sample.meta = {**(meta or {}), "other_images": [members[e].name for e in images if e != readable[0]]}
        return sample

    def _meta(self, members: dict[str, Member]) -> dict | None:
        meta = {}
        fields = self.options.meta_fields
        text, info = members.get("txt"), members.get("json")
        if text is not None and text.data is not None and (fields is None or "txt" in fields or "caption" in fields):
            meta["caption"] = text.data.decode("utf-8", "replace")
        if info is not None and info.data is not None:
            try:
                data = json.loads(info.data)
            except ValueError:
                data = None
            if isinstance(data, dict):
                if fields is not None:
                    data = {k: v for k, v in data.items() if k in fields}
                if data:
                    meta["json"] = data
        return meta or None


def _other_medium(members: dict[str, Member], media: str) -> str | None:
    """The name of a sample's first member of the medium other than ``media`` (None: it has none)."""
    for extension, member in members.items():
        found = member_medium(extension.split("#")[0], member.head)
        if found is not None and found != media:
            return member.name
    return None


@dataclass
class TarMedia:
    """What the first samples of webdataset tars hold: the first image and video member seen (a tar's path and the
    member's name), and what could not be read (a missing or damaged tar: its samples are read, or recorded, later)."""

    image: str | None = None
    video: str | None = None
    unread: list[str] | None = None

    @property
    def medium(self) -> str | None:
        """``image``, ``video``, ``mixed`` or None (no sample seen holds either)."""
        if self.image and self.video:
            return "mixed"
        return "video" if self.video else "image" if self.image else None


SCAN_MEMBERS = 256  # members of a tar looked at to tell what it holds (a tar's samples are alike: its first decide)
SCAN_BYTES = 256 << 20  # nor more of it than this read (a stream that cannot seek reads what it skips)
SCAN_TARS = 8  # tars looked at before giving up (a shard of only failed downloads holds no media)


def tar_media(paths: list[str], members: int = SCAN_MEMBERS, limit: int = SCAN_BYTES,
              tars: int = SCAN_TARS) -> TarMedia:
    """Whether webdataset tars hold images or videos, from their first members: a member is an image or a video by
    its extension, or (a name that says nothing) by its first bytes. Tars are looked at in order until one shows a
    medium (at most ``tars``); within one, at most ``members`` members and ``limit`` bytes, stopping once both media
    are seen. Never raises: a tar that cannot be read is noted in ``unread`` and the next one looked at."""
    found = TarMedia(unread=[])

    def ended(sample: dict[str, str]) -> bool:  # a sample with a video is a video's (its images: thumbnails)
        medium = "video" if "video" in sample else "image" if "image" in sample else None
        if medium is not None and getattr(found, medium) is None:
            setattr(found, medium, sample[medium])
        return found.medium == "mixed"

    for path in paths[:tars]:
        try:
            stream = open_binary(path)
        except OSError:  # missing now (recorded when read), or not a regular file
            found.unread.append(path)
            continue
        sample: dict[str, str] = {}
        sample_key = None
        try:
            with stream, tarfile.open(fileobj=stream, mode="r:*" if stream.seekable() else "r|*") as tar:
                for count, info in enumerate(tar):
                    if count >= members or tar.offset > limit:
                        break
                    key, extension = split_member(info.name)
                    if key is None or info.isdir() or META_MEMBER.match(info.name) or not info.isreg():
                        continue
                    if key != sample_key:
                        if ended(sample):
                            return found
                        sample, sample_key = {}, key
                    head = tar.extractfile(info).read(SNIFF_BYTES) if is_sniffable(extension) else None
                    medium = member_medium(extension, head)
                    if medium is not None:
                        sample.setdefault(medium, f"{path} [{info.name}]")
                    tar.members = []
        except (tarfile.TarError, EOFError, OSError, ValueError):
            found.unread.append(path)
        if ended(sample) or found.medium is not None:
            return found
    return found

"""Webdataset tars (what img2dataset writes): members grouped into samples webdataset's way, read sequentially.

Grouping follows webdataset's ``tariterators``: a member ``dir/name.ext1.ext2`` has the key ``dir/name`` (the path up
to the first dot of the basename) and the extension ``ext1.ext2``; consecutive members with one key form a sample;
``__*__`` members and non-files are skipped. The sample's image is its first member whose extension ends in an image
type (any case); ``txt`` becomes the caption and ``json`` the metadata kept in the record (or only the fields named
with ``--meta-fields``). A vitok key is ``<tar stem>/<key>``.

Damage costs only what is damaged: a truncated tar gives every sample completed before the cut and raises
:class:`UnitReadError` naming where it stopped; a sample without an image is recorded as skipped; a key seen twice in
one tar is recorded under ``<key>#2`` (skipped, with the reason), never dropped or overwritten.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator

from ..sources import IMAGE_EXTENSIONS, NotRegularFileError
from . import InputReader, KeyRule, Sample, UnitReadError
from .remote import open_binary

KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
META_MEMBER = re.compile(r"__[^/]*__($|/)")
IMAGE_TYPES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def split_member(name: str) -> tuple[str | None, str | None]:
    match = KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def is_image_extension(extension: str) -> bool:
    return extension.lower().rsplit(".", 1)[-1] in IMAGE_TYPES


class WebDatasetReader(InputReader):
    kind = "wds"

    def samples(self, unit, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        description = unit.read() if hasattr(unit, "read") else unit
        path, stem = description["path"], description["stem"]
        try:
            stream = open_binary(path)
        except NotRegularFileError as exc:
            raise UnitReadError(f"{path}: {exc}") from None
        except OSError as exc:
            raise UnitReadError(f"cannot open {path}: {exc.strerror or exc}", failed=True) from None
        seen = KeyRule()
        group: dict[str, bytes] = {}
        group_key: str | None = None
        last_member = None
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isreg() or META_MEMBER.match(info.name):
                        continue
                    key, extension = split_member(info.name)
                    if key is None:
                        continue
                    data = tar.extractfile(info).read()
                    last_member = info.name
                    if key != group_key:
                        if group_key is not None:
                            yield self._sample(stem, path, group_key, group, seen)
                        group_key, group = key, {}
                    if extension.lower() in group:
                        extension = f"{extension.lower()}#{sum(e.startswith(extension.lower()) for e in group) + 1}"
                    group[extension.lower()] = data
                    tar.members = []  # streaming: do not keep every member's header
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            if group_key is not None and any(is_image_extension(e) for e in group):
                yield self._sample(stem, path, group_key, group, seen)
            where = f"after member {last_member}" if last_member else "before the first member"
            raise UnitReadError(f"{path} is damaged or truncated {where}: {type(exc).__name__}: {exc}") from None
        if group_key is not None:
            yield self._sample(stem, path, group_key, group, seen)

    def _sample(self, stem: str, path: str, key: str, members: dict[str, bytes], seen: KeyRule) -> Sample:
        name, n = seen.assign(key)
        vitok_key = f"{stem}/{key}"
        images = [e for e in members if is_image_extension(e.split("#")[0])]
        meta = self._meta(members)
        if n > 1:
            return Sample(f"{stem}/{name}", path, member=key, meta=meta,
                          skip=f"duplicate key {key!r} in {stem}: recorded as {name!r}; the first is kept")
        if not images:
            kinds = ", ".join(sorted(members)) or "nothing"
            return Sample(vitok_key, path, member=key, meta=meta, skip=f"no image in this sample (members: {kinds})")
        extension = images[0]
        sample = Sample(vitok_key, path, member=f"{key}.{extension.split('#')[0]}", data=members[extension], meta=meta)
        if len(images) > 1:
            sample.meta = {**(meta or {}), "other_images": [f"{key}.{e.split('#')[0]}" for e in images[1:]]}
        return sample

    def _meta(self, members: dict[str, bytes]) -> dict | None:
        meta = {}
        fields = self.options.meta_fields
        if "txt" in members and (fields is None or "txt" in fields or "caption" in fields):
            meta["caption"] = members["txt"].decode("utf-8", "replace")
        if "json" in members:
            try:
                data = json.loads(members["json"])
            except ValueError:
                data = None
            if isinstance(data, dict):
                if fields is not None:
                    data = {k: v for k, v in data.items() if k in fields}
                if data:
                    meta["json"] = data
        return meta or None

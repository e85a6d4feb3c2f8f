"""Parquet files with image bytes: Hugging Face ``datasets`` (an ``Image`` feature is a struct ``{bytes, path}``) and
img2dataset (a binary column named by its encode format, e.g. ``jpg``, and a ``key`` column).

A unit is one row group, read batch by batch (never the whole file). The image column is named with
``--image-column`` or found: the first struct column with a binary ``bytes`` field, else a binary column named like an
image type, else the only binary column. Keys come from ``--key-column``, by default the ``key`` column when there
is one, else the row number in the file; a vitok key is ``<file stem>/<key>``. Rows without image bytes
(img2dataset keeps failed downloads as rows with a ``status``) are recorded as skipped with that status; a Hugging
Face ``Image`` cell with ``bytes`` null and a ``path`` (the image left outside the file, which ``datasets`` opens
relative to its working directory) is recorded as skipped naming the path: only embedded bytes are read.
pyarrow is imported only here: it is the ``vitok[parquet]`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator

from ...errors import UsageError
from ..sources import IMAGE_EXTENSIONS, NotRegularFileError, check_regular, is_url
from . import InputReader, KeyRule, Sample, UnitReadError
from .remote import open_binary

BATCH_ROWS = 64
CAPTION_COLUMNS = ("caption", "text", "txt")
IMAGE_NAMES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) + ("image", "img")


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet inputs need pyarrow: pip install 'vitok[parquet]'") from None
    return pq


def _open(path: str):
    pq = pyarrow_parquet()
    if is_url(path):
        return pq.ParquetFile(open_binary(path))
    check_regular(path)  # a FIFO named x.parquet would block; pyarrow reads a path natively (faster than a handle)
    return pq.ParquetFile(path)


def row_groups(path: str) -> tuple[list[int], str | None]:
    """Rows of each row group, or an error message when the file cannot be read."""
    try:
        meta = _open(path).metadata
    except UsageError:
        raise
    except Exception as exc:  # missing, truncated, not parquet: recorded when the unit is read
        return [], f"cannot read {path}: {type(exc).__name__}: {exc}"
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)], None


def image_column(schema, requested: str | None) -> tuple[str, bool]:
    """(column, is_struct) of the image bytes."""
    import pyarrow as pa

    names = schema.names
    if requested is not None:
        if requested not in names:
            raise UsageError(f"--image-column {requested!r} is not a column; columns: {', '.join(names)}")
        field_type = schema.field(requested).type
        return requested, pa.types.is_struct(field_type)
    for name in names:
        field_type = schema.field(name).type
        if pa.types.is_struct(field_type) and any(
                f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
                for f in field_type):
            return name, True
    binary = [n for n in names if pa.types.is_binary(schema.field(n).type)
              or pa.types.is_large_binary(schema.field(n).type)]
    for name in binary:
        if name.lower() in IMAGE_NAMES:
            return name, False
    if len(binary) == 1:
        return binary[0], False
    raise UsageError(f"cannot tell which column holds the images (binary columns: {binary or 'none'}); "
                     "name it with --image-column")


def check_columns(paths: list[str], image_column_: str | None, key_column: str | None) -> None:
    """Before anything is written: every local parquet file has a column of images (the one named, or one found) and
    the key column named; UsageError naming the file otherwise. Files that cannot be read are left to the run (it
    records them)."""
    for path in paths:
        if is_url(path):
            continue
        try:
            schema = _open(path).schema_arrow
        except UsageError:
            raise
        except Exception:  # missing, damaged, not a regular file: recorded when its unit is read
            continue
        try:
            image_column(schema, image_column_)
            if key_column is not None and key_column not in schema.names:
                raise UsageError(f"--key-column {key_column!r} is not a column; columns: {', '.join(schema.names)}")
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None


def _key(value, row: int) -> str:
    """A key column's value as a key; a null one is named after its row with ``#`` (taken names get ``#n``)."""
    return f"#row{row}" if value is None else str(value)


class ParquetReader(InputReader):
    kind = "parquet"

    def samples(self, unit, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        archive = unit.archive()
        path, stem, group = archive.path, archive.stem, archive.row_group
        if archive.error or group is None:
            try:
                check_regular(path) if not is_url(path) else None
            except NotRegularFileError as exc:  # never readable: not retried
                raise UnitReadError(f"{path}: {exc}") from None
            except OSError:
                pass
            raise UnitReadError(archive.error or f"{path} has no row groups", failed=True)
        try:
            handle = _open(path)
        except NotRegularFileError as exc:
            raise UnitReadError(f"{path}: {exc}") from None
        except FileNotFoundError as exc:
            raise UnitReadError(f"cannot open {path}: {exc.strerror or exc}", failed=True) from None
        except Exception as exc:
            raise UnitReadError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        schema = handle.schema_arrow
        column, is_struct = image_column(schema, self.options.image_column)
        key_column = self.options.key_column or ("key" if "key" in schema.names else None)
        if key_column is not None and key_column not in schema.names:
            raise UsageError(f"--key-column {key_column!r} is not a column; columns: {', '.join(schema.names)}")
        captions = [c for c in CAPTION_COLUMNS if c in schema.names][:1]
        fields = [f for f in (self.options.meta_fields or ()) if f in schema.names and f != column]
        status = [c for c in ("status", "error_message") if c in schema.names]
        wanted = list(dict.fromkeys([column, *([key_column] if key_column else []), *captions, *fields, *status]))
        first_row = sum(handle.metadata.row_group(g).num_rows for g in range(group))
        keys = KeyRule()
        row = 0
        try:
            if key_column and group:  # the names earlier row groups (other units) took, by the same rule
                earlier = handle.read_row_groups(list(range(group)), columns=[key_column]).column(0).to_pylist()
                for number, key in enumerate(earlier):
                    keys.assign(_key(key, number))
            for batch in handle.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=wanted):
                for values in batch.to_pylist():
                    yield self._sample(stem, path, group, first_row + row, values, column, is_struct, key_column,
                                       captions, fields, keys)
                    row += 1
        except Exception as exc:  # a damaged row group: what came before counts
            raise UnitReadError(f"{path} row group {group} is damaged after row {row}: "
                                f"{type(exc).__name__}: {exc}") from None

    def _sample(self, stem, path, group, row, values, column, is_struct, key_column, captions, fields,
                keys: KeyRule) -> Sample:
        given = values.get(key_column) if key_column else row
        key, n = keys.assign(_key(given, row))
        image = values.get(column)
        data = image.get("bytes") if is_struct and isinstance(image, dict) else image
        meta = {}
        if captions and values.get(captions[0]) is not None:
            meta["caption"] = values[captions[0]]
        meta.update({f: values[f] for f in fields if values.get(f) is not None})
        sample = Sample(f"{stem}/{key}", path, member=f"{group}/{row}", meta=meta or None)
        if given is None:
            sample.skip = f"no key in column {key_column!r} (row {row}); recorded as {key!r}"
        elif n > 1:
            sample.skip = f"duplicate key {str(given)!r} in {stem} (row {row}): recorded as {key!r}; the first is kept"
        elif not data and is_struct and isinstance(image, dict) and image.get("path"):
            sample.skip = (f"the image is not in the file, only its path {image['path']!r} (a Hugging Face Image "
                           "with bytes=null; datasets opens such a path as given, relative to its working "
                           "directory): vitok reads only embedded bytes; embed the images (datasets' "
                           "embed_external_files) or extract the image files themselves")
        elif not data:
            why = values.get("status") or "no image bytes"
            detail = values.get("error_message")
            sample.skip = f"no image in this row ({why}{': ' + detail if detail else ''})"
        else:
            sample.data = bytes(data)
        return sample

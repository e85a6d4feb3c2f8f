"""The commit protocol, written and checked in one place.

A shard is written under a temporary name, ``shards/.<data>.<run>.tmp``, streamed batch by batch. To commit it:

1. the writer finishes the data (per-image tables, flush, fsync) and every data file is sized and checksummed;
2. if a sidecar for the shard appeared meanwhile (another process committed it), the temporary data is dropped;
3. data left at the final name without a sidecar (a run killed between steps 4 and 5) is removed;
4. the temporary data is renamed to its final name (``os.replace``: atomic for a file);
5. the sidecar ``shards/<shard>.json`` is written atomically. **Its existence is the commit.**

A shard counts as done only when its sidecar exists and its data checks out (sizes, keys and row counts; ``verify``
also compares checksums), so a run killed at any moment loses at most the shards in progress, and committed data is
never replaced: claims (``vitok.storage.claims``) keep two processes off the same shard.

**Superseded shards leave where plain readers look** (``retire``), so that h5py, numpy or webdataset over
``shards/*`` find exactly the store's current rows. A shard is superseded whole, never in part: its unit was
replaced by a later plan generation (``Plan.superseded``: moved out by ``maintenance.retire_superseded`` before
any shard of that plan is committed), or it is an earlier attempt of an archive that a retry reads again whole
(moved out by ``commit`` between steps 2 and 3 of the retry). Retiring moves the shard's data, then its sidecar,
into ``shards/.superseded/`` (a hidden folder no ``shards/*`` pattern matches). It always happens before the shard
that replaces it is published, so no two copies of a key are ever where plain readers look; a run killed midway
leaves the sidecar of a shard whose records no longer count (the next run moves it), or, for an archive's retry, a
unit with no attempt committed (the next run reads it again). Each move is a copy and a delete on storage without
renames, in the same order. The data of retired shards is kept while the plan has units to do (an image of the same
pixels copies its rows instead of being encoded again) and deleted once every unit the plan holds is committed; the
retired sidecars stay, the record of what was extracted before (``store.removed``, ``copied_from``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreError
from .files import atomic_write_text, checksum, fsync_dir, remove
from .format import ShardFormat
from .hdf5 import Hdf5Format
from .layout import SHARDS_DIR, SUPERSEDED_DIR
from .npy import NpyFormat
from .records import FileSum, Sidecar, dumps

logger = logging.getLogger(__name__)

FORMATS: dict[str, type[ShardFormat]] = {"hdf5": Hdf5Format, "npy": NpyFormat}


def register_format(format_class: type[ShardFormat]) -> type[ShardFormat]:
    """Add an output format (a class decorator); ``--format NAME`` then selects it."""
    FORMATS[format_class.name] = format_class
    return format_class


def get_format(name: str) -> ShardFormat:
    if name not in FORMATS:
        raise StoreError(f"unknown shard format {name!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[name]()


def shards_dir(out: Path) -> Path:
    return Path(out) / SHARDS_DIR


def sidecar_path(out: Path, shard: str) -> Path:
    return shards_dir(out) / f"{shard}.json"


def retired_dir(out: Path) -> Path:
    """Where superseded shards go: out of every ``shards/*`` pattern a plain reader uses."""
    return shards_dir(out) / SUPERSEDED_DIR


def temp_path(out: Path, fmt: ShardFormat, shard: str, run: str) -> Path:
    return shards_dir(out) / f".{fmt.data_name(shard)}.{run}.tmp"


def temp_files(out: Path, shard: str | None = None) -> list[Path]:
    """Temporary files of unfinished shards (all shards, or one): data and sidecars of interrupted runs."""
    folder = shards_dir(out)
    if not folder.is_dir():
        return []
    found = (p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    return sorted(p for p in found if shard is None or _temp_shard(p.name) == shard)


def _temp_shard(name: str) -> str:
    """``.shard-000001.h5.<run>.tmp`` -> ``shard-000001`` (run ids and mkstemp suffixes have no dots)."""
    data = name[1 : -len(".tmp")].rsplit(".", 1)[0]
    for suffix in [".json", *(fmt.suffix for fmt in FORMATS.values() if fmt.suffix)]:
        if data.endswith(suffix):
            return data[: -len(suffix)]
    return data


def remove_temps(out: Path, shard: str) -> None:
    """Delete a shard's temporary data left by killed runs (call only while holding the shard's claim)."""
    for path in temp_files(out, shard):
        logger.info("removing %s, left by an interrupted run", path.name)
        remove(path)


def data_files(fmt: ShardFormat, path: Path, name: str) -> dict[str, Path]:
    """Relative name (as the sidecar records it) -> file."""
    if path.is_dir():
        return {f"{name}/{f.name}": f for f in fmt.data_files(path)}
    return {name: path}


def commit(out: Path, fmt: ShardFormat, tmp: Path, sidecar: Sidecar, supersedes: tuple[str, ...] = ()) -> bool:
    """Steps 1-5 above for finished temporary data; False when another process committed the shard first.
    ``supersedes``: committed shards this one replaces whole (an archive's earlier attempts), retired first."""
    folder = shards_dir(out)
    sidecar.files = {name: FileSum(path.stat().st_size, checksum(path))
                     for name, path in data_files(fmt, tmp, sidecar.data).items()}
    final_sidecar = sidecar_path(out, sidecar.shard)
    if final_sidecar.exists():
        logger.info("shard %s was committed by another process meanwhile; dropping this copy", sidecar.shard)
        remove(tmp)
        return False
    for name in supersedes:
        retire_named(out, fmt, name)
    final = folder / sidecar.data
    if final.exists():  # data without a sidecar: a run killed between rename and sidecar
        remove(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    atomic_write_text(final_sidecar, dumps(sidecar.to_json()))
    fsync_dir(folder)
    return True


def retire(out: Path, sidecar: Sidecar) -> None:
    """Move a superseded shard out of where plain readers look: its data, then its sidecar, into
    ``shards/.superseded/`` (see the module docstring). Parts already moved (a step killed midway, another process
    retiring it too) are skipped."""
    folder, target = shards_dir(out), retired_dir(out)
    target.mkdir(exist_ok=True)
    logger.info("shard %s is superseded: moving it to %s/%s", sidecar.shard, SHARDS_DIR, SUPERSEDED_DIR)
    _move(folder / sidecar.data, target / sidecar.data)
    fsync_dir(folder)
    _move(sidecar_path(out, sidecar.shard), target / f"{sidecar.shard}.json")
    fsync_dir(folder)
    fsync_dir(target)


def retire_named(out: Path, fmt: ShardFormat, shard: str) -> None:
    """``retire`` a shard by name: through its sidecar, or (a damaged sidecar) its format's data name."""
    path = sidecar_path(out, shard)
    if not path.exists():
        return
    try:
        retire(out, read_sidecar(path))
    except StoreError:  # damaged: its data has the format's name
        retire(out, Sidecar(shard, fmt.name, fmt.data_name(shard), {}, {}, []))


def remove_named_data(out: Path, fmt: ShardFormat, shard: str) -> None:
    """Data at a shard's final name without a sidecar (a run killed between steps 4 and 5): removed."""
    data = shards_dir(out) / fmt.data_name(shard)
    if not sidecar_path(out, shard).exists() and (data.exists() or data.is_symlink()):
        logger.info("removing %s, left by an interrupted run", data.name)
        remove(data)


def _move(source: Path, target: Path) -> None:
    """One move of the superseded-shard step (a rename here; a copy then a delete on object storage)."""
    if not (source.exists() or source.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink():
        remove(target)  # an older copy of a shard of this name (a folder cannot be replaced by a rename)
    os.replace(source, target)


def iter_retired(out: Path) -> Iterator[tuple[Sidecar, bool]]:
    """The sidecars of retired (superseded) shards, and whether their data is still kept beside them."""
    folder = retired_dir(out)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            sidecar = read_sidecar(path)
        except StoreError:
            continue  # a record of the past, not a shard of the store: nothing to repair
        yield sidecar, (folder / sidecar.data).exists()


def drop_retired_data(out: Path) -> int:
    """Delete the data of retired shards (their sidecars stay); the number of shards whose data went."""
    dropped = 0
    for sidecar, kept in list(iter_retired(out)):
        if kept:
            remove(retired_dir(out) / sidecar.data)
            dropped += 1
    return dropped


def read_sidecar(path: Path) -> Sidecar:
    import json

    try:
        return Sidecar.from_json(json.loads(path.read_text()), where=str(path))
    except ValueError as exc:
        raise StoreError(f"{path} is damaged ({exc})") from None


def iter_sidecars(out: Path, damaged: dict[str, str] | None = None) -> Iterator[Sidecar]:
    """Every committed shard's sidecar, sorted by shard name. A damaged one raises StoreError, unless ``damaged``
    is given: then it is skipped and recorded there (shard name -> what is wrong and how to repair it)."""
    folder = shards_dir(out)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            yield read_sidecar(path)
        except StoreError as exc:
            if damaged is None:
                raise
            damaged[path.stem] = f"{exc}; {repair_hint(out, path.stem)}"


def repair_hint(out: Path, shard: str, silent: bool = False) -> str:
    """How to get a damaged shard back: the next extract redoes a shard whose sizes, keys or rows are wrong; damage
    only checksums find (``silent``: resume does not read every byte) needs the shard deleted first."""
    if silent:
        return (f"delete {SHARDS_DIR}/{shard}.* and rerun 'vitok extract -o {out}' to re-extract it (a resume checks "
                "sizes, keys and rows, not every byte)")
    return (f"its images are left out until it is redone: rerun 'vitok extract -o {out}' (or delete "
            f"{SHARDS_DIR}/{shard}.* and rerun) to re-extract it")


def check_shard(out: Path, sidecar: Sidecar, checksums: bool = False) -> list[str]:
    """Problems with one committed shard's data (empty list = it checks out)."""
    folder = shards_dir(out)
    name = sidecar.shard
    path = folder / sidecar.data
    if not path.exists():
        return [f"{name}: data {sidecar.data} is missing"]
    try:
        fmt = get_format(sidecar.format)
    except StoreError as exc:
        return [f"{name}: {exc}"]
    for relative, expected in sidecar.files.items():
        file = folder / relative
        if not file.exists():
            return [f"{name}: data file {relative} is missing"]
        size = sum(f.stat().st_size for f in file.iterdir()) if file.is_dir() else file.stat().st_size
        if size != expected.bytes:
            return [f"{name}: {relative} has {size} bytes, the manifest says {expected.bytes}"]
        if checksums and expected.blake2b and checksum(file) != expected.blake2b:
            return [f"{name}: {relative} does not match its checksum (the data changed after it was written)"]
    reader = None
    try:
        reader = fmt.open(path)
        keys = reader.keys()
        if keys != [r.key for r in sidecar.ok_records()]:
            return [f"{name}: keys in the data do not match the manifest"]
        for feature, rows in sidecar.features.items():
            offsets = reader.offsets(feature)
            stored = reader.rows(feature)
            if len(offsets) != len(keys) + 1 or int(offsets[-1]) != rows or stored != rows:
                return [f"{name}: {feature} has {stored} rows, the manifest says {rows}"]
    except StoreError as exc:
        return [str(exc)]
    except Exception as exc:  # h5py/numpy/tarfile raise many types for damaged files
        return [f"{name}: cannot read {sidecar.data} ({type(exc).__name__}: {exc})"]
    finally:
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()
    return []


from . import wds  # noqa: E402, F401 - registers the webdataset format (it imports register_format from here)

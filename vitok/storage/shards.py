"""The commit protocol, written and checked in one place, over the store's root (``roots.StoreRoot``: a local
folder or an object store).

A shard is written under a temporary name in local space (``root.staging``: ``shards/`` itself in a local store),
``.<data>.<run>.tmp``, streamed batch by batch. To commit it:

1. the writer finishes the data (per-image tables, flush, fsync) and every data file is sized and checksummed;
2. the data is put at its final name whole, only if nothing is there (``os.replace``; an upload that is visible
   only once complete, ``If-None-Match: *``, so a late writer never replaces data that a sidecar vouches for);
3. if something was there and a sidecar for the shard exists (another process committed it), the temporary data is
   dropped;
4. else it is data without a sidecar (a run killed between steps 2 and 5): it is removed and step 2 is taken again
   (asking for the sidecar only when the put finds the name taken saves a request per shard on an object store; a
   committed shard always has its data, so the put finds it);
5. the sidecar ``shards/<shard>.json`` is created exclusively (a hard link; ``If-None-Match: *``). **Its existence
   is the commit**, and of two writers of one shard exactly one commits.

A shard counts as done only when its sidecar exists and its data checks out (sizes, keys and row counts; ``verify``
also compares checksums), so a run killed at any moment loses at most the shards in progress, and committed data is
never replaced: claims (``vitok.storage.claims``) keep two processes off the same shard.

**Superseded shards leave where plain readers look** (``retire``), so that h5py, numpy or webdataset over
``shards/*`` find exactly the store's current rows. A shard is superseded whole, never in part: its unit was
replaced by a later plan generation (``Plan.superseded``: moved out by ``maintenance.retire_superseded`` before
any shard of that plan is committed), or it is an earlier attempt of an archive that a retry reads again whole
(moved out by ``commit`` before step 2 of the retry). Retiring moves the shard's data, then its sidecar,
into ``shards/.superseded/`` (a hidden folder no ``shards/*`` pattern matches). It always happens before the shard
that replaces it is published, so no two copies of a key are ever where plain readers look; a run killed midway
leaves the sidecar of a shard whose records no longer count (the next run moves it), or, for an archive's retry, a
unit with no attempt committed (the next run reads it again). Each move is ``StoreRoot.move``: a rename in a folder,
a copy and a delete of each object on an object store, in the same order. The data of retired shards is kept while
the plan has units to do (an image of the same pixels copies its rows instead of being encoded again) and deleted
once every unit the plan holds is committed; the retired sidecars stay, the record of what was extracted before
(``store.removed``, ``copied_from``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreAccessError, StoreError, StoreUnavailableError
from .files import checksum as file_checksum
from .files import remove
from .format import ShardFormat
from .hdf5 import Hdf5Format
from .layout import SHARDS_DIR, SUPERSEDED_DIR
from .npy import NpyFormat
from .records import FileSum, Sidecar, dumps
from .roots import Entry, StoreRoot, store_root

logger = logging.getLogger(__name__)

FORMATS: dict[str, type[ShardFormat]] = {"hdf5": Hdf5Format, "npy": NpyFormat}
RETIRED_DIR = f"{SHARDS_DIR}/{SUPERSEDED_DIR}"  # superseded shards: out of every shards/* pattern plain readers use


def register_format(format_class: type[ShardFormat]) -> type[ShardFormat]:
    """Add an output format (a class decorator); ``--format NAME`` then selects it."""
    FORMATS[format_class.name] = format_class
    return format_class


def get_format(name: str) -> ShardFormat:
    if name not in FORMATS:
        raise StoreError(f"unknown shard format {name!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[name]()


def data_name(name: str) -> str:
    """A shard's data (or sidecar) file, as a name in the store."""
    return f"{SHARDS_DIR}/{name}"


def sidecar_name(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard}.json"


def temp_path(out: Path | StoreRoot, fmt: ShardFormat, shard: str, run: str) -> Path:
    return store_root(out).staging(SHARDS_DIR) / f".{fmt.data_name(shard)}.{run}.tmp"


def temp_files(out: Path | StoreRoot, shard: str | None = None) -> list[str]:
    """What interrupted runs left of unfinished shards (all shards, or one): temporary data and sidecars, uploads
    never completed. Names as shown to users."""
    return sorted(leftover.name for leftover in _temps(store_root(out), shard))


def _temps(root: StoreRoot, shard: str | None):
    return [leftover for leftover in root.leftovers(SHARDS_DIR)
            if shard is None or _shard_of(leftover.becomes) == shard]


def _shard_of(data: str) -> str:
    """``shard-000001.h5`` (or ``.json``, or an NPY folder's ``shard-000001/keys.npy``) -> ``shard-000001``."""
    data = data.split("/", 1)[0]
    for suffix in [".json", *(fmt.suffix for fmt in FORMATS.values() if fmt.suffix)]:
        if data.endswith(suffix):
            return data[: -len(suffix)]
    return data


def temps_by_shard(out: Path | StoreRoot) -> dict[str, list]:
    """Every shard's leftovers (``Leftover``), found with one listing: for ``remove_temps`` over many shards."""
    found: dict[str, list] = {}
    for leftover in store_root(out).leftovers(SHARDS_DIR):
        found.setdefault(_shard_of(leftover.becomes), []).append(leftover)
    return found


def remove_temps(out: Path | StoreRoot, shard: str, found: dict[str, list] | None = None) -> None:
    """Delete a shard's temporary data left by killed runs (call only while holding the shard's claim); ``found``:
    ``temps_by_shard``'s answer, listed before the claims were taken (a live writer's leftovers are never in it for
    a shard this run holds, and one gone since is skipped)."""
    root = store_root(out)
    for leftover in (found.get(shard, []) if found is not None else _temps(root, shard)):
        logger.info("removing %s, left by an interrupted run", leftover.name)
        root.remove_leftover(SHARDS_DIR, leftover)


def data_files(fmt: ShardFormat, path: Path, name: str) -> dict[str, Path]:
    """Relative name (as the sidecar records it) -> file."""
    if path.is_dir():
        return {f"{name}/{f.name}": f for f in fmt.data_files(path)}
    return {name: path}


def commit(out: Path | StoreRoot, fmt: ShardFormat, tmp: Path, sidecar: Sidecar,
           supersedes: tuple[str, ...] = ()) -> bool:
    """Steps 1-5 above for finished temporary data; False when another process committed the shard first.
    ``supersedes``: committed shards this one replaces whole (an archive's earlier attempts), retired first."""
    root = store_root(out)
    with _checksummed(data_files(fmt, tmp, sidecar.data), sidecar) as body:  # (made while the data is put)
        final_sidecar = sidecar_name(sidecar.shard)
        final = data_name(sidecar.data)
        for _ in range(3):
            for name in supersedes:
                retire_named(root, fmt, name)
            if root.put(final, tmp, exclusive=True):
                break
            if root.exists(final_sidecar):
                logger.info("shard %s was committed by another process meanwhile; dropping this copy", sidecar.shard)
                remove(tmp)
                return False
            root.delete_tree(final)  # data without a sidecar: a run killed before step 5
        else:
            remove(tmp)
            raise StoreError(f"{root.show(final)} keeps appearing while shard {sidecar.shard} is committed: another "
                             "process writes the same shard (are two runs sharing one claim folder?)")
        data = body.result()
    if root.create(final_sidecar, data) is None:
        logger.info("shard %s was committed by another process meanwhile; dropping this copy", sidecar.shard)
        return False
    return True


@contextlib.contextmanager
def _checksummed(files: dict[str, Path], sidecar: Sidecar):
    """The sidecar's bytes, made in a thread from files opened now: each file's size and blake2b set as its
    ``files``, then the JSON (a put that moves or removes the paths meanwhile does not matter; hashlib releases the
    GIL and the upload mostly waits on its socket, so both overlap the data's upload instead of following it)."""
    from concurrent.futures import ThreadPoolExecutor

    handles = {name: open(path, "rb") for name, path in files.items()}

    def make() -> bytes:
        found = {}
        for name, handle in handles.items():
            digest = hashlib.blake2b(digest_size=16)
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
            found[name] = FileSum(os.fstat(handle.fileno()).st_size, digest.hexdigest())
        sidecar.files = found
        return dumps(sidecar.to_json()).encode()

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="vitok-checksum") as pool:
            yield pool.submit(make)
    finally:
        for handle in handles.values():
            handle.close()


def retire(out: Path | StoreRoot, sidecar: Sidecar) -> None:
    """Move a superseded shard out of where plain readers look: its data, then its sidecar, into
    ``shards/.superseded/`` (see the module docstring). Parts already moved (a step killed midway, another process
    retiring it too) are skipped."""
    root = store_root(out)
    logger.info("shard %s is superseded: moving it to %s", sidecar.shard, RETIRED_DIR)
    _move(root, data_name(sidecar.data), f"{RETIRED_DIR}/{sidecar.data}")
    _move(root, sidecar_name(sidecar.shard), f"{RETIRED_DIR}/{sidecar.shard}.json")


def _move(root: StoreRoot, source: str, target: str) -> None:
    """One move of the superseded-shard step (a rename in a folder; a copy then a delete on object storage)."""
    root.move(source, target)


def retire_named(out: Path | StoreRoot, fmt: ShardFormat, shard: str) -> None:
    """``retire`` a shard by name: through its sidecar, or (a damaged sidecar) its format's data name."""
    root = store_root(out)
    if not root.exists(sidecar_name(shard)):
        return
    try:
        retire(root, read_sidecar(root, shard))
    except FileNotFoundError:  # retired meanwhile
        return
    except StoreError:  # damaged: its data has the format's name
        retire(root, Sidecar(shard, fmt.name, fmt.data_name(shard), {}, {}, []))


def remove_named_data(out: Path | StoreRoot, fmt: ShardFormat, shard: str) -> None:
    """Data at a shard's final name without a sidecar (a run killed between steps 2 and 5): removed."""
    root = store_root(out)
    data = data_name(fmt.data_name(shard))
    if not root.exists(sidecar_name(shard)) and (root.exists(data) or root.is_folder(data)):
        logger.info("removing %s, left by an interrupted run", fmt.data_name(shard))
        root.delete_tree(data)


def iter_retired(out: Path | StoreRoot) -> Iterator[tuple[Sidecar, bool]]:
    """The sidecars of retired (superseded) shards, and whether their data is still kept beside them."""
    root = store_root(out)
    for entry in root.list(RETIRED_DIR):
        if not entry.name.endswith(".json") or entry.folder:
            continue
        try:
            sidecar = read_sidecar(root, entry.name[: -len(".json")], RETIRED_DIR)
        except (OSError, StoreError):
            continue  # a record of the past, not a shard of the store: nothing to repair
        data = f"{RETIRED_DIR}/{sidecar.data}"
        yield sidecar, root.exists(data) or root.is_folder(data)


def drop_retired_data(out: Path | StoreRoot) -> int:
    """Delete the data of retired shards (their sidecars stay); the number of shards whose data went."""
    root = store_root(out)
    dropped = 0
    for sidecar, kept in list(iter_retired(root)):
        if kept:
            root.delete_tree(f"{RETIRED_DIR}/{sidecar.data}")
            dropped += 1
    return dropped


def read_sidecar(out: Path | StoreRoot, shard: str, folder: str = SHARDS_DIR) -> Sidecar:
    """A shard's sidecar (in ``shards/``, or ``shards/.superseded/`` given as ``folder``)."""
    root = store_root(out)
    name = f"{folder}/{shard}.json"
    try:
        return Sidecar.from_json(json.loads(root.read(name)), where=root.show(name))
    except ValueError as exc:
        raise StoreError(f"{root.show(name)} is damaged ({exc})") from None


def committed(out: Path | StoreRoot, listed: dict[str, Entry] | None = None) -> list[str]:
    """The shards whose sidecar exists (committed, whether their data checks out or not), sorted; from
    ``list_shards``'s answer when given."""
    entries = listed.values() if listed is not None else store_root(out).list(SHARDS_DIR)
    return sorted(entry.name[: -len(".json")] for entry in entries
                  if entry.name.endswith(".json") and not entry.name.startswith(".") and not entry.folder)


READERS = 16  # sidecars read at once (an object store answers each GET in tens of milliseconds)


def in_parallel(function, items: list, workers: int = READERS) -> Iterator:
    """``function`` over ``items`` in threads, its results in the items' order, at most ``4 * workers`` ahead of the
    consumer (memory stays bounded over a million shards). Exceptions are the function's to return."""
    if len(items) < 2:
        yield from map(function, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="vitok-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def iter_sidecars(out: Path | StoreRoot, damaged: dict[str, str] | None = None) -> Iterator[Sidecar]:
    """Every committed shard's sidecar, sorted by shard name (read ``READERS`` at a time). A damaged one raises
    StoreError, unless ``damaged`` is given: then it is skipped and recorded there (shard name -> what is wrong and
    how to repair it)."""
    root = store_root(out)

    def read(shard: str):
        try:
            return read_sidecar(root, shard)
        except (StoreAccessError, StoreUnavailableError):
            raise  # the store cannot be read: not a damaged sidecar
        except (FileNotFoundError, StoreError) as exc:
            return exc

    shards = committed(root)
    for shard, sidecar in zip(shards, in_parallel(read, shards)):
        if isinstance(sidecar, FileNotFoundError):  # removed since it was listed (a damaged shard being redone)
            continue
        if isinstance(sidecar, StoreError):
            if damaged is None:
                raise sidecar
            damaged[shard] = f"{sidecar}; {repair_hint(root, shard)}"
            continue
        yield sidecar


def repair_hint(out: Path, shard: str, silent: bool = False) -> str:
    """How to get a damaged shard back: the next extract redoes a shard whose sizes, keys or rows are wrong; damage
    only checksums find (``silent``: resume does not read every byte) needs the shard deleted first."""
    if silent:
        return (f"delete {SHARDS_DIR}/{shard}.* and rerun 'vitok extract -o {out}' to re-extract it (a resume checks "
                "sizes, keys and rows, not every byte)")
    return (f"its images are left out until it is redone: rerun 'vitok extract -o {out}' (or delete "
            f"{SHARDS_DIR}/{shard}.* and rerun) to re-extract it")


def list_shards(out: Path | StoreRoot) -> dict[str, Entry]:
    """What is in ``shards/`` (names, sizes), from one listing: ``check_shard``'s sizes for many shards."""
    return {entry.name: entry for entry in store_root(out).list(SHARDS_DIR)}


def check_shard(out: Path | StoreRoot, sidecar: Sidecar, checksums: bool = False,
                listed: dict[str, Entry] | None = None) -> list[str]:
    """Problems with one committed shard's data (empty list = it checks out). ``listed``: ``list_shards``'s answer,
    whose sizes stand for a stat of each file directly in ``shards/``."""
    root = store_root(out)
    name = sidecar.shard

    def stat(relative: str, size: int | None = None) -> Entry | None:
        entry = listed.get(relative) if listed is not None and "/" not in relative else None
        if entry is not None and (size is None or entry.size == size):
            return entry
        return root.stat(data_name(relative))  # not listed (or listed otherwise): written since, or really missing

    if sidecar.data not in sidecar.files and stat(sidecar.data) is None and not root.is_folder(data_name(sidecar.data)):
        return [f"{name}: data {sidecar.data} is missing"]
    try:
        fmt = get_format(sidecar.format)
    except StoreError as exc:
        return [f"{name}: {exc}"]
    with contextlib.ExitStack() as copies:
        copy = None  # the data file read whole once when checksummed: checked, then opened from this local copy
        for relative, expected in sidecar.files.items():
            file = data_name(relative)
            entry = stat(relative, expected.bytes)
            if entry is None and relative == sidecar.data:
                return [f"{name}: data {sidecar.data} is missing"]
            if entry is None:
                return [f"{name}: data file {relative} is missing"]
            size = sum(e.size for e in root.list(file)) if entry.folder else entry.size
            if size != expected.bytes:
                return [f"{name}: {relative} has {size} bytes, the manifest says {expected.bytes}"]
            if not (checksums and expected.blake2b):
                continue
            if relative == sidecar.data and not entry.folder:
                copy = copies.enter_context(root.local_copy(file))
                digest = file_checksum(copy)
            else:
                digest = root.checksum(file)
            if digest != expected.blake2b:
                return [f"{name}: {relative} does not match its checksum (the data changed after it was written)"]
        return _check_data(fmt, root, sidecar, copy)


def _check_data(fmt: ShardFormat, root: StoreRoot, sidecar: Sidecar, copy: Path | None) -> list[str]:
    """The data's keys and rows against the sidecar (``copy``: a local copy of its file, else read where it is). A
    store that cannot be reached is no damage: that error is raised."""
    name, reader = sidecar.shard, None
    try:
        reader = fmt.open(copy) if copy is not None else fmt.open_at(root, data_name(sidecar.data))
        keys = reader.keys()
        if keys != [r.key for r in sidecar.ok_records()]:
            return [f"{name}: keys in the data do not match the manifest"]
        for feature, rows in sidecar.features.items():
            offsets = reader.offsets(feature)
            stored = reader.rows(feature)
            if len(offsets) != len(keys) + 1 or int(offsets[-1]) != rows or stored != rows:
                return [f"{name}: {feature} has {stored} rows, the manifest says {rows}"]
    except (StoreUnavailableError, StoreAccessError):
        raise
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

"""The manifest: what a store is, which shards are complete, and what happened to every image.

Layout of an output folder ``OUT``::

    OUT/vitok.json                 run header: vitok version, model, weights hash, resolved settings (written once)
    OUT/plan.jsonl                 the plan: a header line, then one {"key", "path"} line per image, sorted by key;
                                   shard i holds plan lines [i*S, (i+1)*S)
    OUT/shards/shard-000000.h5     token data of shard 0 (or shard-000000/ holding .npy files)
    OUT/shards/shard-000000.json   the shard's sidecar: per-image records and the data file's size

Commit order makes a half-written shard invisible: the data is written under a temporary name and renamed, then
the sidecar is written under a temporary name and renamed. A shard counts as done only when its sidecar exists
and the data it describes checks out, so a run killed at any moment loses at most the shard in progress. Each
shard has its own sidecar, so there is no global file to rewrite and no race between processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SettingsMismatchError, StoreError

META_FILE = "vitok.json"
PLAN_FILE = "plan.jsonl"
SHARDS_DIR = "shards"
SCHEMA_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either nothing or all of it (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` only if it does not exist yet, atomically; False if someone else won."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # fails if path exists: the first writer wins, nobody sees a partial file
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def diff_settings(existing: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable differences, one per setting: ``name: stored -> requested``."""
    old, new = flatten(existing), flatten(requested)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def write_or_check_meta(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the run header if OUT has none; otherwise refuse if its settings differ from ``meta``'s."""
    path = out / META_FILE
    if create_exclusive(path, json.dumps(meta, indent=2, sort_keys=True)):
        return meta
    existing = read_meta(out)
    differences = diff_settings(existing.get("settings", {}), meta["settings"])
    if differences:
        raise SettingsMismatchError(
            f"{out} was written with other settings ({'; '.join(differences)}); "
            "use the same settings to resume, another -o, or --overwrite to start over"
        )
    return existing


def read_meta(out: Path) -> dict[str, Any]:
    path = Path(out) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{out} is not a vitok store (no {META_FILE})") from None
    except ValueError as exc:
        raise StoreError(f"{path} is damaged ({exc})") from None


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The sorted key list cut into fixed shards: the unit of work, identical for every process."""

    keys: list[str]
    paths: list[str]
    shard_size: int
    sources: list[str]

    @property
    def num_shards(self) -> int:
        return (len(self.keys) + self.shard_size - 1) // self.shard_size

    def shard_range(self, index: int) -> range:
        return range(index * self.shard_size, min(len(self.keys), (index + 1) * self.shard_size))

    @property
    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for key, path in zip(self.keys, self.paths):
            h.update(f"{key}\0{path}\n".encode())
        return h.hexdigest()

    def shard_name(self, index: int) -> str:
        width = max(6, len(str(max(self.num_shards - 1, 0))))
        return f"shard-{index:0{width}d}"

    def to_text(self) -> str:
        header = {
            "vitok_plan": SCHEMA_VERSION,
            "num_images": len(self.keys),
            "shard_size": self.shard_size,
            "sources": self.sources,
            "digest": self.digest,
        }
        lines = [json.dumps(header)]
        lines += [json.dumps({"key": k, "path": p}, ensure_ascii=False) for k, p in zip(self.keys, self.paths)]
        return "\n".join(lines) + "\n"


def read_plan(out: Path) -> Plan | None:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        header = json.loads(handle.readline())
        keys, paths = [], []
        for line in handle:
            item = json.loads(line)
            keys.append(item["key"])
            paths.append(item["path"])
    plan = Plan(keys, paths, int(header["shard_size"]), list(header.get("sources", [])))
    if len(keys) != header["num_images"] or plan.digest != header["digest"]:
        raise StoreError(f"{path} is damaged (count or digest does not match its header)")
    return plan


def write_or_check_plan(out: Path, plan: Plan) -> Plan:
    """Write the plan once (first process wins); an existing plan must be the same plan."""
    if create_exclusive(Path(out) / PLAN_FILE, plan.to_text()):
        return plan
    existing = read_plan(out)
    assert existing is not None
    if existing.digest != plan.digest or existing.shard_size != plan.shard_size:
        raise SettingsMismatchError(
            f"{out}/{PLAN_FILE} lists {len(existing.keys)} images in shards of {existing.shard_size}, but these "
            f"sources give {len(plan.keys)} images in shards of {plan.shard_size}; the inputs changed since the "
            "plan was written: use another -o, or --overwrite to start over"
        )
    return existing


# ---- shard sidecars ----------------------------------------------------------------------------------------------


def shards_dir(out: Path) -> Path:
    return Path(out) / SHARDS_DIR


def sidecar_path(out: Path, shard_name: str) -> Path:
    return shards_dir(out) / f"{shard_name}.json"


def iter_sidecars(out: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(shard name, sidecar) for every committed shard, sorted by name."""
    folder = shards_dir(out)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("shard-*.json")):
        try:
            yield path.stem, json.loads(path.read_text())
        except ValueError as exc:
            raise StoreError(f"{path} is damaged ({exc})") from None

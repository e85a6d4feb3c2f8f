"""Removing what vitok wrote: --overwrite's wipe, a damaged shard redone, temporary files of killed plan writes,
superseded shards moved out of where plain readers look (and their data dropped once nothing needs it).

Everything here deletes store files, so it lives beside the commit protocol it must respect: a sidecar goes before
its data (a shard is never listed without its data), shards before the header and plan (``layout.WIPE_ORDER``).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from ..errors import StoreError
from .claims import STALE_AFTER
from .files import remove, remove_leftover_temps
from .format import ShardFormat
from .layout import WIPE_ORDER
from .plan import Plan, plan_dir
from .plan.retries import base_and_attempt, committed_units, superseded_shards
from .shards import drop_retired_data, read_sidecar, remove_named_data, retire_named, shards_dir, sidecar_path

logger = logging.getLogger(__name__)


def remove_damaged(out: Path, shard: str) -> None:
    """Drop a committed shard whose data is damaged (called while holding its claim): sidecar first, then data."""
    path = sidecar_path(out, shard)
    try:
        data = read_sidecar(path).data
    except Exception:  # a damaged sidecar: its data name is the shard's own
        data = None
    remove(path)
    if data:
        remove(shards_dir(out) / data)


def retire_superseded(out: Path, plan: Plan, fmt: ShardFormat) -> int:
    """The superseded-shard step for a plan: every committed shard whose records no longer count
    (``retries.superseded_shards``: of a unit the plan supersedes, or an archive's attempt older than one committed
    since) moves out of where plain readers look (``shards.retire``). Run before any shard of this plan is committed,
    so that the shards replacing them never appear beside them; data a killed commit left of a superseded unit,
    without a sidecar, is removed. Returns the number of shards moved."""
    folder = shards_dir(out)
    if not folder.is_dir():
        return 0
    superseded = plan.superseded()
    sidecars, damaged = [], []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            sidecars.append(read_sidecar(path))
        except StoreError:
            damaged.append(path.stem)
    names = superseded_shards(plan, sidecars)
    names |= {name for name in damaged if base_and_attempt(name, plan.legacy_names)[0] in superseded}
    for name in sorted(names):
        retire_named(out, fmt, name)
    for name in superseded:
        remove_named_data(out, fmt, name)
    return len(names)


def drop_superseded_data(out: Path, plan: Plan) -> int:
    """Once every unit the plan holds is committed, no run of it copies rows from superseded shards any more:
    their data is deleted (their sidecars stay in ``shards/.superseded/``). Returns the number of shards whose data
    went (0 while units are left)."""
    superseded = plan.superseded()
    committed = committed_units(out, plan)
    if any(u.name not in committed and u.name not in superseded for u in plan.units):
        return 0
    return drop_retired_data(out)


def remove_plan_leftovers(out: Path) -> None:
    """Before a plan write: delete the temporary files of plan writes that were killed (untouched for STALE_AFTER;
    a plan of millions of inputs leaves tens of MB)."""
    removed = remove_leftover_temps(plan_dir(out), STALE_AFTER)
    if removed:
        logger.info("removed %d temporary plan file(s) left by interrupted runs", removed)


def wipe_store(out: Path) -> None:
    """--overwrite: remove what vitok wrote in OUT (and nothing else). Shards go first and the header and plan
    last, so a wipe killed midway leaves a store that still names its own shards; anything that cannot be removed
    stops the run (a shard left behind must never be taken for one of the new run's)."""
    for name in WIPE_ORDER:
        path = out / name
        failures = _remove_tree(path)
        if failures or path.exists() or path.is_symlink():
            where, exc = failures[0] if failures else (str(path), None)
            why = f" ({exc.strerror or exc})" if exc is not None else ""
            raise StoreError(f"--overwrite could not remove {where}{why}; nothing new was written: make it removable "
                             f"(permissions, 'chattr -i') or delete {out} yourself, then rerun")


def _remove_tree(path: Path) -> list[tuple[str, OSError]]:
    """Delete a file or folder tree; what could not be deleted (a file already gone is not a failure)."""
    failures: list[tuple[str, OSError]] = []
    try:
        if path.is_dir() and not path.is_symlink():
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=lambda _f, p, exc: failures.append((p, exc)))
            else:
                shutil.rmtree(path, onerror=lambda _f, p, info: failures.append((p, info[1])))
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        failures.append((str(path), exc))
    return [(p, exc) for p, exc in failures if not isinstance(exc, FileNotFoundError)]

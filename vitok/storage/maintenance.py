"""Removing what vitok wrote: --overwrite's wipe, a damaged shard redone, temporary files of killed plan writes,
superseded shards moved out of where plain readers look (and their data dropped once nothing needs it).

Everything here deletes store files, so it lives beside the commit protocol it must respect: a sidecar goes before
its data (a shard is never listed without its data), shards before the header and plan (``layout.WIPE_ORDER``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from ..errors import StoreError
from .claims import STALE_AFTER
from .format import ShardFormat
from .layout import PLAN_DIR, WIPE_ORDER
from .plan import Plan
from .plan.retries import base_and_attempt, committed_units, superseded_shards
from .roots import StoreRoot, store_root
from .shards import committed, data_name, drop_retired_data, read_sidecar, remove_named_data, retire_named, sidecar_name

logger = logging.getLogger(__name__)


def remove_damaged(out: Path | StoreRoot, shard: str) -> None:
    """Drop a committed shard whose data is damaged (called while holding its claim): sidecar first, then data."""
    root = store_root(out)
    try:
        data = read_sidecar(root, shard).data
    except Exception:  # a damaged sidecar: its data name is the shard's own
        data = None
    root.delete(sidecar_name(shard))
    if data:
        root.delete_tree(data_name(data))


def retire_superseded(out: Path | StoreRoot, plan: Plan, fmt: ShardFormat) -> int:
    """The superseded-shard step for a plan: every committed shard whose records no longer count
    (``retries.superseded_shards``: of a unit the plan supersedes, or an archive's attempt older than one committed
    since) moves out of where plain readers look (``shards.retire``). Run before any shard of this plan is committed,
    so that the shards replacing them never appear beside them; data a killed commit left of a superseded unit,
    without a sidecar, is removed. Returns the number of shards moved."""
    root = store_root(out)
    superseded = plan.superseded()
    names = committed(root)
    bases = [base_and_attempt(name, plan.legacy_names)[0] for name in names]
    attempts = Counter(bases)
    sidecars, damaged = [], []
    for shard, base in zip(names, bases):  # only the sidecars that can be superseded are read (one GET each in a
        if base not in superseded and attempts[base] < 2:  # bucket): of a unit superseded, or one of attempts
            continue
        try:
            sidecars.append(read_sidecar(root, shard))
        except FileNotFoundError:  # retired meanwhile by another process
            continue
        except StoreError:
            damaged.append(shard)
    names = superseded_shards(plan, sidecars)
    names |= {name for name in damaged if base_and_attempt(name, plan.legacy_names)[0] in superseded}
    for name in sorted(names):
        retire_named(root, fmt, name)
    for name in superseded:
        remove_named_data(root, fmt, name)
    return len(names)


def drop_superseded_data(out: Path | StoreRoot, plan: Plan) -> int:
    """Once every unit the plan holds is committed, no run of it copies rows from superseded shards any more:
    their data is deleted (their sidecars stay in ``shards/.superseded/``). Returns the number of shards whose data
    went (0 while units are left)."""
    superseded = plan.superseded()
    done = committed_units(out, plan)
    if any(u.name not in done and u.name not in superseded for u in plan.units):
        return 0
    return drop_retired_data(out)


def remove_plan_leftovers(out: Path | StoreRoot) -> None:
    """Before a plan write: delete the temporary files of plan writes that were killed (untouched for STALE_AFTER;
    a plan of millions of inputs leaves tens of MB)."""
    root = store_root(out)
    removed = 0
    for leftover in root.leftovers(PLAN_DIR, STALE_AFTER):
        try:
            root.remove_leftover(PLAN_DIR, leftover)
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info("removed %d temporary plan file(s) left by interrupted runs", removed)


def wipe_store(out: Path | StoreRoot) -> None:
    """--overwrite: remove what vitok wrote in OUT (and nothing else). Shards go first and the header and plan
    last, so a wipe killed midway leaves a store that still names its own shards; anything that cannot be removed
    stops the run (a shard left behind must never be taken for one of the new run's)."""
    root = store_root(out)
    for name in WIPE_ORDER:
        failures = root.delete_tree(name)
        if failures:
            where, exc = failures[0]
            why = f" ({exc.strerror or exc})" if exc.strerror or str(exc) else ""
            raise StoreError(f"--overwrite could not remove {where}{why}; nothing new was written: make it removable "
                             f"(permissions, 'chattr -i') or delete {root} yourself, then rerun")

"""Removing what vitok wrote: --overwrite's wipe, a damaged shard redone, temporary files of killed plan writes.

Everything here deletes store files, so it lives beside the commit protocol it must respect: a sidecar goes before
its data (a shard is never listed without its data), shards before the header and plan (``layout.WIPE_ORDER``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import StoreError
from .claims import STALE_AFTER
from .layout import PLAN_DIR, WIPE_ORDER
from .roots import StoreRoot, store_root
from .shards import data_name, read_sidecar, sidecar_name

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

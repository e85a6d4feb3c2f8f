"""What is in a store folder, by name: the one owner of the store's file and folder names.

A leaf (it imports nothing from vitok), so every stage may ask what a store looks like: the input walk uses
``is_store`` to never enter one. ``storage/__init__.py`` describes what each name holds.
"""

from __future__ import annotations

from collections.abc import Collection

META_FILE = "vitok.json"  # the run header
README_FILE = "README.txt"  # the layout in words, for a reader without vitok
SHARDS_DIR = "shards"  # shard data and their sidecars (a sidecar's existence is the commit)
SUPERSEDED_DIR = ".superseded"  # in shards/: superseded shards, out of where plain readers look
PLAN_DIR = "plan"  # the plan, one generation per file
CLAIMS_DIR = ".claims"  # which process holds which shard
INDEX_DIR = ".index"  # a cache of the sidecars (safe to delete)
STATS_DIR = "stats"  # one file per run: what it measured
LEGACY_PLAN_FILE = "plan.jsonl"  # a plan layout older than generations: only ever removed

# What --overwrite removes, in this order: shards first, the header and plan last, so a wipe killed midway leaves a
# store that still names its own shards.
WIPE_ORDER = (SHARDS_DIR, INDEX_DIR, STATS_DIR, CLAIMS_DIR, README_FILE, LEGACY_PLAN_FILE, PLAN_DIR, META_FILE)

# The names a store folder may hold beside hidden ones; anything else makes -o a folder that is not a store.
STORE_ENTRIES = (PLAN_DIR, SHARDS_DIR, README_FILE, STATS_DIR)


def shard_name(index: int) -> str:
    """The name of the index-th unit of a plan of loose files (and of a stream's shards)."""
    return f"shard-{index:06d}"


def is_store(filenames: Collection[str], dirnames: Collection[str]) -> bool:
    """A folder holding these files and subfolders is a vitok store: its header and its shards or its plan (a
    user's own vitok.json beside images is not one)."""
    return META_FILE in filenames and (SHARDS_DIR in dirnames or PLAN_DIR in dirnames)

"""The plan, part of the store: which inputs go into which output shard (``OUT/plan/``).

    model.py     the plan as read: units (``UnitRef``), generation headers, which generation holds an input now
    write.py     a listing -> content lines and a generation header created exclusively; --update's generation
    diff.py      a plan compared with a fresh listing: added, removed; archives' current units
    changes.py   which inputs changed since they were extracted (size + mtime, or the content's sha256)
    retries.py   inputs that could not be read, planned again into retry units
    binding.py   a committed shard bound to the plan unit it was made from (a digest of the unit's inputs)
"""

from .diff import PlanDiff, current_archives, diff, planned_keys
from .model import PLAN_SCHEMA, SUFFIX, Current, Generation, Plan, PlanHeader, UnitRef, load_plan, unit_name
from .write import archive_units, file_chunks, listing_digest, write_generation, write_update

__all__ = [
    "PLAN_SCHEMA", "SUFFIX", "Current", "Generation", "Plan", "PlanDiff", "PlanHeader", "UnitRef", "archive_units",
    "current_archives", "diff", "file_chunks", "listing_digest", "load_plan", "planned_keys",
    "unit_name", "write_generation", "write_update",
]

"""Whether a process of this machine still runs: how a killed run's leftovers (claims, staging spaces, temporary
copies of inputs) are told from a live run's. A leaf: every stage may ask it."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

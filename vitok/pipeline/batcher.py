"""Token-budget batching: each unit's images, in plan order, cut into batches of at most ``budget`` patches.

A pure function of the sizes and the budget (no torch): batches never span units, so the tokens of an image do not
depend on how many processes or workers ran, nor on how units interleave. An image larger than the budget is a
batch of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

BUDGET_CPU = 4096  # patches per batch: enough to keep a CPU's cores busy
BUDGET_CUDA = 32768  # a GPU needs larger batches to reach its speed


def default_budget(device_type: str) -> int:
    """The default token budget for a kind of device (``cuda`` or else); every engine uses it, so that the same
    images make the same batches whoever runs them."""
    return BUDGET_CUDA if device_type == "cuda" else BUDGET_CPU


def plan_batches(sizes: Sequence[int], budget: int) -> list[range]:
    """Consecutive index ranges of at most ``budget`` total size (or one item)."""
    batches: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            batches.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


class Batcher(Generic[T]):
    """The incremental form of ``plan_batches``, one open batch per unit (units may interleave)."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"token budget must be at least 1, got {budget}")
        self.budget = budget
        self._open: dict[Hashable, tuple[list[T], int]] = {}

    def add(self, unit: Hashable, item: T, size: int) -> list[list[T]]:
        """Add an item; returns the batch it closed, if any."""
        items, total = self._open.get(unit, ([], 0))
        closed = []
        if items and total + size > self.budget:
            closed.append(items)
            items, total = [], 0
        items.append(item)
        self._open[unit] = (items, total + size)
        return closed

    def flush(self, unit: Hashable) -> list[list[T]]:
        """The unit's last, partial batch (called when the unit has no more images)."""
        items, _ = self._open.pop(unit, ([], 0))
        return [items] if items else []

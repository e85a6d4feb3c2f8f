"""Named outputs of a tower: which exist, their names, their row order.

    patch       output of the last block, one row per patch, width D
    merged      the merger output the language model consumes, one row per m x m group, width O
    deepstack   K merged-shaped taps (stored as (K, rows, O))
    block:N     output of block N (negative counts from the end; ``block:-2`` is the LLaVA convention), like patch
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError
from .config import EncoderConfig


def offered(config: EncoderConfig) -> tuple[str, ...]:
    return (*config.features, "block:N")


def default_features(config: EncoderConfig) -> tuple[str, ...]:
    return ("merged",) if config.has_merger else ("patch",)


def block_index(feature: str, depth: int) -> int | None:
    """N of ``block:N`` as a non-negative block index; None for other names; UsageError when out of range."""
    if not feature.startswith("block:"):
        return None
    try:
        index = int(feature.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"feature {feature!r}: N of block:N must be an integer") from None
    if not -depth <= index < depth:
        raise UsageError(f"feature {feature!r}: the tower has {depth} blocks (block:0 .. block:{depth - 1}, "
                         f"or -1 .. -{depth})")
    return index % depth


def check_features(config: EncoderConfig, features: Sequence[str]) -> tuple[str, ...]:
    """Validate and normalise requested outputs (``block:-1`` -> ``block:<depth-1>``); errors list what exists."""
    normalised = []
    for feature in features:
        index = block_index(feature, config.depth)
        normalised.append(f"block:{index}" if index is not None else feature)
    normalised = list(dict.fromkeys(normalised))
    bad = [f for f in normalised if not f.startswith("block:") and f not in config.features]
    if bad or not normalised:
        raise UsageError(f"feature(s) {', '.join(bad) or '(none)'} not available for {config.name}; it offers: "
                         f"{', '.join(offered(config))}")
    return tuple(normalised)


def token_orders(config: EncoderConfig, features: Sequence[str], token_order: str) -> dict[str, str]:
    """How each feature's rows are ordered, in words (stored in the run header)."""
    merged = "raster over the merged (h/m x w/m) grid"
    per_patch = ("raster" if token_order == "raster" or config.spatial_merge_size == 1
                 else "block2x2 (reference order: (r//2, c//2, r%2, c%2))")
    if getattr(config, "window_size", 0):
        per_patch = per_patch if token_order == "raster" else "block2x2 (reference order, before window reordering)"
    return {f: merged if f in ("merged", "deepstack") else per_patch for f in features}

"""Reduce each image's tokens to one row: mean, max, or the first token ("cls": the encoder has no class token).

One implementation for both sides: torch tensors on the device stage, numpy arrays when a store's tokens are pooled
at export. Both reduce in float32 whatever the stored or computed dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UsageError

POOLS = ("none", "mean", "max", "cls")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UsageError(f"--pool {pool!r} is not one of: {', '.join(POOLS)}")
    return pool


def pool_tokens(tokens: Any, pool: str) -> Any:
    """(..., n, d) -> (..., 1, d) in float32; ``tokens`` is a torch tensor or a numpy array."""
    if pool == "none":
        return tokens
    if isinstance(tokens, np.ndarray):
        tokens = tokens.astype(np.float32, copy=False)
        if pool == "mean":
            return tokens.mean(axis=-2, keepdims=True)
        if pool == "max":
            return tokens.max(axis=-2, keepdims=True)
    else:
        tokens = tokens.float()
        if pool == "mean":
            return tokens.mean(dim=-2, keepdim=True)
        if pool == "max":
            return tokens.amax(dim=-2, keepdim=True)
    if check_pool(pool) == "cls":
        return tokens[..., :1, :]
    raise AssertionError(pool)


def pool_packed(packed: Any, rows: list[int], pool: str) -> Any:
    """Pool every image of a packed batch: (..., sum(rows), d) -> (..., len(rows), d).

    Images are pooled a run of equal lengths at a time (a batch sorted by grid is a few runs), as one reduction over a
    (..., images, rows, d) view: the same arithmetic as ``pool_tokens`` per image, in a few kernel launches.
    """
    if pool == "none":
        return packed
    out = []
    start = 0
    for length, count in _runs(rows):
        block = packed[..., start : start + length * count, :]
        view = block.reshape(*block.shape[:-2], count, length, block.shape[-1])  # (..., images, rows, d)
        out.append(pool_tokens(view, pool)[..., 0, :])
        start += length * count
    if len(out) == 1:
        return out[0]
    if isinstance(packed, np.ndarray):
        return np.concatenate(out, axis=-2)
    import torch

    return torch.cat(out, dim=-2)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for length in rows:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs

"""Reduce each image's tokens to one row: mean, max, or the first token ("cls": the encoder has no class token)."""

from __future__ import annotations

import torch

from .errors import UsageError

POOLS = ("none", "mean", "max", "cls")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise UsageError(f"--pool {pool!r} is not one of: {', '.join(POOLS)}")
    return pool


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(..., n, d) -> (..., 1, d); computed in float32 whatever the model dtype."""
    if pool == "none":
        return tokens
    if pool == "mean":
        return tokens.float().mean(dim=-2, keepdim=True)
    if pool == "max":
        return tokens.float().amax(dim=-2, keepdim=True)
    if pool == "cls":
        return tokens[..., :1, :].float()
    raise UsageError(f"--pool {pool!r} is not one of: {', '.join(POOLS)}")


def pool_packed(packed: torch.Tensor, rows: list[int], pool: str) -> torch.Tensor:
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
        view = block.unflatten(-2, (count, length))  # (..., images, rows, d)
        out.append(pool_tokens(view, pool).squeeze(-2))
        start += length * count
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for length in rows:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs

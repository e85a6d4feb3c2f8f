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

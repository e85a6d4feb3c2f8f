"""Tokens to their stored dtype on the device, with the counts each image's record keeps: finite values beyond
float16's range (stored as inf) and NaN/Inf values. Nothing here waits for the device except the per-image recounts,
which run only when a batch's total is not zero."""

from __future__ import annotations

import numpy as np
import torch

from ..storage.dtypes import FLOAT16_MAX


def to_store_tensor(tensor: torch.Tensor, store_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in their stored dtype, still on their device (bfloat16 as int16 bits), and the number of finite
    values that overflow float16 as a 0-d tensor (zero for the other dtypes). Nothing here waits for the device."""
    tensor = tensor.detach()
    if store_dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16), tensor.new_zeros((), dtype=torch.int64)
    if store_dtype == "float16":
        as_float = tensor.float()
        overflow = ((as_float.abs() > FLOAT16_MAX) & torch.isfinite(as_float)).sum()
        return tensor.to(torch.float16), overflow
    return tensor.float(), tensor.new_zeros((), dtype=torch.int64)


def overflow_per_row_group(tensor: torch.Tensor, rows: list[int]) -> list[int]:
    """Finite values beyond float16's range in each group of rows (the images of a batch); axis -2 holds rows."""
    as_float = tensor.detach().float()
    return _per_row_group((as_float.abs() > FLOAT16_MAX) & torch.isfinite(as_float), rows)


def count_nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    """NaN and Inf values of a batch's tokens as a 0-d tensor, without waiting for the device."""
    return (~torch.isfinite(tensor.detach())).sum()


def nonfinite_per_row_group(tensor: torch.Tensor, rows: list[int]) -> list[int]:
    """NaN and Inf values in each group of rows (the images of a batch); axis -2 holds rows."""
    return _per_row_group(~torch.isfinite(tensor.detach()), rows)


def _per_row_group(mask: torch.Tensor, rows: list[int]) -> list[int]:
    counts = mask.flatten(-1).sum(-1)  # (..., rows)
    counts = counts.reshape(-1, counts.shape[-1]).sum(0)
    return [int(part.sum()) for part in counts.split(rows)]


def stored_to_numpy(stored: torch.Tensor, store_dtype: str) -> np.ndarray:
    """A host tensor from ``to_store_tensor`` -> the numpy array written to the shard."""
    array = stored.numpy()
    return array.view(np.uint16) if store_dtype == "bfloat16" else array

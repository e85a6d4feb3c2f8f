"""Stored dtypes: float16 (default), float32, and bfloat16 kept losslessly as its uint16 bit pattern."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the read side (vitok.open, info, verify, export) never imports torch
    import torch

STORE_DTYPES = ("float16", "float32", "bfloat16")
FLOAT16_MAX = 65504.0


def to_store_tensor(tensor: torch.Tensor, store_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens in their stored dtype, still on their device (bfloat16 as int16 bits), and the number of finite
    values that overflow float16 as a 0-d tensor (zero for the other dtypes). Nothing here waits for the device."""
    import torch

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
    import torch

    as_float = tensor.detach().float()
    beyond = ((as_float.abs() > FLOAT16_MAX) & torch.isfinite(as_float)).flatten(-1).sum(-1)  # (..., rows)
    beyond = beyond.reshape(-1, beyond.shape[-1]).sum(0)
    return [int(part.sum()) for part in beyond.split(rows)]


def stored_to_numpy(stored: torch.Tensor, store_dtype: str) -> np.ndarray:
    """A host tensor from ``to_store_tensor`` -> the numpy array written to the shard."""
    array = stored.numpy()
    return array.view(np.uint16) if store_dtype == "bfloat16" else array


def from_store_array(array: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored array -> float32 (bfloat16 bits are widened exactly)."""
    if store_dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)

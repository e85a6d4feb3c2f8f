"""Stored dtypes: float16 (default), float32, and bfloat16 kept losslessly as its uint16 bit pattern.

The read side (numpy only); the cast of tokens on the device lives in ``vitok.pipeline.cast``."""

from __future__ import annotations

import numpy as np

STORE_DTYPES = ("float16", "float32", "bfloat16")
FLOAT16_MAX = 65504.0


def from_store_array(array: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored array -> float32 (bfloat16 bits are widened exactly)."""
    if store_dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)

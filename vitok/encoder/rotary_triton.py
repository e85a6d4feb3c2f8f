"""The 2D rotary of q and k as one Triton kernel, for CUDA (imported only where Triton is installed).

The eager form (``attention.apply_rotary``) needs four elementwise kernels with broadcasting and mixed dtypes, each
reading and writing q and k (a large share of a GPU forward; docs/performance.md has the measurement). This kernel
reads q and k once (bf16/fp16/fp32), rotates in float32 like the reference, and writes them once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, x_token_stride, x_row_stride,
    ROWS: tl.constexpr, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # one program per token: all its q and k heads (ROWS = 2 x heads)
    rows = tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (rows < ROWS) & (cols < HALF)
    src = x_ptr + token * x_token_stride + rows * x_row_stride + cols
    first = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * HALF + cols, mask=cols < HALF, other=0.0)
    sin = tl.load(sin_ptr + token * HALF + cols, mask=cols < HALF, other=0.0)
    dst = out_ptr + token * (ROWS * 2 * HALF) + rows * (2 * HALF) + cols
    dtype = out_ptr.dtype.element_ty  # float32 -> bf16/fp16 rounds to nearest even, as torch's .to()
    tl.store(dst, (first * cos - second * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (second * cos + first * sin).to(dtype), mask=mask)


def applies(qk: torch.Tensor) -> bool:
    """(N, 2, H, hd) with heads laid out back to back (true for views of the fused qkv projection)."""
    n, two, heads, head_dim = qk.shape
    return qk.stride(3) == 1 and qk.stride(2) == head_dim and qk.stride(1) == heads * head_dim and head_dim % 2 == 0


def rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as ``model.apply_rotary``: (N, 2, H, hd) in, contiguous (N, 2, H, hd) out; cos/sin (N, hd/2)."""
    n, two, heads, head_dim = qk.shape
    out = torch.empty((n, two, heads, head_dim), dtype=qk.dtype, device=qk.device)
    if n == 0:
        return out
    half, rows = head_dim // 2, two * heads
    _rotary_kernel[(n,)](
        qk, out, cos.contiguous(), sin.contiguous(), qk.stride(0), qk.stride(2),
        ROWS=rows, HALF=half, BLOCK_ROWS=triton.next_power_of_2(rows), BLOCK_HALF=triton.next_power_of_2(half),
    )
    return out

"""Attention over segments of a packed batch, and the 2D rotary of q and k.

Kernels: ``sdpa`` (default: one batched call per run of equal-length segments), ``eager`` (the test oracle),
``varlen`` (FlashAttention over the packed batch with ``cu_seqlens``: CUDA, fp16/bf16, torch >= 2.10; falls back to
``sdpa`` elsewhere). A segment is a temporal slice of an image or a window; no row attends outside its segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import config, kernels
from .geometry import Segments


@dataclass
class Rotary:
    """A batch's rotary angles, (N, head_dim/2) float32 each; ``neg_sin`` is kept so no pass negates a head half."""

    cos: torch.Tensor
    sin: torch.Tensor
    neg_sin: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.neg_sin = -self.sin

    def permuted(self, rows: torch.Tensor) -> Rotary:
        return Rotary(self.cos[rows], self.sin[rows])


def apply_rotary(qk: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate q and k together in float32, like the reference, rounding once back to their dtype.

    The reference computes ``q * cos + rotate_half(q) * sin`` with cos/sin repeated over both head halves, i.e.
    per half ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``. Written per half, a bf16 input is read directly
    by float32 arithmetic (no float32 copy of q and k, no concatenation): two passes instead of seven.
    """
    fused = kernels.fused_rotary(qk, rotary.cos, rotary.sin)  # CUDA: the same arithmetic in one Triton kernel
    if fused is not None:
        return fused
    x = qk.unflatten(-1, (2, -1))  # (N, 2, H, 2, hd/2): [q|k], heads, [first|second half]
    first, second = x[..., 0, :], x[..., 1, :]
    cos, sin, neg_sin = (t[:, None, None, :] for t in (rotary.cos, rotary.sin, rotary.neg_sin))  # (N, 1, 1, hd/2)
    if torch.is_grad_enabled() and qk.requires_grad:  # autograd refuses out=: the same arithmetic, one more pass
        rotated = (torch.addcmul(first * cos, second, neg_sin), torch.addcmul(second * cos, first, sin))
        return torch.stack(rotated, dim=-2).to(qk.dtype).flatten(-2)
    out = torch.empty_like(x)
    torch.addcmul(first * cos, second, neg_sin, out=out[..., 0, :])
    torch.addcmul(second * cos, first, sin, out=out[..., 1, :])
    return out.flatten(-2)


def _attend_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
    out = []
    start = 0
    for length in segments.lengths:
        qs, ks, vs = (t[start : start + length].transpose(0, 1) for t in (q, k, v))  # (H, S, hd)
        weights = torch.softmax((qs @ ks.transpose(1, 2)) * scale, dim=-1, dtype=torch.float32).to(qs.dtype)
        out.append((weights @ vs).transpose(0, 1))  # (S, H, hd)
        start += length
    return torch.cat(out, dim=0)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float) -> torch.Tensor:
    if len(segments.runs) == 1:
        return _attend_run(q, k, v, segments.runs[0][1], segments.runs[0][2], scale)
    out = torch.empty_like(q)
    for first, count, length in segments.runs:
        rows = slice(first, first + count * length)
        out[rows] = _attend_run(q[rows], k[rows], v[rows], count, length, scale)
    return out


def _attend_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int, length: int, scale: float):
    heads, head_dim = q.shape[1:]
    if kernels.cpu_attention_applies(q, length):
        qb, kb, vb = (t.view(count, length, heads, head_dim) for t in (q, k, v))  # (B, S, H, hd)
        return kernels.cpu_attention(qb, kb, vb, scale).view(count * length, heads, head_dim)
    qb, kb, vb = (t.view(count, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.transpose(1, 2).reshape(count * length, heads, head_dim)


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float):
    kernel = _varlen_kernel()
    usable = kernel is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if not usable or len(segments.runs) == 1:
        return _attend_sdpa(q, k, v, segments, scale)
    cu = segments.cu_seqlens(q.device)
    return kernel(q, k, v, cu, cu, segments.max_length, segments.max_length, scale=scale)


ATTENTION_KERNELS = {"sdpa": _attend_sdpa, "varlen": _attend_varlen, "eager": _attend_eager}
assert tuple(ATTENTION_KERNELS) == config.ATTENTION_KERNELS

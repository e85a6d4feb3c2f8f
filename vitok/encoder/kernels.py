"""Linear layers (+ GELU) and CPU attention on the fastest kernel each device offers; every path computes what
F.linear + F.gelu and SDPA compute.

- CUDA: ``torch._addmm_activation`` puts bias + tanh-GELU in the cuBLASLt epilogue, so the 4D-wide MLP
  activations are written once instead of three times. On CUDA that op is tanh-GELU on every code path
  (on CPU it is the erf GELU), so it serves only the blocks' tanh GELU on CUDA.
- x86 CPU: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` emits for CPU
  linears) with GELU fused, and float32 attention of images up to ``CPU_ATTENTION_MAX_LENGTH`` patches as two oneDNN
  GEMMs per head. Whether oneDNN or torch's own kernel is faster depends on the CPU (ISA, vendor), so by default
  each shape is timed once per machine (``vitok.encoder.kernel_choice``); ``VITOK_ONEDNN=on|off`` decides instead
  (``vitok.settings``). bf16 goes to oneDNN only where the CPU has native bf16. Measurements: docs/performance.md.
- Anything else, and whenever autograd has to record the op: plain ``F.linear`` + ``F.gelu`` and SDPA.

The rotary of q and k runs as one Triton kernel on CUDA (``vitok.encoder.rotary_triton``) when Triton imports and the
kernel passes a check against the float64 formula on the GPU at first use; ``VITOK_TRITON=off`` turns it off.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from . import kernel_choice

logger = logging.getLogger(__name__)

GELU_FORMS = ("none", "tanh")  # F.gelu's ``approximate``: exact erf, or the tanh approximation


def onednn_linear_available() -> bool:
    """oneDNN linears are switched on (``vitok.settings``: onednn) and work on this machine."""
    return settings.enabled("onednn") and _onednn_works()


@functools.cache
def _onednn_works() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, weight = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(op(x, weight, None, "none", [], ""), F.linear(x, weight)))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """float32 always; bfloat16 only where the CPU has native bf16 (oneDNN would emulate it slowly elsewhere)."""
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)


def _onednn_linear(x, weight, bias, gelu):
    attr, algorithm = ("gelu", gelu) if gelu is not None else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def _plain_linear(x, weight, bias, gelu):
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate=gelu) if gelu is not None else out


def _use_onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias, gelu) -> bool:
    if not onednn_linear_available() or x.dtype not in _onednn_dtypes():
        return False
    if settings.get("onednn") == "on" or x.dim() != 2:
        return True
    sample = x[: kernel_choice.TIMED_ROWS]
    # One choice per weight shape, whatever the batch's rows: a row's result must not depend on its batch-mates
    # (an image read from a tar must give the same tokens as from a loose file).
    key = f"linear|{weight.shape[1]}->{weight.shape[0]}|bias={bias is not None}|gelu={gelu}|{x.dtype}"
    return kernel_choice.choose(key, {"onednn": lambda: _onednn_linear(sample, weight, bias, gelu),
                                      "torch": lambda: _plain_linear(sample, weight, bias, gelu)}) == "onednn"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, followed by ``F.gelu(approximate=gelu)`` when ``gelu`` is given."""
    if gelu is not None and gelu not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}")
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not recording:
        if x.is_cuda and gelu == "tanh" and x.dim() == 2 and bias is not None:
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
        if x.device.type == "cpu" and _use_onednn_linear(x, weight, bias, gelu):
            return _onednn_linear(x, weight, bias, gelu)
    return _plain_linear(x, weight, bias, gelu)


def apply(x: torch.Tensor, layer: nn.Linear, gelu: str | None = None) -> torch.Tensor:
    """``linear`` for an ``nn.Linear`` module."""
    return linear(x, layer.weight, layer.bias, gelu)


CPU_ATTENTION_MAX_LENGTH = 4096  # one head's float32 scores: 64 MiB at this length; longer runs use SDPA's flash


TIMED_ATTENTION_LENGTH = 1024  # rows of one segment timed to choose the attention kernel of a length class


def cpu_attention_applies(q: torch.Tensor, length: int) -> bool:
    """Whether a run of segments of ``length`` rows (q is (rows, H, hd)) goes to ``cpu_attention``."""
    if not (q.device.type == "cpu" and q.dtype == torch.float32 and length <= CPU_ATTENTION_MAX_LENGTH
            and not (torch.is_grad_enabled() and q.requires_grad) and onednn_linear_available()):
        return False
    if settings.get("onednn") == "on":
        return True
    rows = min(length, TIMED_ATTENTION_LENGTH)
    heads, head_dim = q.shape[1:]
    sample = q[:rows].unsqueeze(0)  # (1, S, H, hd): q, k and v alike are fine for timing
    scale = head_dim**-0.5

    def sdpa():
        t = sample.transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t, scale=scale)

    key = f"attention|{heads}x{head_dim}|{q.dtype}|length<={kernel_choice.rows_class(length)}"
    return kernel_choice.choose(key, {"onednn": lambda: cpu_attention(sample, sample, sample, scale),
                                      "torch": sdpa}) == "onednn"


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, S, H, hd) inputs, one (image, head) at a time on oneDNN GEMMs (torch's CPU
    flash attention runs its float32 GEMMs on MKL). The scores of one head are materialised, hence the limit."""
    batch, length, heads, head_dim = q.shape
    out = torch.empty((batch, length, heads, head_dim), dtype=q.dtype)
    op = torch.ops.mkldnn._linear_pointwise
    for b in range(batch):
        for h in range(heads):
            scores = op(q[b, :, h], k[b, :, h].contiguous(), None, "none", [], "")  # (S, S)
            probs = torch.softmax(scores.mul_(scale), dim=-1)
            out[b, :, h] = op(probs, v[b, :, h].t().contiguous(), None, "none", [], "")  # (S, hd)
    return out


def _triton_rotary():
    """``rotary_triton`` when switched on, Triton imports and the kernel agrees with float64 here, else None."""
    return _checked_triton_rotary() if settings.enabled("triton") else None


@functools.cache
def _checked_triton_rotary():
    try:
        from . import rotary_triton

        generator = torch.Generator().manual_seed(0)
        qkv = torch.randn(7, 3, 2, 12, generator=generator, dtype=torch.float64)
        angles = torch.rand(7, 6, generator=generator, dtype=torch.float64) * 20
        x, cos, sin = qkv[:, :2], angles.cos()[:, None, None], angles.sin()[:, None, None]
        first, second = x[..., :6], x[..., 6:]
        expected = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
        got = rotary_triton.rotary(qkv.float().cuda()[:, :2], angles.cos().float().cuda(), angles.sin().float().cuda())
        error = (got.cpu().double() - expected).abs().max().item()
        if error > 1e-5:
            raise RuntimeError(f"self-check error {error:.2e}")
    except Exception as exc:  # no Triton, no compiler, a driver problem: the eager rotary gives the same numbers
        logger.warning("Triton rotary kernel unavailable (%s: %s); using the eager rotary", type(exc).__name__, exc)
        return None
    return rotary_triton


def fused_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The Triton rotary of (N, 2, H, hd) q/k on CUDA, or None where it does not apply (then use the eager form)."""
    if not qk.is_cuda or (torch.is_grad_enabled() and qk.requires_grad):
        return None
    module = _triton_rotary()
    if module is None or not module.applies(qk):
        return None
    return module.rotary(qk, cos, sin)

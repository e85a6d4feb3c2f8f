"""(CUDA) The encoder with each attention kernel available here: vitok's packed varlen FlashAttention, and its
per-run SDPA restricted to one backend at a time (flash, cuDNN, memory-efficient); MFU against the measured matmul
rate. FlashAttention-3 is reported as importable or not (vitok has no FA3 path yet)."""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from .common import encoder_flops, row, timeit
from .encoder import grid_sets, shallow


def run(args, device, dtype) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..encoder.model import VisionEncoder, init_random_weights

    config = shallow(args.preset, None if args.full else args.depth)
    model = VisionEncoder(config)
    init_random_weights(model)
    model = model.to(device=device, dtype=dtype).eval()
    cases = {"varlen": ("varlen", None), "sdpa-flash": ("sdpa", SDPBackend.FLASH_ATTENTION),
             "sdpa-cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION),
             "sdpa-efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION)}
    fa3 = any(importlib.util.find_spec(name) is not None for name in ("flash_attn_interface", "flash_attn_3"))
    for label, grids in grid_sets(device):
        n = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(n, config.patch_dim, device=device, dtype=dtype)
        flops = encoder_flops(config, grids)
        values: dict[str, float | str | bool] = {"fa3_importable": fa3}
        for name, (kernel, backend) in cases.items():
            model.set_attention(kernel)
            context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with torch.inference_mode(), context:
                    seconds = timeit(lambda p=pixels, g=grids: model(p, g, features=("merged",)), device, args.warmup,
                                     args.iters)
            except RuntimeError as exc:  # a backend that does not take these shapes or this dtype
                values[f"{name}_error"] = str(exc).splitlines()[0][:80]
                continue
            values[f"{name}_ms"] = seconds * 1e3
            if args.peak_flops:
                values[f"{name}_mfu"] = flops / seconds / args.peak_flops
        row("attention", f"{args.preset} depth {config.depth} {label} {str(dtype).removeprefix('torch.')}", **values)

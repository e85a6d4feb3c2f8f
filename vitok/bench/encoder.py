"""The encoder alone: vitok vs the transformers reference on the same random weights and inputs."""

from __future__ import annotations

import torch

from .. import settings
from ..encoder.config import EncoderConfig
from ..encoder.model import VisionEncoder
from ..encoder.presets import get_preset
from .common import encoder_flops, row, timeit


def reference_and_vitok(config: EncoderConfig, device, dtype, attention="auto"):
    """The transformers tower of the config's family and vitok's, with the same random weights."""
    from .reference import reference_tower

    with torch.device(device):
        reference = reference_tower(config).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            is_norm = ("norm" in name or "ln_q" in name) and name.endswith("weight")
            param.normal_(1.0 if is_norm else 0.0, 0.02, generator=generator)
    reference = reference.to(dtype)
    with torch.device(device):
        model = VisionEncoder(config)
    model.load_state_dict(reference.state_dict())
    model = model.to(device=device, dtype=dtype).eval()
    if attention == "auto":
        attention = "varlen" if device.type == "cuda" and dtype != torch.float32 else "sdpa"
    model.set_attention(attention)
    return reference, model


def reference_output(reference, pixels, grids):
    """The merged tokens of a reference tower, whatever its family returns."""
    out = reference(pixels, grid_thw=torch.tensor(grids, device=pixels.device))
    return out.pooler_output if hasattr(out, "pooler_output") else out


def shallow(preset_name: str, depth: int | None) -> EncoderConfig:
    """A preset's tower, cut to ``depth`` blocks (None: full depth) keeping the taps that still exist."""
    preset = get_preset(preset_name).encoder
    depth = preset.depth if depth is None else min(depth, preset.depth)
    data = {**preset.to_dict(), "depth": depth,
            "deepstack_visual_indexes": [i for i in preset.deepstack_visual_indexes if i < depth]}
    if "fullatt_block_indexes" in data:
        data["fullatt_block_indexes"] = [i for i in data["fullatt_block_indexes"] if i < depth]
    return EncoderConfig.from_dict(data)


def bench_encoder(args, device, dtype, config: EncoderConfig, grid_sets, label_prefix: str) -> None:
    reference, model = reference_and_vitok(config, device, dtype, args.attention)
    for label, grids in grid_sets:
        n = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(n, config.patch_dim, device=device, dtype=dtype)
        features = ("merged", "deepstack") if config.deepstack_visual_indexes else ("merged",)
        with torch.inference_mode():
            ref_time = timeit(lambda p=pixels, g=grids: reference_output(reference, p, g), device, args.warmup,
                              args.iters)
            vitok_time = timeit(lambda p=pixels, g=grids, f=features: model(p, g, features=f), device, args.warmup,
                                args.iters)
            expected = reference_output(reference, pixels, grids).float()
            got = model(pixels, grids, features=("merged",)).features["merged"].float()
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        flops = encoder_flops(config, grids)
        values = dict(depth=config.depth, images=len(grids), patches=n, ref_ms=ref_time * 1e3,
                      vitok_ms=vitok_time * 1e3, ratio=ref_time / vitok_time, vitok_tflops=flops / vitok_time / 1e12,
                      ref_tflops=flops / ref_time / 1e12, rel_err=error)
        if args.peak_flops:
            values["vitok_mfu"] = flops / vitok_time / args.peak_flops
            values["ref_mfu"] = flops / ref_time / args.peak_flops
        row("encoder", f"{label_prefix} {label} {str(dtype).removeprefix('torch.')}", **values)
        if device.type == "cpu":
            with torch.inference_mode(), settings.override(onednn="off"):
                default_time = timeit(lambda p=pixels, g=grids, f=features: model(p, g, features=f), device,
                                      args.warmup, args.iters)
            row("encoder", f"{label_prefix} {label}, vitok on torch's default CPU GEMM (VITOK_ONEDNN=off)",
                ref_ms=ref_time * 1e3, vitok_ms=default_time * 1e3, ratio=ref_time / default_time)



def grid_sets(device):
    if device.type == "cuda":
        return [("448x448 x32", [(1, 28, 28)] * 32),
                ("mixed x24 (448,640x480,256,1024x768)", [(1, 28, 28), (1, 30, 40), (1, 16, 16), (1, 48, 64)] * 6)]
    return [("4x768-patch", [(1, 24, 32)] * 4), ("mixed x4", [(1, 24, 32), (1, 16, 16), (1, 30, 40), (1, 20, 20)])]


def run(args, device, dtype) -> None:
    _run(args, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(args, device, dtype) -> None:
    if "encoder" in args.sections:
        config = shallow(args.preset, None if args.full else args.depth)
        bench_encoder(args, device, dtype, config, grid_sets(device), args.preset)
    if "encoder-full" in args.sections and device.type == "cpu" and not args.full:
        # the full-depth tower on a CPU: one 448x448 image through every block
        bench_encoder(args, device, dtype, shallow(args.preset, None), [("448x448 x1", [(1, 28, 28)])], args.preset)
    if "families" in args.sections:
        for name in args.families.split(","):
            config = shallow(name, None if args.full else args.depth)
            patch = config.patch_size
            grids = [(1, 448 // patch // 2 * 2, 448 // patch // 2 * 2)] * (8 if device.type == "cuda" else 2)
            bench_encoder(args, device, dtype, config, [(f"{len(grids)}x448", grids)], name)

#!/usr/bin/env python
"""Where one encoder forward spends its time: the top operators of a torch.profiler trace, vitok only.

    python scripts/profile_encoder.py                       # CPU, 2B width at depth 2, four 768-patch images
    python scripts/profile_encoder.py --device cuda --full  # GPU, full 2B tower in bf16, 32 x 448x448
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitok.encoder.config import EncoderConfig  # noqa: E402
from vitok.encoder.model import VisionEncoder, init_random_weights  # noqa: E402
from vitok.encoder.presets import get_preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="qwen3-vl-2b")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = get_preset(args.preset).encoder
    depth = preset.depth if args.full else 2
    config = EncoderConfig.from_dict({**preset.to_dict(), "depth": depth, "deepstack_visual_indexes": []})
    model = VisionEncoder(config)
    init_random_weights(model)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = model.to(device, dtype).eval()
    if cuda:
        model.set_attention("varlen")
    grids = [(1, 28, 28)] * 32 if cuda else [(1, 24, 32)] * 4
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), config.patch_dim, device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        for _ in range(2):
            model(pixels, grids, features=("merged",))
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities, record_shapes=True) as trace:
            model(pixels, grids, features=("merged",))
            if cuda:
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = trace.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.rows,
                                                                max_name_column_width=60)
    print(table)


if __name__ == "__main__":
    main()

"""Videos, against transformers on the same clips (encoded here with PyAV: ``--video-clips`` clips of
``--video-frames`` frames at ``--video-size``, 24 fps, h264):

    decode  vitok's video preprocessing (decode the sampled frames, resize, patchify) with each decoder, vs
            transformers' Qwen3VLVideoProcessor given the file (it decodes with torchcodec): videos/s, sampled
            frames/s and both per core, and the largest pixel difference from the reference's pixel_values
    e2e     ``vitok.extract`` over the clips (the preset's tower cut to ``--depth`` blocks, random weights, from a
            checkpoint folder both load) vs the loop a transformers user writes, per clip ``processor(videos=path)``
            then the tower: videos/s and sampled frames/s per core, and the largest difference of the merged tokens

The Qwen3-VL released video settings (2 fps, a budget of 25165824 pixels over frames x height x width).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .common import row

QWEN3_VIDEO = {"size": {"shortest_edge": 4096, "longest_edge": 25165824}, "patch_size": 16,
               "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_clips(folder: Path, count: int, frames: int, size: tuple[int, int]) -> list[Path]:
    """h264 clips of moving gradients and noise (something for the decoder and the resize to do)."""
    import av
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    paths = []
    for clip in range(count):
        path = folder / f"clip{clip:03d}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=24)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "veryfast", "g": "48"}
            for i in range(frames):
                pixels = np.stack([(x + 4 * i + 30 * clip) % 256, (y + 2 * i) % 256, ((x + y) // 3 + i) % 256], -1)
                pixels = (pixels + rng.integers(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def _processor():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**QWEN3_VIDEO)


def decode_section(clips: list[Path]) -> None:
    from ..inputs.preprocess import normalize_patches
    from ..inputs.video_config import VideoConfig
    from ..inputs.video_decode import unavailable
    from ..inputs.video_preprocess import VideoPreprocessor

    processor = _processor()
    processor(videos=[str(clips[0])], return_metadata=True, cap_pixels_per_frame=False)  # imports, first call
    start = time.perf_counter()
    reference = [processor(videos=[str(p)], return_metadata=True, return_tensors="pt", cap_pixels_per_frame=False)
                 for p in clips]
    reference_s = time.perf_counter() - start
    frames = sum(len(r["video_metadata"][0].frames_indices) for r in reference)
    cores = _cores()
    row("video", f"transformers' Qwen3VLVideoProcessor on {len(clips)} clip files (torchcodec)", videos_s=
        len(clips) / reference_s, frames_s=frames / reference_s, frames_s_per_core=frames / reference_s / cores)
    config = VideoConfig.from_hf_video_processor_config(QWEN3_VIDEO, "qwen3_vl")
    for decoder in ("torchcodec", "pyav"):
        if unavailable(decoder):
            print(f"# {decoder} unusable here ({unavailable(decoder)}): its row is skipped", flush=True)
            continue
        pre = VideoPreprocessor(config.replace(decoder=decoder))
        pre.load(str(clips[0]))
        start = time.perf_counter()
        prepared = [pre.load(str(p)) for p in clips]
        seconds = time.perf_counter() - start
        largest = max((normalize_patches(v.patches, config.pixels) - r["pixel_values_videos"]).abs().max().item()
                      if tuple(r["video_grid_thw"][0].tolist()) == v.grid_thw else float("inf")
                      for v, r in zip(prepared, reference))
        row("video", f"vitok decode + preprocess, --video-decoder {decoder}", videos_s=len(clips) / seconds,
            frames_s=frames / seconds, frames_s_per_core=frames / seconds / cores, ratio=reference_s / seconds,
            max_abs_diff=largest)


def e2e_section(args, device, dtype, clips: list[Path], tmp: Path) -> None:
    import numpy as np

    import vitok

    from .encoder import reference_and_vitok, shallow

    config = shallow(args.preset, None if args.full else args.depth)
    reference, _ = reference_and_vitok(config, device, dtype)
    checkpoint = tmp / "video-checkpoint"
    reference.float().save_pretrained(checkpoint)
    reference.to(dtype)
    (checkpoint / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VIDEO))
    dtype_name = str(dtype).removeprefix("torch.")
    folder = clips[0].parent
    start = time.perf_counter()
    summary = vitok.extract([str(folder)], tmp / "video-store", model=str(checkpoint), device=str(device),
                            dtype=dtype_name, features=("merged",), store_dtype="float32", overwrite=True,
                            **({"workers": args.workers} if args.workers is not None else {}))
    vitok_s = time.perf_counter() - start
    processor = _processor()
    start = time.perf_counter()
    loop_tokens, frames = [], 0
    with torch.inference_mode():
        for path in clips:
            out = processor(videos=[str(path)], return_metadata=True, return_tensors="pt", cap_pixels_per_frame=False)
            frames += len(out["video_metadata"][0].frames_indices)
            pixels = out["pixel_values_videos"].to(device, dtype)
            merged = reference(pixels, grid_thw=out["video_grid_thw"].to(device)).pooler_output
            loop_tokens.append(merged.float().cpu().numpy())
    loop_s = time.perf_counter() - start
    store = vitok.open(tmp / "video-store")
    largest = max(float(np.abs(store.get(p.name, "merged") - tokens).max()) for p, tokens in zip(clips, loop_tokens))
    cores = _cores()
    row("video", f"whole extraction, {len(clips)} clips of {args.video_frames} frames {args.video_size[0]}x"
        f"{args.video_size[1]}, {args.preset} depth {config.depth} {dtype_name}: vitok.extract (model load "
        "included) vs the transformers loop (processor + tower per clip)", vitok_s=vitok_s, loop_s=loop_s,
        ratio=loop_s / vitok_s, vitok_videos_s=summary.ok / vitok_s, vitok_frames_s_per_core=frames / vitok_s / cores,
        loop_frames_s_per_core=frames / loop_s / cores, max_abs_diff=largest)


def run(args, device, dtype, tmp: Path) -> None:
    try:
        import av  # noqa: F401
    except ImportError:
        print("# PyAV is not installed (the video extra): the video section is skipped", flush=True)
        return
    from ..inputs.video_decode import unavailable

    clips = make_clips(tmp / "clips", args.video_clips, args.video_frames, args.video_size)
    decode_section(clips)
    if unavailable("torchcodec"):
        print(f"# the e2e row needs torchcodec ({unavailable('torchcodec')}): skipped", flush=True)
        return
    e2e_section(args, device, dtype, clips, tmp)

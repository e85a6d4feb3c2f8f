"""Typed configuration of video preprocessing: which frames are sampled and how they become the encoder's patches.

As transformers' ``Qwen2VLVideoProcessor`` (Qwen2-VL, Qwen2.5-VL) and ``Qwen3VLVideoProcessor`` (Qwen3-VL, Qwen3.5)
read a checkpoint's ``video_preprocessor_config.json`` (or, lacking one, its ``preprocessor_config.json``): a field left
out takes the processor class's default (``VIDEO_PROCESSOR_DEFAULTS``). What differs between the two processors is the
``rule``: how frames are sampled and what the pixel budget ``size`` bounds (one frame for ``qwen2_vl``, every frame of
the clip together for ``qwen3_vl``). torch-free: the run decides with it before torch is imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UsageError
from .preprocess_config import CLIP_MEAN, CLIP_STD, PreprocessConfig

RULES = ("qwen2_vl", "qwen3_vl")
VIDEO_DECODERS = ("torchcodec", "pyav")
# patches of one video (t*h*w): its tokens are held until its record is written (its patches are not: long videos are
# cut in time, VIDEO_CHUNK_PATCHES at a time); 1048576 patches are 262144 merged tokens, 1 GiB at width 1024 in fp32
MAX_VIDEO_PATCHES = 1 << 20
MAX_VIDEO_FRAMES = 1_000_000  # frames a video file may claim (about 9 hours at 30 fps)
MAX_VIDEO_SECONDS = 36_000.0  # seconds a video file may claim to last (10 hours)
VIDEO_CHUNK_PATCHES = 1 << 16  # a video of more patches is decoded and encoded in pieces of about this many


def rule_of(family: str) -> str:
    """The video processor a model family ships with: Qwen2-VL and Qwen2.5-VL use Qwen2VLVideoProcessor, Qwen3-VL
    and Qwen3.5 Qwen3VLVideoProcessor (transformers' ``video_processing_auto``)."""
    return "qwen2_vl" if family in ("qwen2_vl", "qwen2_5_vl") else "qwen3_vl"


# transformers 5.24's class defaults of the two video processors (tests/test_video.py checks them against the classes)
VIDEO_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(
        size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, patch_size=14, temporal_patch_size=2,
        merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD, rescale_factor=1 / 255, resample=3, do_resize=True,
        do_rescale=True, do_normalize=True, do_convert_rgb=True, do_sample_frames=False, fps=None, num_frames=None,
        min_frames=4, max_frames=768, cap_pixels_per_frame=None, max_video_tokens=128000,
    ),
    "qwen3_vl": dict(
        size={"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, resample=3,
        do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, do_sample_frames=True, fps=2,
        num_frames=None, min_frames=4, max_frames=768, cap_pixels_per_frame=None, max_video_tokens=768,
    ),
}


@dataclass(frozen=True)
class VideoConfig:
    """How a video file becomes encoder patches.

    ``pixels`` holds the resize and normalisation settings (its ``min_pixels`` / ``max_pixels`` are the video
    processor's ``size.shortest_edge`` / ``size.longest_edge``: per frame for ``qwen2_vl``, for frames x height x
    width for ``qwen3_vl``); the rest is the sampling, the decoder and the limits that keep one video bounded.
    """

    rule: Literal["qwen2_vl", "qwen3_vl"]  # whose sample_frames and smart_resize
    pixels: PreprocessConfig
    do_sample_frames: bool  # False: every decoded frame (Qwen2-VL's class default)
    fps: float | None = None  # frames sampled per second of video (with do_sample_frames)
    num_frames: int | None = None  # or this many frames (exclusive with fps)
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False  # transformers' transition flag; None (its default) means False in 5.24
    max_video_tokens: int = 768  # the cap's parameter (Qwen3: tokens per frame; Qwen2: the model's context)
    decoder: Literal["torchcodec", "pyav"] = "torchcodec"  # the backend of transformers' load_video to match
    max_video_patches: int = MAX_VIDEO_PATCHES  # refuse videos whose sampled frames give more patches
    max_video_frames: int = MAX_VIDEO_FRAMES  # refuse files claiming more frames (a decompression bomb in time)
    # refuse files claiming to last longer (the same bomb, in seconds); None: MAX_VIDEO_SECONDS, and left out of the
    # header, as in the stores made before this limit (so that they resume)
    max_video_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UsageError(f"video rule {self.rule!r} is not one of: {', '.join(RULES)}")
        if self.decoder not in VIDEO_DECODERS:
            raise UsageError(f"--video-decoder {self.decoder!r} is not one of: {', '.join(VIDEO_DECODERS)}")
        if self.fps is not None and self.num_frames is not None:
            raise UsageError("--fps and --num-frames are exclusive (as in transformers' video processors); give one")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):  # nan and inf fail the sampler
            raise UsageError(f"--fps must be a positive finite number, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise UsageError(f"--num-frames must be at least 1, got {self.num_frames}")
        if self.max_video_seconds is not None and not (math.isfinite(self.max_video_seconds)
                                                      and self.max_video_seconds > 0):  # nan: no video refused
            raise UsageError(f"--max-video-seconds must be a positive finite number, got {self.max_video_seconds}")
        if self.min_frames > self.max_frames:
            raise UsageError(f"--min-frames {self.min_frames} is larger than --max-frames {self.max_frames}")
        if self.pixels.mode != "qwen":
            raise UsageError("videos are resized by the video processor's rule; --image-size does not apply to them")

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide a video's tokens besides ``pixels`` (stored in the header as ``video``)."""
        data = dataclasses.asdict(self)
        data.pop("pixels")
        if data["max_video_seconds"] is None:
            data.pop("max_video_seconds")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], pixels: PreprocessConfig) -> VideoConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"pixels"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown video config fields {unknown}; valid: {sorted(known)}")
        return cls(pixels=pixels, **data)

    def replace(self, **changes: Any) -> VideoConfig:
        """A copy with the changes that are not None (``fps`` and ``num_frames`` replace each other)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "num_frames" in changes and "fps" not in changes:
            changes["fps"] = None
        if "fps" in changes and "num_frames" not in changes:
            changes["num_frames"] = None
        if "fps" in changes or "num_frames" in changes:
            changes.setdefault("do_sample_frames", True)  # asking for a rate or a count is asking to sample
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_video_processor_config(cls, data: dict[str, Any] | None, rule: str,
                                       where: str = "video_preprocessor_config.json") -> VideoConfig:
        """A checkpoint's video processor settings (None: none shipped), read as transformers reads them: the class's
        defaults for what is left out; for ``qwen2_vl`` ``min_pixels`` / ``max_pixels`` override ``size``
        (``Qwen2VLVideoProcessor.__init__``), for ``qwen3_vl`` they are not read; a ``size`` replaces the default
        whole."""
        if rule not in RULES:
            raise UsageError(f"video rule {rule!r} is not one of: {', '.join(RULES)}")
        data = data or {}
        defaults = VIDEO_PROCESSOR_DEFAULTS[rule]
        hf = {**defaults, **{k: v for k, v in data.items() if v is not None or k in ("fps", "num_frames")}}
        size = dict(data["size"]) if data.get("size") is not None else dict(defaults["size"])
        if rule == "qwen2_vl":
            if data.get("min_pixels") is not None:
                size["shortest_edge"] = data["min_pixels"]
            if data.get("max_pixels") is not None:
                size["longest_edge"] = data["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise UsageError(f"{where}: size {data.get('size')} lacks shortest_edge or longest_edge; transformers' "
                             "video processor refuses every video then")
        image_like = {k: hf[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                         "rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize",
                                         "do_convert_rgb")}
        image_like["size"] = size
        pixels = PreprocessConfig.from_hf_preprocessor_config(image_like, PreprocessConfig(), where)
        if not pixels.do_resize:
            raise UsageError(f"{where}: do_resize false is not supported for videos (the reference patchifies the "
                             "frames at their decoded size)")
        fps = hf["fps"]
        num_frames = hf["num_frames"]
        if fps is not None and num_frames is not None:  # the processor raises on every video then
            raise UsageError(f"{where}: fps and num_frames are both set; transformers' video processor refuses that")
        return cls(rule=rule, pixels=pixels, do_sample_frames=bool(hf["do_sample_frames"]),
                   fps=None if fps is None else float(fps), num_frames=None if num_frames is None else int(num_frames),
                   min_frames=int(hf["min_frames"]), max_frames=int(hf["max_frames"]),
                   cap_pixels_per_frame=bool(hf["cap_pixels_per_frame"]), max_video_tokens=int(hf["max_video_tokens"]))

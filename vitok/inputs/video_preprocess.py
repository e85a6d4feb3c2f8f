"""A video file -> sampled frames -> uint8 video patches, exactly as transformers' Qwen video processors do it.

    metadata (frame count, fps: video_decode.py) -> frame indices (``sample_indices``: the rule's sample_frames)
      -> one target size for the whole clip (``video_target_size``: per frame for Qwen2-VL, over frames x height x
         width for Qwen3-VL, so it depends on how many frames are sampled)
      -> decode the sampled frames a few at a time, resize each (bicubic, antialiased, uint8: the torchvision
         backend's arithmetic), and cut each pair of frames into patches as soon as it is complete
      -> (t*h*w, C, 2, p, p) uint8 rows in the encoder's order (t, 2x2 merge blocks), the last frame repeated when
         the count is odd (the reference pads the same way); the device normalises them (``normalize_patches``)

A video of more patches than ``chunk_patches`` is cut in time (``load_pieces``): the sampling and the target size are
decided for the whole clip first (Qwen3-VL's size depends on how many frames are sampled), then pieces of whole
temporal steps are decoded, resized and patchified one after another, the last frame repeated only at the true end;
what is held is one piece's patches and a few decoded frames. The pieces' steps are a multiple of the steps the encoder
takes at a time (``group_patches``, its token budget), so the device encodes a cut video in the very calls it
encodes the whole one in (bit for bit the same tokens). A video whose sampled frames would give more than
``max_video_patches`` patches (its tokens are held until its record is written), whose frames are larger than
``max_image_pixels``, that claims more than ``max_video_frames`` frames or lasts more than ``max_video_seconds`` is
refused from its metadata, before any frame is decoded. Each refusal, and anything the
decoder cannot read, is an ImageError whose message is the record's one-line reason.

Timestamps are the reference's: a frame's time is its index over the source's average fps (24 when the file does
not say, as Qwen3-VL's processor assumes), and a temporal step's time is the mean of its first and last frame's
(Qwen3-VL's ``<t seconds>`` prompt text).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ImageError
from .decode import SourceFile, read_source_streamed
from .preprocess import PreparedImage, resize_like_torchvision, smart_resize
from .sources import is_url
from .video_config import MAX_VIDEO_SECONDS, VideoConfig
from .video_decode import VideoInfo, open_video

FRAMES_PER_READ = 8  # frames decoded per call to the decoder (the memory of a few decoded frames, not a clip's)
UNKNOWN_FPS = 24.0  # what Qwen3-VL's processor assumes when a file gives no frame rate


@dataclass
class SampledFrames:
    """Which frames of a video were taken and when, as the reference's VideoMetadata says after sampling."""

    frame_count: int  # frames in the file, as the decoder counts them (the sampler's total_num_frames)
    fps: float | None  # the file's average frame rate (None: unknown)
    duration: float | None  # seconds, as the decoder reports it
    indices: list[int]  # sampled frame ordinals, in order (may repeat when more frames are asked than there are)
    timestamps: list[float]  # seconds: index / fps (fps 24 when unknown)
    step_times: list[float]  # seconds, one per temporal step: mean of its first and last frame's time
    decoder: str  # torchcodec | pyav
    width: int = 0  # decoded frame size (torchcodec: after the file's rotation)
    height: int = 0


def sample_indices(config: VideoConfig, total: int, fps: float | None) -> np.ndarray:
    """Frame ordinals to decode, as the rule's ``sample_frames`` picks them (``video_processing_qwen2_vl.py`` /
    ``video_processing_qwen3_vl.py``); ImageError where the reference raises."""
    if total <= 0:
        raise ImageError("the video has no frames")
    if not config.do_sample_frames:  # the processor passes no sampler: load_video takes every frame
        return np.arange(total, dtype=np.int64)
    tps = config.pixels.temporal_patch_size
    if config.rule == "qwen2_vl":
        n: float | int | None = None
        if config.num_frames is not None:
            n = round(config.num_frames / tps) * tps
        elif config.fps is not None:
            if fps is None:
                raise ImageError("the file gives no frame rate, and Qwen2-VL's video processor needs one to sample "
                                 "by --fps (give --num-frames instead)")
            most = math.floor(min(config.max_frames, total) / tps) * tps
            n = min(max(total / fps * config.fps, config.min_frames), most, total)
            n = math.floor(n / tps) * tps
        if n is None:
            return np.arange(total, dtype=np.int64)
        if n > total:
            raise ImageError(f"{n} frames asked (--num-frames) but the video has {total}")
        if n <= 0:
            raise ImageError(f"no frames to sample: {total} frame(s) give {n} in multiples of {tps}")
        return torch.arange(0, total, total / n).int().numpy().astype(np.int64)  # float32 steps, as the reference
    n = config.num_frames
    if n is None and config.fps is not None:
        n = int(total / (fps if fps is not None else UNKNOWN_FPS) * config.fps)
        n = min(max(n, config.min_frames), config.max_frames, total)
    if n is None:
        n = min(max(total, config.min_frames), config.max_frames)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def video_smart_resize(frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video ``smart_resize``: the budget bounds frames x height x width (``beta`` with the unrounded
    frame count), sides below ``factor`` are first scaled up."""
    if frames < temporal_factor:
        raise ImageError(f"{frames} frame(s) sampled; Qwen3-VL's video processor needs at least {temporal_factor} "
                         "(extract a single frame as an image)")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200 ({width}x{height})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_target_size(config: VideoConfig, frames: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to (the rule's ``resize``, ``cap_pixels_per_frame`` included)."""
    pixels = config.pixels
    factor, tps = pixels.factor, pixels.temporal_patch_size
    shortest, longest = pixels.min_pixels, pixels.max_pixels
    if config.rule == "qwen2_vl":
        most = longest
        if config.cap_pixels_per_frame:
            total_pixels = int(config.max_video_tokens * factor * factor * 0.9)
            most = max(min(most, total_pixels * tps // frames), int(shortest * 1.05))
        return smart_resize(height, width, factor, shortest, most, pixels.max_aspect_ratio)
    most = longest
    if config.cap_pixels_per_frame:
        per_frame = max(min(config.max_video_tokens * factor * factor, longest // frames), int(shortest * 1.05))
        most = per_frame * frames
    return video_smart_resize(frames, height, width, tps, factor, shortest, most)


def step_times(timestamps: Sequence[float], tps: int) -> list[float]:
    """One time per temporal step: the mean of its first and last frame's time, the list padded with its last entry
    to a multiple of ``tps`` (Qwen3-VL's ``_calculate_timestamps``)."""
    times = list(timestamps)
    if len(times) % tps:
        times += [times[-1]] * (tps - len(times) % tps)
    return [(times[i] + times[i + tps - 1]) / 2 for i in range(0, len(times), tps)]


def patchify_step(frames: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """(T, C, H, W) frames of one temporal step -> (H/p * W/p, C, T, p, p), rows in merge-block order."""
    t, c, height, width = frames.shape
    gh, gw, p, m = height // patch_size, width // patch_size, patch_size, merge_size
    x = frames.reshape(t, c, gh // m, m, p, gw // m, m, p)  # (t, c, bh, mh, ph, bw, mw, pw)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (bh, bw, mh, mw, c, t, ph, pw)
    return x.reshape(gh * gw, c, t, p, p)


def frames_to_patches(frames, config: VideoConfig, size: tuple[int, int], count: int) -> torch.Tensor:
    """Sampled frames (an iterable of (C, H, W) uint8 tensors, ``count`` of them) -> (t*h*w, C, T, p, p) uint8
    patches: each frame resized to ``size`` as it comes, each temporal step cut as soon as it is complete."""
    pixels = config.pixels
    tps, p = pixels.temporal_patch_size, pixels.patch_size
    th, tw = size
    steps = -(-count // tps)
    per_step = (th // p) * (tw // p)
    patches = None
    step: list[torch.Tensor] = []
    done = received = 0
    for frame in frames:
        received += 1
        if frame.shape[0] != 3:
            raise ImageError(f"decoded frames have {frame.shape[0]} channels, not 3")
        step.append(resize_like_torchvision(frame.contiguous(), th, tw, pixels.resample))
        if patches is None:
            patches = torch.empty((steps * per_step, 3, tps, p, p), dtype=torch.uint8)
        if len(step) == tps:
            patches[done * per_step:(done + 1) * per_step] = patchify_step(torch.stack(step), p, pixels.merge_size)
            step, done = [], done + 1
    if received != count:
        raise ImageError(f"the decoder gave {received} of the {count} sampled frames")
    if step:  # an odd count: the last frame repeated, as the reference pads
        step += [step[-1]] * (tps - len(step))
        patches[done * per_step:(done + 1) * per_step] = patchify_step(torch.stack(step), p, pixels.merge_size)
        done += 1
    return patches


@dataclass(frozen=True)
class VideoPiece:
    """Where a piece of a video cut in time lies: its first temporal step, and the whole video's grid."""

    first_step: int
    video_grid: tuple[int, int, int]  # the whole video's (t, h, w)
    last: bool  # the piece that ends the video (its ``frames`` are set)


@dataclass
class PreparedVideo(PreparedImage):
    """One video ready for the encoder: ``patches`` are (t*h*w, C, T, p, p) uint8; ``frames`` says which. A piece
    of a video cut in time has ``piece`` set; its ``grid_thw`` is the piece's, ``frames`` set on the last only."""

    frames: SampledFrames | None = None
    piece: VideoPiece | None = None


def steps_per_piece(steps: int, per_step: int, chunk_patches: int | None, group_patches: int | None) -> int:
    """Temporal steps per piece of a video of ``steps`` steps of ``per_step`` patches: as many as ``chunk_patches``
    holds (at least one), rounded down to a multiple of the steps the encoder takes at a time (``group_patches`` //
    ``per_step``, ``Encoder.encode``), so that cutting never changes the encoder's calls; ``steps`` (one piece) when
    the video fits."""
    if chunk_patches is None or steps * per_step <= chunk_patches:
        return steps
    group = max(1, (group_patches or 1) // per_step)
    if steps * per_step <= (group_patches or 0):  # the encoder takes it whole: so must the decode
        return steps
    most = max(1, chunk_patches // per_step)
    return max(group, most // group * group)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class VideoPreprocessor:
    """Video file (a path) or its bytes (an archive member) -> :class:`PreparedVideo`. Picklable, so it runs the
    same in the decode workers."""

    per_chunk = 1  # videos per message from a decode worker: a chunk holds one video's (or piece's) patches
    stall_seconds = 3600.0  # a decode worker silent this long is taken as hung (a long video decodes for minutes)

    def __init__(self, config: VideoConfig, chunk_patches: int | None = None, group_patches: int | None = None
                 ) -> None:
        """``chunk_patches``: a video of more patches is decoded and sent in pieces of about this many
        (``load_pieces``; None: never cut); ``group_patches``: the encoder's token budget, whose step groups the
        pieces keep."""
        self.config, self.chunk_patches, self.group_patches = config, chunk_patches, group_patches

    def read(self, path: str) -> SourceFile:
        """A video file's size, time and sha256, hashed as it is read (never held whole); the decoder opens the
        file itself. A URL is streamed to a temporary local copy first (``readers.remote.fetch_to_temporary``:
        ``SourceFile.local``, removed by its ``close``)."""
        if is_url(path):
            from .readers.remote import fetch_to_temporary

            return fetch_to_temporary(path)
        return read_source_streamed(path)

    def plan(self, info: VideoInfo) -> tuple[np.ndarray, tuple[int, int]]:
        """The frame indices and the target size for a video with this metadata, or ImageError (refused from its
        metadata alone, before any frame is decoded)."""
        config, pixels = self.config, self.config.pixels
        if info.frame_count > config.max_video_frames:
            raise ImageError(f"refused: the file claims {info.frame_count} frames, more than --max-video-frames "
                             f"{config.max_video_frames} (a decompression bomb in time?; raise the limit to allow)")
        seconds = config.max_video_seconds or MAX_VIDEO_SECONDS
        if info.duration is not None and info.duration > seconds:
            raise ImageError(f"refused: the file claims {info.duration:.0f} seconds, more than --max-video-seconds "
                             f"{seconds:g} (a decompression bomb in time?; raise the limit to allow)")
        if info.width <= 0 or info.height <= 0:
            raise ImageError(f"video frames have no pixels ({info.width}x{info.height})")
        if info.width * info.height > pixels.max_image_pixels:
            raise ImageError(f"refused: {info.width}x{info.height} = {info.width * info.height} pixels per frame "
                             f"exceeds the limit of {pixels.max_image_pixels} (raise --max-image-pixels to allow)")
        indices = sample_indices(config, info.frame_count, info.fps)
        th, tw = video_target_size(config, len(indices), info.height, info.width)
        tps, p = pixels.temporal_patch_size, pixels.patch_size
        patches = -(-len(indices) // tps) * (th // p) * (tw // p)
        if patches > config.max_video_patches:
            raise ImageError(f"refused: {len(indices)} sampled frames at {tw}x{th} give {patches} patches, more than "
                             f"--max-video-patches {config.max_video_patches} (sample fewer frames with --fps, "
                             "--num-frames or --max-frames, or raise the limit)")
        return indices, (th, tw)

    def load(self, source: str | bytes) -> PreparedVideo:
        """Decode, sample and patchify one video whole; raises ImageError with a one-line reason."""
        with self._opened(source) as (video, indices, size):
            patches = frames_to_patches(video.frames(indices.tolist(), FRAMES_PER_READ), self.config, size,
                                        len(indices))
            return self._prepared(patches, video.info, indices, size)

    def load_pieces(self, source: str | bytes) -> Iterator[PreparedVideo]:
        """The video whole (one ``PreparedVideo``, ``piece`` None) when it fits ``chunk_patches``, else its pieces in
        time order (``steps_per_piece`` steps each, the last one carrying ``frames``); ImageError with a one-line
        reason, raised before the first piece or between two (a stream that ends early)."""
        with self._opened(source) as (video, indices, size):
            pixels = self.config.pixels
            tps, p = pixels.temporal_patch_size, pixels.patch_size
            steps, per_step = -(-len(indices) // tps), (size[0] // p) * (size[1] // p)
            each = steps_per_piece(steps, per_step, self.chunk_patches, self.group_patches)
            if each >= steps:
                patches = frames_to_patches(video.frames(indices.tolist(), FRAMES_PER_READ), self.config, size,
                                            len(indices))
                yield self._prepared(patches, video.info, indices, size)
                return
            frames = video.frames(indices.tolist(), FRAMES_PER_READ)  # one pass over the file, consumed piece by piece
            grid = (steps, size[0] // p, size[1] // p)
            for first in range(0, steps, each):
                count = min(len(indices), (first + each) * tps) - first * tps  # even, but at the true end
                patches = frames_to_patches(itertools.islice(frames, count), self.config, size, count)
                last = first + each >= steps
                piece = PreparedVideo(patches, (len(patches) // per_step, *grid[1:]), (video.info.width,
                                      video.info.height), decoder=self.config.decoder,
                                      piece=VideoPiece(first, grid, last))
                if last:
                    whole = self._prepared(None, video.info, indices, size)
                    piece.notes, piece.frames = whole.notes, whole.frames
                del patches  # held by the piece only: once it is sent, nothing here keeps it
                yield piece
                del piece

    def _opened(self, source: str | bytes):
        """The open video, its sampled indices and target size (refused from its metadata before any decoding)."""
        empty = len(source) == 0 if isinstance(source, (bytes, bytearray, memoryview)) else _size(source) == 0
        if empty:
            raise ImageError("empty file (0 bytes)")
        return _Opened(open_video(source, self.config.decoder), self)

    def _prepared(self, patches, info: VideoInfo, indices: np.ndarray, size: tuple[int, int]) -> PreparedVideo:
        pixels = self.config.pixels
        th, tw = size
        fps = info.fps if info.fps else None
        times = [int(i) / (fps or UNKNOWN_FPS) for i in indices]
        notes = list(info.notes)
        if fps is None:
            notes.append(f"the file gives no frame rate: times assume {UNKNOWN_FPS:g} fps, as the reference")
        sampled = SampledFrames(info.frame_count, fps, info.duration, [int(i) for i in indices], times,
                                step_times(times, pixels.temporal_patch_size), self.config.decoder, info.width,
                                info.height)
        grid = (-(-len(indices) // pixels.temporal_patch_size), th // pixels.patch_size, tw // pixels.patch_size)
        return PreparedVideo(patches, grid, (info.width, info.height), notes, self.config.decoder, frames=sampled)


class _Opened:
    """``with``: the video opened and planned, closed on the way out (a generator's end or its error included)."""

    def __init__(self, video, preprocessor: VideoPreprocessor) -> None:
        self.video, self.preprocessor = video, preprocessor

    def __enter__(self):
        try:
            indices, size = self.preprocessor.plan(self.video.info)
        except BaseException:
            self.video.close()
            raise
        return self.video, indices, size

    def __exit__(self, *exc) -> None:
        self.video.close()

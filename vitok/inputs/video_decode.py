"""Open a video file (a path, or its bytes) and decode chosen frames to RGB, as transformers' ``load_video`` does with
the same backend, or fail with a one-line reason.

    torchcodec  ``read_video_torchcodec``: ``VideoDecoder(seek_mode="exact", num_ffmpeg_threads=0)``; frame count and
                fps from its exact scan (``num_frames``, ``average_fps``); the file's rotation applied; frames by
                ``get_frames_at``. FFmpeg's shared libraries must be installed (Debian's ``ffmpeg`` package).
                transformers' video processors decode every path with it.
    pyav        ``read_video_pyav``: frame count and fps from the stream header (``frames``, ``average_rate``),
                frames decoded in order from the first and converted with ``to_ndarray("rgb24")``; rotation not
                applied. Its FFmpeg is bundled. One difference, where the reference cannot read the file at all:
                containers whose header gives no frame count (webm, mkv; ``load_video`` fails on them with an
                IndexError) are counted by their video packets.

Frames come a few at a time (``frames(indices, per_read)``), never a whole clip at once. Everything a decoder raises
becomes ImageError (``VideoError``): a truncated file, a file with no video stream, an empty stream.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ImageError, UsageError

logger = logging.getLogger(__name__)


class VideoError(ImageError):
    """One video that cannot be decoded; the message is its one-line reason (recorded as skipped)."""


@dataclass
class VideoInfo:
    """A video stream as the backend describes it (the sampler's ``VideoMetadata``)."""

    frame_count: int  # the sampler's total_num_frames
    fps: float | None  # average frame rate (None or 0: unknown)
    duration: float | None  # seconds
    width: int  # of the decoded frames (torchcodec: after rotation)
    height: int
    codec: str | None = None
    notes: list[str] = field(default_factory=list)


_SOURCE_LOCATION = re.compile(r"^\w+, \S+\.(?:cpp|h|c):\d+, ")  # torchcodec's "Class, file.cpp:41, " prefix


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {_SOURCE_LOCATION.sub('', text[0])}" if text else type(exc).__name__


class OpenVideo(ABC):
    """An opened video: its ``info``, and its frames by ordinal."""

    info: VideoInfo

    @abstractmethod
    def frames(self, indices: Sequence[int], per_read: int = 8) -> Iterator[torch.Tensor]:
        """One (3, H, W) uint8 RGB frame per index, in the order given (non-decreasing; a repeated index repeats
        its frame)."""

    @abstractmethod
    def close(self) -> None:
        """Release the decoder."""

    def __enter__(self) -> OpenVideo:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchcodecVideo(OpenVideo):
    def __init__(self, source: str | bytes) -> None:
        from torchcodec.decoders import VideoDecoder

        self._file = None
        if isinstance(source, str) and not _utf8(source):
            # torchcodec passes a path to C++ as UTF-8 and cannot take a name that is not (a file name's bytes
            # decoded with surrogateescape, as os.listdir gives them): the same file, opened here, decodes the same
            try:
                self._file = open(source, "rb")  # noqa: SIM115  (closed in close())
            except OSError as exc:
                raise VideoError(f"cannot open as a video: {_one_line(exc)}") from None
        try:
            self._decoder = VideoDecoder(self._file if self._file is not None else source if isinstance(source, str)
                                         else bytes(source), seek_mode="exact", num_ffmpeg_threads=0, device="cpu")
            meta = self._decoder.metadata
        except Exception as exc:
            self.close()
            raise VideoError(_opening_reason(exc)) from None
        notes = []
        if meta.rotation:
            notes.append(f"rotation {meta.rotation:g} degrees applied (as torchcodec does)")
        self.info = VideoInfo(int(meta.num_frames or 0), float(meta.average_fps) if meta.average_fps else None,
                              float(meta.duration_seconds) if meta.duration_seconds is not None else None,
                              int(meta.width or 0), int(meta.height or 0), meta.codec, notes)

    def frames(self, indices: Sequence[int], per_read: int = 8) -> Iterator[torch.Tensor]:
        for start in range(0, len(indices), per_read):
            try:
                batch = self._decoder.get_frames_at(indices=list(indices[start:start + per_read])).data
            except Exception as exc:
                raise VideoError(f"cannot decode frame {indices[start]}..: {_one_line(exc)}") from None
            yield from batch

    def close(self) -> None:
        self._decoder = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class PyAVVideo(OpenVideo):
    def __init__(self, source: str | bytes) -> None:
        import av

        try:
            self._container = av.open(source if isinstance(source, str) else io.BytesIO(bytes(source)))
        except Exception as exc:
            raise VideoError(_opening_reason(exc)) from None
        try:
            if not self._container.streams.video:
                audio = " (the file holds audio only)" if self._container.streams.audio else ""
                raise VideoError(f"no video stream{audio}")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: the same frames, sooner
            notes = []
            total = int(stream.frames)
            if total == 0:  # webm, mkv: no count in the header (transformers' load_video fails here)
                total = sum(1 for packet in self._container.demux(stream) if packet.size)
                self._container.seek(0)
                notes.append("frame count not in the container's header: counted from its packets")
            fps = stream.average_rate
            self.info = VideoInfo(total, float(fps) if fps else None, float(total / fps) if fps else 0.0,
                                  int(stream.width), int(stream.height), stream.codec_context.name, notes)
        except VideoError:
            self._container.close()
            raise
        except Exception as exc:
            self._container.close()
            raise VideoError(_opening_reason(exc)) from None

    def frames(self, indices: Sequence[int], per_read: int = 8) -> Iterator[torch.Tensor]:
        if not len(indices):
            return
        wanted = list(indices)
        position, number = 0, -1
        try:
            self._container.seek(0)
            for number, frame in enumerate(self._container.decode(video=0)):
                if number > wanted[-1]:
                    break
                if number != wanted[position]:
                    continue
                pixels = torch.from_numpy(np.ascontiguousarray(frame.to_ndarray(format="rgb24"))).permute(2, 0, 1)
                while position < len(wanted) and wanted[position] == number:
                    yield pixels
                    position += 1
                if position == len(wanted):
                    return
        except VideoError:
            raise
        except Exception as exc:
            raise VideoError(f"cannot decode frame {wanted[position]}: {_one_line(exc)}") from None
        raise VideoError(f"the stream ended after {number + 1} frames; frame {wanted[position]} was asked for (a "
                         "truncated file?)")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._container.close()


def _opening_reason(exc: BaseException) -> str:
    text = str(exc)
    if "best video stream" in text or "No video stream" in text:
        return "no video stream (an audio-only file, or not a video)"
    return f"cannot open as a video: {_one_line(exc)}"


DECODERS = {"torchcodec": TorchcodecVideo, "pyav": PyAVVideo}


@functools.cache
def unavailable(decoder: str) -> str | None:
    """Why ``decoder`` cannot run here (its package, or FFmpeg's shared libraries for torchcodec), None when it can."""
    if decoder not in DECODERS:
        return f"unknown video decoder {decoder!r}; decoders: {', '.join(DECODERS)}"
    try:
        if decoder == "torchcodec":
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg's libraries)
        else:
            import av  # noqa: F401
    except Exception as exc:
        hint = ("pip install torchcodec, and FFmpeg's shared libraries (Debian/Ubuntu: apt-get install ffmpeg)"
                if decoder == "torchcodec" else "pip install av")
        return f"{decoder} cannot be loaded ({_one_line(exc)}); {hint}"
    return None


def check_decoder(decoder: str) -> None:
    """UsageError naming what to install when ``decoder`` cannot run here."""
    reason = unavailable(decoder)
    if reason is not None:
        other = next(name for name in DECODERS if name != decoder)
        raise UsageError(f"--video-decoder {decoder}: {reason} (or pass --video-decoder {other})")


def open_video(source: str | bytes, decoder: str = "torchcodec") -> OpenVideo:
    """Open a video file or its bytes with ``decoder``; VideoError with the reason when it cannot be read."""
    reason = unavailable(decoder)
    if reason is not None:
        raise VideoError(reason)
    return DECODERS[decoder](source)

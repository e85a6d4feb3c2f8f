"""RGB image -> encoder input, exactly as transformers' Qwen2-VL/Qwen3-VL image processor does it.

The work is split where it is cheapest to move: a DataLoader worker turns a file into **uint8 patches** in the
encoder's row order (decode, resize, patchify); the device then turns them into float pixels (rescale, normalise,
repeat to T frames). uint8 is a quarter of the bytes of float32, and the arithmetic is the same IEEE float32
either side, so the result equals the reference's ``pixel_values`` wherever it runs.

Qwen mode (``PreprocessConfig.mode == "qwen"``):
    smart_resize to multiples of patch*merge within [min_pixels, max_pixels] (Python's banker's rounding,
    aspect ratio <= 200), bicubic antialiased resize of the uint8 image (torchvision backend, the reference's
    default; PIL backend on request), (x - mean*255) / (std*255) in float32, the frame repeated T times,
    rows in 2x2 merge-block order, each row flattened as (C, T, p, p).
Fixed mode: resize to image_size x image_size; otherwise the same.
"""

from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from .decode import DecodedImage, SourceFile, decode_image, load_any_image, read_source
from .preprocess_config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, max_ratio: float = 200.0
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > max_ratio:
        raise ImageError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {max_ratio:g} ({width}x{height})"
        )
    h_bar = round(height / factor) * factor  # round() is banker's rounding, as in the reference
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(config: PreprocessConfig, height: int, width: int) -> tuple[int, int]:
    """Resized (height, width) for an upright image of the given size."""
    if config.mode == "fixed":
        return int(config.image_size), int(config.image_size)
    if not config.do_resize:  # the reference patchifies the image as it is; a size off the grid fails its reshape
        if height % config.factor or width % config.factor:
            raise ImageError(f"{width}x{height} is not a multiple of {config.factor} (patch {config.patch_size} x "
                             f"merge {config.merge_size}) and the preprocessing does not resize (do_resize false)")
        return height, width
    return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels, config.max_aspect_ratio)


def resize_uint8(
    image: Image.Image, height: int, width: int, config: PreprocessConfig, pixels: np.ndarray | None = None
) -> torch.Tensor:
    """RGB PIL image -> (3, height, width) uint8 tensor, as the reference's backend resizes it.

    ``pixels``: the image's (H, W, 3) uint8 array when there is one already (saves a copy on the torchvision path).
    """
    if config.backend == "pil":
        resample = Image.Resampling.BICUBIC if config.resample == "bicubic" else Image.Resampling.BILINEAR
        return torch.from_numpy(np.array(image.resize((width, height), resample=resample))).permute(2, 0, 1)
    array = pixels if pixels is not None else np.array(image, dtype=np.uint8)
    return resize_like_torchvision(torch.from_numpy(array).permute(2, 0, 1), height, width, config.resample)


def resize_like_torchvision(pixels: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """torchvision's ``v2.functional.resize(uint8, antialias=True)`` on the CPU, call for call, without importing
    torchvision (its import costs seconds in every decode worker): an unchanged size returns the image; bicubic (and
    bilinear on AVX2/AVX-512/ARM) resizes the uint8 image natively, else in float32 with clamp and round; a
    channels-last single image keeps its layout. The tests compare it with torchvision bit for bit."""
    c, old_h, old_w = pixels.shape
    if (height, width) == (old_h, old_w):
        return pixels
    native = pixels.device.type == "cpu" and (  # off the CPU torchvision resizes in float32
        mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64"))
    image = pixels.reshape(-1, c, old_h, old_w)
    strides = image.stride()
    if image.is_contiguous(memory_format=torch.channels_last) and image.shape[0] == 1 and pixels.numel() != strides[0]:
        image = image.as_strided((1, c, old_h, old_w), [pixels.numel(), *strides[1:]])
    if not native:
        image = image.to(torch.float32)
    image = torch.nn.functional.interpolate(image, size=[height, width], mode=mode, align_corners=False,
                                            antialias=True)
    if not native:
        if mode == "bicubic":
            image = image.clamp_(min=0, max=255)
        image = image.round_().to(torch.uint8)
    return image.reshape(c, height, width)


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, C, p, p), rows in merge-block order (raster order when merge_size is 1)."""
    c, height, width = pixels.shape
    gh, gw, p, m = height // patch_size, width // patch_size, patch_size, merge_size
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)  # (c, bh, mh, ph, bw, mw, pw)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, c, ph, pw)
    return x.reshape(gh * gw, c, p, p)


@functools.cache
def _channel_constants(
    fused: bool, image_mean: tuple[float, ...], image_std: tuple[float, ...], rescale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 mean and std as the backend applies them, made once per device: a tensor built from
    Python numbers on a GPU is a blocking copy, which would wait for every batch already queued."""
    mean = torch.tensor(image_mean, dtype=torch.float32)
    std = torch.tensor(image_std, dtype=torch.float32)
    if fused:  # rescale folded into the constants, as the reference's fused normalize
        mean, std = mean * (1.0 / rescale), std * (1.0 / rescale)
    return tuple(t.view(1, -1, 1, 1).to(device) for t in (mean, std))


def normalize_patches(patches: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (N, C, p, p) -> float32 (N, C*T*p*p) pixel_values, on whatever device the patches are; a video's
    (N, C, T, p, p) patches keep their own T frames (an image's one frame is repeated T times).

    torchvision backend: rescale and normalise fused, (x - mean/rescale) / (std/rescale), as the reference.
    PIL backend: float32(x * rescale), then (x - mean) / std, as the reference's NumPy path.
    Either step may be off (``do_rescale`` / ``do_normalize``), as in the reference; with both off the pixels are the
    uint8 values, which the reference's tower casts to its dtype.
    """
    frames = patches.shape[2] if patches.ndim == 5 else None  # a video's rows hold their own frames
    if frames is not None:
        patches = patches.reshape(patches.shape[0], patches.shape[1], frames * patches.shape[3], patches.shape[4])
    n, c, p, _ = patches.shape
    pil = config.backend == "pil"
    if config.do_rescale and (pil or not config.do_normalize):
        if pil:  # NumPy: float64 product, rounded to float32
            x = (patches.to(torch.float64) * config.rescale_factor).to(torch.float32)
        else:  # torchvision: uint8 tensor times a Python float
            x = patches * config.rescale_factor
    else:
        x = patches.to(torch.float32)
    if config.do_normalize:
        mean, std = _channel_constants(config.do_rescale and not pil, tuple(config.image_mean),
                                       tuple(config.image_std), config.rescale_factor, patches.device)
        x = x.sub_(mean).div_(std)
    if frames is not None:  # (N, C, T*p, p) -> (N, C*T*p*p): columns (c, t, ph, pw), as the reference
        return x.reshape(n, -1)
    t = config.temporal_patch_size
    return x[:, :, None].expand(n, c, t, p, p).reshape(n, c * t * p * p)


@dataclass
class PreparedImage:
    """One image ready for the encoder, as produced in a DataLoader worker."""

    patches: torch.Tensor | None  # (t*h*w, C, p, p) uint8, merge-block order; None until the GPU decodes ``jpeg``
    grid_thw: tuple[int, int, int]  # in patches
    original_size: tuple[int, int]  # (width, height), upright
    notes: list[str] = field(default_factory=list)
    decoder: str = "pillow"  # what produced the pixels (decode.DecodedImage.decoder)
    jpeg: bytes | None = None  # --decode gpu: the file's bytes, decoded on the device

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def pin_memory(self) -> PreparedImage:
        """Called by ``types.Chunk.pin_memory`` (on the loop's side), so the copy to the GPU can be asynchronous."""
        if self.patches is not None:
            self.patches = self.patches.pin_memory()
        return self


class Preprocessor:
    """File or image -> :class:`PreparedImage`. Picklable, so it runs the same in DataLoader workers."""

    per_chunk = 8  # images per message from a decode worker

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config

    def read(self, path: str) -> SourceFile:
        """A loose input file's bytes (``decode.read_source``)."""
        return read_source(path)

    def _draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        try:
            h, w = target_size(self.config, height, width)
        except ImageError:
            return None
        return w, h

    def load(self, source) -> PreparedImage:
        """Decode and prepare one file (a path) or image file's bytes; raises ImageError with a one-line reason.
        With ``decode="gpu"``, a JPEG the GPU can decode is returned undecoded, its bytes in ``jpeg``."""
        if self.config.decode == "gpu" and isinstance(source, (bytes, bytearray)):
            from .gpu_decode import gpu_route

            routed = gpu_route(bytes(source), self.config)
            if routed is not None:
                return routed
        decoded = decode_image(
            source,
            max_image_pixels=self.config.max_image_pixels,
            allow_truncated=self.config.allow_truncated,
            draft_size=self._draft_size if self.config.fast_decode else None,
        )
        return self.prepare(decoded)

    def prepare(self, decoded) -> PreparedImage:
        """A DecodedImage, or a path / PIL image / uint8 array (the original API's inputs)."""
        if not isinstance(decoded, DecodedImage):
            rgb = load_any_image(decoded)
            decoded = DecodedImage(rgb, rgb.size, mode=getattr(decoded, "mode", "RGB"))
        if not self.config.do_convert_rgb and decoded.mode != "RGB":
            raise ImageError(f"a {decoded.mode} image, and the preprocessing does not convert to RGB (do_convert_rgb "
                             "false): the reference processor cannot normalise it with its RGB mean and std")
        width, height = decoded.original_size
        th, tw = target_size(self.config, height, width)
        pixels = resize_uint8(decoded.image, th, tw, self.config, decoded.pixels)
        patches = patchify(pixels, self.config.patch_size, self.config.merge_size)
        grid = (1, th // self.config.patch_size, tw // self.config.patch_size)
        return PreparedImage(patches.contiguous(), grid, decoded.original_size, list(decoded.notes), decoded.decoder)

    def pixel_values(self, prepared: PreparedImage) -> torch.Tensor:
        return normalize_patches(prepared.patches, self.config)


class ImagePreprocessor:
    """The original API: resize to ``img_size`` x ``img_size``, ImageNet mean/std, (1, 3, H, W) float tensor.

    >>> ImagePreprocessor(img_size=224).preprocess("photo.jpg").shape
    torch.Size([1, 3, 224, 224])
    """

    def __init__(
        self,
        img_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        resample: str = "bilinear",
    ) -> None:
        self.img_size = img_size
        self.config = PreprocessConfig(
            mode="fixed",
            image_size=img_size,
            patch_size=1,
            merge_size=1,
            temporal_patch_size=1,
            image_mean=tuple(mean),
            image_std=tuple(std),
            resample=resample,
        )

    def preprocess(self, image) -> torch.Tensor:
        """A path, PIL image or uint8 array (H x W x 3 or H x W) -> (1, 3, img_size, img_size) float32."""
        rgb = load_any_image(image)
        pixels = resize_uint8(rgb, self.img_size, self.img_size, self.config)  # (3, S, S) uint8
        mean = torch.tensor(self.config.image_mean) * 255.0
        std = torch.tensor(self.config.image_std) * 255.0
        return ((pixels.float() - mean.view(3, 1, 1)) / std.view(3, 1, 1)).unsqueeze(0)

    __call__ = preprocess

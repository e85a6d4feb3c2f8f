"""Opt-in JPEG decoding on the GPU (``--decode gpu``): nvJPEG through torchvision, then the resize and the patches
made on the GPU; the decode workers only read bytes and headers.

It changes pixels (nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's, and the resize runs in float32 on
the GPU as torchvision's does), so exact decoding stays the default and each record names its decoder (``nvjpeg``).
Which images go to the GPU is decided from the header alone: baseline JPEGs in YCbCr or grayscale without an EXIF
rotation (torchvision's CUDA decoder ignores EXIF). Progressive and CMYK JPEGs, other formats, and any image the GPU
decoder rejects take the exact CPU path for that image: never a lost image.
"""

from __future__ import annotations

import io
import logging
import warnings

import torch
from PIL import Image

from ..errors import ImageError
from .decode import ORIENTATION_TAG, pillow_limit
from .preprocess import PreparedImage, Preprocessor, patchify, resize_like_torchvision, target_size
from .preprocess_config import PreprocessConfig

logger = logging.getLogger(__name__)


def gpu_route(data: bytes, config: PreprocessConfig) -> PreparedImage | None:
    """A placeholder image (bytes, grid, no patches yet) when the GPU may decode it; None for the exact path."""
    try:
        with pillow_limit(config.max_image_pixels), Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.info.get("progressive") or img.info.get("progression"):
                return None
            orientation = img.getexif().get(ORIENTATION_TAG)
            if orientation not in (None, 1):
                return None
            width, height = img.size
    except Exception:  # anything odd: the exact path decides and gives the reason
        return None
    if width * height > config.max_image_pixels:
        return None  # the exact path refuses it with its reason
    try:
        th, tw = target_size(config, height, width)
    except ImageError:
        return None
    grid = (1, th // config.patch_size, tw // config.patch_size)
    return PreparedImage(None, grid, (width, height), [], decoder="nvjpeg", jpeg=data)


_decode_streams: dict[torch.device, torch.cuda.Stream] = {}


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched decode. On CUDA it runs with a stream of its own made current, for a torchvision bug
    (pytorch/vision#9606): the decoder allocates its outputs on the *current* stream, then has nvJPEG write them
    from a private stream that does not wait for the current one. The caching allocator hands out a block as soon as
    it is freed on its stream, so on the run's stream, with the previous batches' encoder still queued, the decoder
    could be given memory those kernels had yet to read, and overwrite it: another image's tokens came out wrong
    (one merged token at cosine 0.53 in a 3,072-image run), never in a test that decoded alone. Blocks allocated on
    the decode stream are only ever reused by later decodes, and only once the run's stream is done with them
    (``record_stream``); the run's stream waits for the decode on the device, never on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 announces its decoders' move to torchcodec
        if device.type != "cuda":
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        side = _decode_streams.get(device)
        if side is None:
            side = _decode_streams[device] = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        with torch.cuda.stream(side):
            decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        main.wait_stream(side)
        for tensor in decoded:
            tensor.record_stream(main)
        return decoded


def decode_on_device(images: list[PreparedImage], config: PreprocessConfig, device: torch.device
                     ) -> list[str | None]:
    """Fill in the patches of images routed to the device: one batched decode, then resize and patchify there.
    An image the decoder rejects is decoded on the CPU, exactly. Returns, per image, None or the reason it cannot
    be used at all (the exact path refused it too)."""
    raw = [torch.frombuffer(bytearray(image.jpeg), dtype=torch.uint8) for image in images]
    try:
        decoded: list[torch.Tensor | None] = list(_decode(raw, device))
    except Exception:  # one bad image fails the batch: decode them one by one
        decoded = []
        for tensor in raw:
            try:
                decoded.append(_decode([tensor], device)[0])
            except Exception:
                decoded.append(None)
    exact = Preprocessor(config.replace(decode="exact"))
    reasons: list[str | None] = []
    for image, pixels in zip(images, decoded):
        reason = None
        if pixels is None or tuple(pixels.shape[-2:]) != (image.original_size[1], image.original_size[0]):
            try:
                fallback = exact.load(image.jpeg)
                image.patches, image.grid_thw, image.decoder = fallback.patches, fallback.grid_thw, fallback.decoder
                image.notes.append("the GPU decoder refused this JPEG: decoded exactly on the CPU")
            except ImageError as exc:
                reason = str(exc)
        else:
            _, h, w = image.grid_thw
            resized = resize_like_torchvision(pixels, h * config.patch_size, w * config.patch_size, config.resample)
            image.patches = patchify(resized, config.patch_size, config.merge_size).contiguous()
        image.jpeg = None
        reasons.append(reason)
    return reasons


class DeviceDecode:
    """``--decode gpu`` as a step of the device stage: of a batch's items, those whose JPEG was left to the device
    come back with patches (and their records completed), or are removed with their records marked skipped."""

    def __init__(self, config: PreprocessConfig, device: torch.device) -> None:
        self.config, self.device = config, device

    def __call__(self, items: list) -> tuple[list, list]:
        undecoded = [item for item in items if item.image.jpeg is not None]
        if not undecoded:
            return items, []
        reasons = decode_on_device([item.image for item in undecoded], self.config, self.device)
        failed = []
        for item, reason in zip(undecoded, reasons):
            item.record.decoder, item.record.grid = item.image.decoder, list(item.image.grid_thw)
            item.record.notes = item.image.notes or None
            if reason is not None:
                item.record.status, item.record.reason = "skipped", reason
                failed.append(item.record)
        return [item for item in items if item.image.patches is not None], failed


def device_decode(config: PreprocessConfig, device: torch.device) -> DeviceDecode | None:
    """The device stage's decode step for these settings (None unless ``--decode gpu``)."""
    return DeviceDecode(config, device) if config.decode == "gpu" else None

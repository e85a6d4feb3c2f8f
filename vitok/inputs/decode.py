"""Decode one image file into RGB pixels a user would expect, or fail with a one-line reason.

Every input either yields an RGB image or raises :class:`~vitok.errors.ImageError`; nothing else escapes, so a
batch job can record the reason and go on. What "expected" means here:

- EXIF orientation applied (as transformers' ``load_image`` does);
- alpha (RGBA, LA, premultiplied, palette transparency) composited onto white, like the reference;
- CMYK, palette, 1-bit and grayscale converted to RGB; 16-bit and 32-bit integer images *scaled* to 8 bits
  (the reference clips them, turning most pixels white: a deliberate difference), unless their values all fit in
  8 bits (mode ``I``); floats in [0, 1] scaled by 255 (see ``_high_depth_to_uint8``);
- the first frame of an animation;
- the pixel count checked from the header before any decoding (decompression bombs are refused);
- truncated files refused unless ``allow_truncated``, in which case the notes say so;
- library warnings (palette transparency, odd EXIF) are kept as notes, never turned into failures.

Baseline and progressive JPEGs (YCbCr 4:4:4 / 4:2:2 / 4:2:0, or grayscale) are decoded by simplejpeg, which calls
libjpeg-turbo directly with the same settings as Pillow (accurate integer IDCT, smooth chroma upsampling) into a
numpy array that the resize reads without copying: the same pixels, with one copy and Pillow's image object less
per image (docs/performance.md has the measurement). At first use a set of JPEGs is decoded both ways and the
direct path is kept only if every pixel agrees; ``VITOK_SIMPLEJPEG=0`` turns it off. Anything else, and any file it
cannot decode (truncated, damaged), goes through Pillow, which gives the reason.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .. import settings
from ..errors import ImageError, InputUnavailableError

logger = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112  # EXIF Orientation
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRUNCATED_LOCK = threading.Lock()  # LOAD_TRUNCATED_IMAGES is a Pillow global
_LIMIT_LOCK = threading.Lock()  # MAX_IMAGE_PIXELS is a Pillow global too
_raised: list[int] = []  # the limits of the decodes that raised Pillow's now (their Pillow values)
_pillow_default: int | None = None  # Pillow's value before the first of them


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, upright
    original_size: tuple[int, int]  # (width, height) upright, before any reduced-scale decoding
    notes: list[str] = field(default_factory=list)  # things worth recording that are not failures
    pixels: np.ndarray | None = None  # (H, W, 3) uint8, the same pixels as ``image`` when it is a view of them
    decoder: str = "pillow"  # what produced the pixels: pillow | pillow-draft | simplejpeg
    mode: str = "RGB"  # the file's Pillow mode before the conversion to RGB (L, RGBA, P, CMYK, I;16, ...)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


UNAVAILABLE = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENODEV,
               errno.EAGAIN, errno.EBUSY, errno.ENOTCONN, errno.EHOSTDOWN, errno.ENXIO}
MAX_FILE_BYTES = 4 << 30  # a larger "image" is refused before it is read into memory


@dataclass
class SourceFile:
    """An input file's bytes (None: read by its decoder, which opens the file itself), with what identifies its
    version on disk."""

    data: bytes | None
    size: int
    mtime_ns: int | None = None
    sha256: str | None = None  # when hashed while read (``read_source_streamed``); else of ``data``
    local: str | None = None  # a temporary local copy the decoder opens (a remote video), removed by ``close``

    def close(self) -> None:
        """Remove the temporary local copy, if any."""
        if self.local is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.local)
            self.local = None


def read_source(path: str | Path) -> SourceFile:
    """Read an input file whole. A file that is not there or cannot be read right now raises
    InputUnavailableError (retried by a later run); one that can never be an image raises ImageError."""
    from .sources import NotRegularFileError, open_regular

    try:
        with open_regular(str(path)) as handle:
            stat = os.fstat(handle.fileno())
            if stat.st_size > MAX_FILE_BYTES:
                raise ImageError(f"file of {stat.st_size} bytes is too large to be an image")
            data = handle.read()
    except NotRegularFileError as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:
        reason = f"cannot read: {exc.strerror or _one_line(exc)}"
        raise (InputUnavailableError(reason) if exc.errno in UNAVAILABLE else ImageError(reason)) from None
    return SourceFile(data, len(data), stat.st_mtime_ns)


def read_source_streamed(path: str | Path, block: int = 1 << 20) -> SourceFile:
    """An input file's size, modification time and sha256, read a block at a time and never held whole (a video,
    which its decoder opens itself); errors as ``read_source``'s."""
    from .identity import Sha256
    from .sources import NotRegularFileError, open_regular

    digest = Sha256()
    try:
        with open_regular(str(path)) as handle:
            stat = os.fstat(handle.fileno())
            size = 0
            while chunk := handle.read(block):
                digest.update(chunk)
                size += len(chunk)
    except NotRegularFileError as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:
        reason = f"cannot read: {exc.strerror or _one_line(exc)}"
        raise (InputUnavailableError(reason) if exc.errno in UNAVAILABLE else ImageError(reason)) from None
    return SourceFile(None, size, stat.st_mtime_ns, digest.hexdigest())


@contextmanager
def pillow_limit(max_image_pixels: int) -> Iterator[None]:
    """Pillow refuses images of more than ``2 * Image.MAX_IMAGE_PIXELS`` pixels on its own (178,956,970 x 2 by
    default), whatever vitok's ``--max-image-pixels``: within this block Pillow's limit is raised to at least vitok's
    (vitok checks the header size itself), and put back when the last such block ends. Decodes whose limit Pillow
    allows anyway (the default) touch nothing; concurrent blocks (threads) share the largest of their limits."""
    global _pillow_default
    needed = -(-max_image_pixels // 2)  # Pillow raises above twice its value
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (not _raised and needed <= current):
        yield
        return
    with _LIMIT_LOCK:
        if not _raised:
            _pillow_default = current
        _raised.append(needed)
        Image.MAX_IMAGE_PIXELS = max(_pillow_default, *_raised)
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _raised.remove(needed)
            Image.MAX_IMAGE_PIXELS = max(_pillow_default, *_raised) if _raised else _pillow_default


def decode_image(
    source: str | Path | bytes,
    *,
    max_image_pixels: int = 178_956_970,
    allow_truncated: bool = False,
    draft_size: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> DecodedImage:
    """Check and decode an image file, or its bytes (an archive member).

    Args:
        source: the image file's path, or its bytes.
        max_image_pixels: refuse images whose header claims more pixels than this.
        allow_truncated: decode truncated files as far as they go instead of refusing them.
        draft_size: for JPEGs, ``(width, height) -> (target_w, target_h)`` of the final resize; when the target is at
            least 2x smaller on both sides the file is decoded at reduced DCT scale (faster, not bit-exact).
    """
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_source(source).data
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    with warnings.catch_warnings(record=True) as caught, pillow_limit(max_image_pixels):
        warnings.simplefilter("always")
        try:
            with Image.open(io.BytesIO(data)) as img:
                decoded = _decode_open_image(img, bytes(data), max_image_pixels, allow_truncated, draft_size)
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError("not an image Pillow can read (unknown or damaged header)") from None
        except Image.DecompressionBombError as exc:  # Pillow's own check came first: say it with vitok's limit
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = f"{int(found.group(1))} pixels" if found else "its size"
            raise ImageError(f"refused: {pixels} exceeds the limit of {max_image_pixels} (possible decompression "
                             "bomb; raise --max-image-pixels to allow)") from None
        except MemoryError:
            raise ImageError("out of memory while decoding") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            raise ImageError(f"cannot decode: {_one_line(exc)}") from None
    for warning in caught:
        if not issubclass(warning.category, Image.DecompressionBombWarning):
            decoded.notes.append(f"warning: {str(warning.message).splitlines()[0]}")
    return decoded


def _decode_open_image(img, data, max_image_pixels, allow_truncated, draft_size) -> DecodedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageError(
            f"refused: {width}x{height} = {width * height} pixels exceeds the limit of {max_image_pixels} "
            "(possible decompression bomb; raise --max-image-pixels to allow)"
        )
    notes: list[str] = []
    mode = img.mode
    try:  # counting the frames walks every page of a TIFF: a damaged later page must not cost the first
        frames = getattr(img, "n_frames", 1)
    except Exception as exc:
        frames = None
        notes.append(f"first frame only: the frame count could not be read ({_one_line(exc)})")
    if frames is None or frames > 1:
        try:
            img.seek(0)
        except Exception:  # the failed count left the file elsewhere: the first frame as opened
            img = Image.open(io.BytesIO(data))
        if frames:
            notes.append(f"first of {frames} frames")
    orientation = _orientation(img)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    drafted = False
    if draft_size is not None and img.format == "JPEG":
        target = draft_size(*upright)
        if target is not None:
            tw, th = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
            if 2 * tw <= width and 2 * th <= height:
                img.draft("RGB", (tw, th))
                if img.size != (width, height):
                    notes.append(f"fast decode at {img.size[0]}x{img.size[1]}")
                    drafted = True
    pixels = _decode_jpeg_directly(img, data) if img.size == (width, height) else None  # not after a draft
    if pixels is not None:
        if orientation in UPRIGHT:
            return DecodedImage(Image.fromarray(pixels).transpose(UPRIGHT[orientation]), upright, notes,
                                decoder="simplejpeg", mode=mode)
        view = Image.frombuffer("RGB", (width, height), pixels, "raw", "RGB", 0, 1)  # no copy
        return DecodedImage(view, upright, notes, pixels, decoder="simplejpeg", mode=mode)
    _load(img, allow_truncated, notes)
    if orientation not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # broken EXIF must not cost the image
            notes.append(f"EXIF orientation not applied ({_one_line(exc)})")
    return DecodedImage(to_rgb(img), upright, notes, decoder="pillow-draft" if drafted else "pillow", mode=mode)


# ---- JPEGs straight through libjpeg-turbo ------------------------------------------------------------------------

_CHECKED_LUMA_SAMPLING = {(1, 1), (2, 1), (2, 2)}  # 4:4:4, 4:2:2, 4:2:0 (chroma 1x1): the layouts self-checked


def _decode_jpeg_directly(img: Image.Image, data: bytes) -> np.ndarray | None:
    """The (H, W, 3) RGB pixels of a plain JPEG decoded by simplejpeg; None to use Pillow instead."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    layers = getattr(img, "layer", None) or []
    if img.mode == "RGB" and (
        len(layers) != 3 or (layers[0][1], layers[0][2]) not in _CHECKED_LUMA_SAMPLING
        or any((h, v) != (1, 1) for _, h, v, _ in layers[1:])
    ):
        return None
    decoder = _simplejpeg()
    if decoder is None:
        return None
    try:
        # grayscale JPEGs come out as RGB with three equal channels, as Pillow's convert("RGB") makes them
        pixels = decoder.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
    except (OSError, ValueError):  # truncated or damaged: Pillow decides and gives the reason
        return None
    return pixels if pixels.shape == (img.size[1], img.size[0], 3) else None


def _simplejpeg():
    """simplejpeg, unless switched off (``vitok.settings``) or it failed its check against Pillow."""
    return _checked_simplejpeg() if settings.enabled("simplejpeg") else None


@functools.cache
def _checked_simplejpeg():
    """The simplejpeg module when it is installed and decodes like Pillow on every checked JPEG layout, else None."""
    try:
        import simplejpeg
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 61 * 47 * 3).reshape(47, 61, 3)
    photo = Image.fromarray(np.clip(smooth + rng.normal(0, 30, smooth.shape), 0, 255).astype(np.uint8))
    variants = [("RGB", dict(subsampling=s, quality=q)) for s in (0, 1, 2) for q in (50, 95)]
    variants += [("RGB", dict(progressive=True, quality=85)), ("L", dict(quality=90))]
    for mode, options in variants:
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, "JPEG", **options)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            expected = np.asarray(decoded.convert("RGB"))
        got = simplejpeg.decode_jpeg(buffer.getvalue(), colorspace="RGB", fastdct=False, fastupsample=False)
        if not np.array_equal(expected, got):
            logger.warning("simplejpeg %s decodes %s JPEGs (%s) unlike Pillow here; decoding with Pillow only",
                           simplejpeg.__version__, mode, options)
            return None
    return simplejpeg


def _orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(ORIENTATION_TAG)
    except Exception:  # unreadable EXIF: treat as no orientation
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _load(img: Image.Image, allow_truncated: bool, notes: list[str]) -> None:
    try:
        img.load()
        return
    except OSError as exc:
        if "truncated" not in str(exc) and "broken data stream" not in str(exc):
            raise
        if not allow_truncated:
            raise ImageError(
                f"truncated file ({_one_line(exc)}); pass --allow-truncated to decode what is there"
            ) from None
    with _TRUNCATED_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    notes.append("truncated file, decoded partially (--allow-truncated)")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way the reference does, but scale high bit depths."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_high_depth_to_uint8(img), mode="L").convert("RGB")
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        img = img.convert("RGBA")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """One 8-bit band, as the reference's ``convert("RGB")`` gives it (values clipped to 0..255, floats truncated)
    except where that would lose the picture (docs/models.md, deliberate differences):

    - ``I;16`` (16 bits declared): scaled, ``round(v / 257)``; the reference clips, turning most pixels white;
    - ``I`` (Pillow's 32-bit container, whatever the file's depth): as the reference when every value fits in 8 bits
      (a 32-bit TIFF of 8-bit values), else scaled like 16 bits;
    - ``F``: as the reference, except values all within [0, 1] (normalised floats), scaled by 255 and rounded; the
      reference truncates them to 0 and 1, a black image.
    """
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            return np.clip(values * 255.0, 0, 255).round().astype(np.uint8)
        return np.clip(values, 0, 255).astype(np.uint8)  # truncated toward zero, as Pillow's F -> L
    values = values.astype(np.int64)
    if img.mode == "I" and values.size and values.max() <= 255:
        return np.clip(values, 0, 255).astype(np.uint8)
    values = np.clip(values, 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257): 0 -> 0, 65535 -> 255


def load_any_image(image) -> Image.Image:
    """The original API's input: a path, a PIL image or a uint8 array (H x W x 3 or H x W) -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        return decode_image(image).image
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image) if _orientation(image) not in (None, 1) else image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"numpy images must be uint8, got {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image, mode="L").convert("RGB")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return to_rgb(Image.fromarray(image, mode="RGB" if image.shape[2] == 3 else "RGBA"))
        raise ImageError(f"numpy images must be H x W or H x W x 3/4, got shape {image.shape}")
    raise ImageError(f"cannot use {type(image).__name__} as an image; pass a path, a PIL image or a uint8 array")

"""Decode one image file into RGB pixels a user would expect, or fail with a one-line reason.

Every input either yields an RGB image or raises :class:`~vitok.errors.ImageError`; nothing else escapes, so a
batch job can record the reason and go on. What "expected" means here:

- EXIF orientation applied (as transformers' ``load_image`` does);
- alpha (RGBA, LA, premultiplied, palette transparency) composited onto white, like the reference;
- CMYK, palette, 1-bit and grayscale converted to RGB; 16-bit and 32-bit integer images *scaled* to 8 bits
  (the reference clips them, turning most pixels white: a deliberate difference);
- the first frame of an animation;
- the pixel count checked from the header before any decoding (decompression bombs are refused);
- truncated files refused unless ``allow_truncated``, in which case the notes say so;
- library warnings (palette transparency, odd EXIF) are kept as notes, never turned into failures.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError

ORIENTATION_TAG = 0x0112
_TRUNCATED_LOCK = threading.Lock()  # LOAD_TRUNCATED_IMAGES is a Pillow global


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, upright
    original_size: tuple[int, int]  # (width, height) upright, before any reduced-scale decoding
    notes: list[str] = field(default_factory=list)  # things worth recording that are not failures


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def decode_image(
    path: str | Path,
    *,
    max_image_pixels: int = 178_956_970,
    allow_truncated: bool = False,
    draft_size: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> DecodedImage:
    """Open, check and decode ``path``.

    Args:
        path: the image file.
        max_image_pixels: refuse images whose header claims more pixels than this.
        allow_truncated: decode truncated files as far as they go instead of refusing them.
        draft_size: for JPEGs, ``(width, height) -> (target_w, target_h)`` of the final resize; when the target is at
            least 2x smaller on both sides the file is decoded at reduced DCT scale (faster, not bit-exact).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or _one_line(exc)}") from None
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with Image.open(path) as img:
                decoded = _decode_open_image(img, max_image_pixels, allow_truncated, draft_size)
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError("not an image Pillow can read (unknown or damaged header)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(f"refused as a decompression bomb: {exc}") from None
        except MemoryError:
            raise ImageError("out of memory while decoding") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            raise ImageError(f"cannot decode: {_one_line(exc)}") from None
    for warning in caught:
        if not issubclass(warning.category, Image.DecompressionBombWarning):
            decoded.notes.append(f"warning: {str(warning.message).splitlines()[0]}")
    return decoded


def _decode_open_image(img, max_image_pixels, allow_truncated, draft_size) -> DecodedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageError(
            f"refused: {width}x{height} = {width * height} pixels exceeds the limit of {max_image_pixels} "
            "(possible decompression bomb; raise --max-image-pixels to allow)"
        )
    notes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
        notes.append(f"first of {img.n_frames} frames")
    orientation = _orientation(img)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if draft_size is not None and img.format == "JPEG":
        target = draft_size(*upright)
        if target is not None:
            tw, th = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
            if 2 * tw <= width and 2 * th <= height:
                img.draft("RGB", (tw, th))
                if img.size != (width, height):
                    notes.append(f"fast decode at {img.size[0]}x{img.size[1]}")
    _load(img, allow_truncated, notes)
    if orientation not in (None, 1):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # broken EXIF must not cost the image
            notes.append(f"EXIF orientation not applied ({_one_line(exc)})")
    return DecodedImage(to_rgb(img), upright, notes)


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
    values = np.asarray(img)
    if img.mode == "F":
        values = values.astype(np.float64)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    values = np.clip(values.astype(np.int64), 0, 65535)
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

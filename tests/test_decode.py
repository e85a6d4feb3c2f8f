"""Every odd file gives the expected pixels or a one-line skip reason; nothing escapes the data path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import ODD, PHOTOS
from PIL import Image

from vitok.config import PreprocessConfig
from vitok.decode import decode_image
from vitok.errors import ImageError
from vitok.preprocess import Preprocessor
from vitok.sources import IMAGE_EXTENSIONS

ODD_FILES = sorted(p for p in ODD.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


@pytest.mark.parametrize("path", ODD_FILES, ids=lambda p: p.name)
def test_each_odd_file_decodes_or_gives_a_one_line_reason(path):
    pre = Preprocessor(PreprocessConfig(max_pixels=262144))
    try:
        prepared = pre.load(path)
    except ImageError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason
        return
    assert prepared.patches.dtype.is_floating_point is False and prepared.num_patches > 0


@pytest.mark.parametrize(
    "name, reason",
    [("empty.jpg", "empty file"), ("not_an_image.png", "not an image"), ("broken.png", "not an image"),
     ("truncated.jpg", "truncated"), ("decompression_bomb.gif", "decompression bomb")],
)
def test_damaged_files_are_refused_with_their_reason(name, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(ODD / name)


def test_truncated_file_can_be_accepted_explicitly_and_says_so():
    decoded = decode_image(ODD / "truncated.jpg", allow_truncated=True)
    assert decoded.image.size == (128, 128)
    assert any("truncated" in note for note in decoded.notes)


def test_pixel_guard_reads_the_header_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(path, max_image_pixels=50_000)


@pytest.mark.parametrize("name, transpose", [("hopper_orientation_3.jpg", Image.Transpose.ROTATE_180),
                                             ("hopper_orientation_6.jpg", Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(name, transpose):
    with Image.open(ODD / name) as raw:
        expected = np.asarray(raw.convert("RGB").transpose(transpose), dtype=np.int16)
    got = np.asarray(decode_image(ODD / name).image, dtype=np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() == 0


def test_sixteen_bit_is_scaled_not_clipped():
    with Image.open(ODD / "hopper_16bit.pgm") as raw:
        values = np.asarray(raw).astype(np.float64)
    got = np.asarray(decode_image(ODD / "hopper_16bit.pgm").image)[:, :, 0].astype(np.float64)
    assert np.abs(got - np.round(values / 257)).max() <= 1
    assert got.mean() < 250  # a clipping decoder makes almost every pixel 255


def test_alpha_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path_like = io.BytesIO(buffer.getvalue())
    decoded = Image.open(path_like)
    from vitok.decode import to_rgb

    assert to_rgb(decoded).getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_warning_is_not_an_error():
    decoded = decode_image(ODD / "pil123p.png")
    assert decoded.image.mode == "RGB"


def test_cmyk_and_one_bit_become_rgb():
    assert decode_image(ODD / "pil_sample_cmyk.jpg").image.mode == "RGB"
    one_bit = np.asarray(decode_image(ODD / "hopper_1bit.pbm").image)
    assert set(np.unique(one_bit)) <= {0, 255}


def test_animation_uses_the_first_frame():
    decoded = decode_image(ODD / "dispose_bgnd.gif")
    with Image.open(ODD / "dispose_bgnd.gif") as raw:
        raw.seek(0)
        expected = np.asarray(raw.convert("RGBA"))
    assert decoded.image.size == (100, 100)
    assert any("first of" in note for note in decoded.notes)
    assert expected.shape[:2] == (100, 100)


def test_fast_decode_keeps_the_grid_and_stays_close(tmp_path):
    big = tmp_path / "big.jpg"
    Image.open(PHOTOS / "retina.jpg").convert("RGB").resize((1600, 1200)).save(big, quality=92)
    config = PreprocessConfig(max_pixels=448 * 448)
    exact = Preprocessor(config).load(big)
    fast = Preprocessor(config.replace(fast_decode=True)).load(big)
    assert fast.grid_thw == exact.grid_thw
    assert any("fast decode" in n for n in fast.notes)
    diff = (fast.patches.float() - exact.patches.float()).abs()
    assert diff.mean() < 3.0

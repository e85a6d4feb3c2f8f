"""Every odd file gives the expected pixels or a one-line skip reason; nothing escapes the data path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import ODD, PHOTOS
from PIL import Image

from vitok.errors import ImageError
from vitok.inputs.decode import decode_image
from vitok.inputs.preprocess import Preprocessor
from vitok.inputs.preprocess_config import PreprocessConfig
from vitok.inputs.sources import IMAGE_EXTENSIONS

ODD_FILES = sorted(p for p in ODD.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


# The right outcome of each odd file: decoded as a user expects, or skipped with a one-line reason.
SKIPPED = {"broken.png", "decompression_bomb.gif", "empty.jpg", "not_an_image.png", "truncated.jpg"}


@pytest.mark.parametrize("path", ODD_FILES, ids=lambda p: p.name)
def test_each_odd_file_decodes_or_gives_a_one_line_reason(path):
    pre = Preprocessor(PreprocessConfig(max_pixels=262144))
    if path.name in SKIPPED:
        with pytest.raises(ImageError) as caught:
            pre.load(path)
        assert str(caught.value) and "\n" not in str(caught.value)
        return
    prepared = pre.load(path)  # every other odd file must decode
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


def test_max_image_pixels_is_the_only_limit_pillows_own_does_not_refuse_first(tmp_path, monkeypatch):
    """Pillow refuses more than twice its MAX_IMAGE_PIXELS itself (a 20000x20000 scan by default); scaled down
    here: Pillow's limit 1,000, vitok's 20,000, an image of 10,000 pixels (an animated GIF: frames checked too)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    path = tmp_path / "big.png"
    Image.new("1", (100, 100), 1).save(path)
    frames = [Image.new("RGB", (100, 100), (i * 60, 0, 0)) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(path, max_image_pixels=20_000)
    assert decoded.image.size == (100, 100) and np.asarray(decoded.image).min() == 255
    assert decode_image(gif.getvalue(), max_image_pixels=20_000).image.size == (100, 100)
    with pytest.raises(ImageError, match="exceeds (the )?limit of 500[01]"):  # vitok's own limit still holds
        decode_image(path, max_image_pixels=5_000)
    with ThreadPoolExecutor(4) as pool:  # concurrent decodes: none refused, Pillow's value put back after
        results = list(pool.map(lambda _: decode_image(path, max_image_pixels=20_000).image.size, range(16)))
    assert results == [(100, 100)] * 16
    assert Image.MAX_IMAGE_PIXELS == 1_000


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


def test_integer_and_float_images_match_the_reference_where_it_keeps_the_picture(tmp_path):
    """Mode I holding 8-bit values and mode F beyond [0, 1] give the reference's pixels (transformers'
    convert_to_rgb, i.e. Pillow's convert: clipped, floats truncated); where the reference loses the picture (I with
    16-bit values, F normalised to [0, 1]) vitok scales (docs/models.md: deliberate differences)."""
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (24, 32)).astype(np.int32)
    cases = {
        "i8.tif": Image.fromarray(eight, mode="I"),
        "i8neg.tif": Image.fromarray(eight - 20, mode="I"),
        "f255.tif": Image.fromarray((rng.random((24, 32)) * 300 - 20).astype(np.float32), mode="F"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as raw:
            expected = convert_to_rgb(raw, return_numpy=True)
        got = np.asarray(decode_image(tmp_path / name).image)
        np.testing.assert_array_equal(got, expected, err_msg=name)
    unit = (rng.random((24, 32))).astype(np.float32)
    Image.fromarray(unit, mode="F").save(tmp_path / "f1.tif")
    got = np.asarray(decode_image(tmp_path / "f1.tif").image)[:, :, 0]
    np.testing.assert_array_equal(got, np.round(unit.astype(np.float64) * 255).astype(np.uint8))
    sixteen = (eight * 257).astype(np.int32)
    Image.fromarray(sixteen, mode="I").save(tmp_path / "i16.tif")
    got = np.asarray(decode_image(tmp_path / "i16.tif").image)[:, :, 0]
    np.testing.assert_array_equal(got, eight.astype(np.uint8))


def test_alpha_is_composited_onto_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path_like = io.BytesIO(buffer.getvalue())
    decoded = Image.open(path_like)
    from vitok.inputs.decode import to_rgb

    assert to_rgb(decoded).getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_warning_is_not_an_error():
    decoded = decode_image(ODD / "pil123p.png")
    assert decoded.image.mode == "RGB"


def test_cmyk_and_one_bit_become_rgb():
    assert decode_image(ODD / "pil_sample_cmyk.jpg").image.mode == "RGB"
    one_bit = np.asarray(decode_image(ODD / "hopper_1bit.pbm").image)
    assert set(np.unique(one_bit)) <= {0, 255}


def test_animation_uses_the_first_frame():
    from vitok.inputs.decode import to_rgb

    decoded = decode_image(ODD / "dispose_bgnd.gif")
    frames = []
    with Image.open(ODD / "dispose_bgnd.gif") as raw:
        for index in range(raw.n_frames):
            raw.seek(index)
            frames.append(np.asarray(to_rgb(raw.copy())))
    assert decoded.image.size == (100, 100)
    assert any("first of" in note for note in decoded.notes)
    got = np.asarray(decoded.image)
    np.testing.assert_array_equal(got, frames[0])
    assert any(not np.array_equal(got, frame) for frame in frames[1:])  # frame 0 really is another picture


@pytest.mark.parametrize("kept", [1 / 2, 2 / 3])
def test_a_damaged_later_page_does_not_cost_the_first(kept):
    """A multi-page TIFF cut short: counting its pages fails, its first page decodes (as the reference's Pillow
    image gives it)."""
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    data = buffer.getvalue()[: int(len(buffer.getvalue()) * kept)]
    decoded = decode_image(data)
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(pages[0]))
    assert any("frame count could not be read" in note for note in decoded.notes)
    whole = decode_image(buffer.getvalue())  # undamaged: counted
    assert "first of 3 frames" in whole.notes


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


# ---- JPEGs decoded straight through libjpeg-turbo (simplejpeg) must give Pillow's pixels --------------------------

JPEG_VARIANTS = {
    "420": dict(quality=90), "444": dict(quality=60, subsampling=0), "422": dict(quality=95, subsampling=1),
    "progressive": dict(quality=85, progressive=True), "restarts": dict(quality=75, restart_marker_blocks=2),
    "gray": dict(quality=90),
}


@pytest.fixture(scope="module")
def jpeg_variants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for photo in sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg")):
        image = Image.open(photo).convert("RGB")
        for size in [(801, 603), (33, 17)]:
            for name, options in JPEG_VARIANTS.items():
                path = folder / f"{photo.stem}-{size[0]}-{name}.jpg"
                image.resize(size).convert("L" if name == "gray" else "RGB").save(path, "JPEG", **options)
                paths.append(path)
    return paths + [ODD / "hopper_orientation_3.jpg", ODD / "hopper_orientation_6.jpg", ODD / "hopper.jpg"]


def _pillow_only(monkeypatch):
    from vitok.inputs import decode

    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)


def test_direct_jpeg_decoding_gives_pillows_pixels(jpeg_variants, monkeypatch):
    pytest.importorskip("simplejpeg")
    from vitok.inputs import decode

    assert decode._simplejpeg() is not None, "simplejpeg failed its self-check against Pillow (see the log)"
    direct = [decode_image(path) for path in jpeg_variants]
    assert sum(d.pixels is not None for d in direct) >= len(jpeg_variants) - 2  # the rotated ones go through PIL
    _pillow_only(monkeypatch)
    for path, fast in zip(jpeg_variants, direct):
        slow = decode_image(path)
        assert slow.pixels is None and fast.original_size == slow.original_size, path.name
        np.testing.assert_array_equal(np.asarray(fast.image), np.asarray(slow.image), err_msg=path.name)


def test_direct_jpeg_decoding_gives_the_same_patches(jpeg_variants, monkeypatch):
    pytest.importorskip("simplejpeg")
    pre = Preprocessor(PreprocessConfig(max_pixels=262144))
    fast = [pre.load(path).patches for path in jpeg_variants[:6]]
    _pillow_only(monkeypatch)
    for path, patches in zip(jpeg_variants, fast):
        assert torch_equal(pre.load(path).patches, patches), path.name


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_truncated_jpeg_is_still_refused_with_direct_decoding():
    pytest.importorskip("simplejpeg")
    with pytest.raises(ImageError, match="truncated"):
        decode_image(ODD / "truncated.jpg")
    decoded = decode_image(ODD / "truncated.jpg", allow_truncated=True)
    assert decoded.pixels is None and any("truncated" in note for note in decoded.notes)


def test_a_decoder_that_disagrees_with_pillow_is_not_used(monkeypatch):
    simplejpeg = pytest.importorskip("simplejpeg")
    from vitok.inputs import decode

    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *args, **kwargs: real(*args, **kwargs) ^ 1)
    decode._checked_simplejpeg.cache_clear()
    try:
        assert decode._simplejpeg() is None
        assert decode_image(ODD / "hopper.jpg").pixels is None
    finally:
        decode._checked_simplejpeg.cache_clear()


@pytest.mark.parametrize("limit", [None, 1_000_000])
def test_an_image_over_the_limit_is_refused_naming_the_limit_in_force_and_the_flag(tmp_path, limit):
    """Pillow's own check (at twice its MAX_IMAGE_PIXELS, vitok's default) used to answer first, naming its limit."""
    from PIL import Image

    from vitok.errors import ImageError
    from vitok.inputs.decode import decode_image

    path = tmp_path / "huge.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 megapixels, a 24 KB file
    kwargs = {} if limit is None else {"max_image_pixels": limit}
    with pytest.raises(ImageError) as caught:
        decode_image(path, **kwargs)
    expected = 178_956_970 if limit is None else limit
    assert f"196000000 pixels exceeds the limit of {expected}" in str(caught.value)
    assert "--max-image-pixels" in str(caught.value)

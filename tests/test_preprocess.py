"""Pixel parity with the reference image processor, smart_resize branches, end-to-end parity, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PHOTOS, reference_model, rel_error, vitok_from_reference
from PIL import Image, ImageOps

from vitok.errors import ImageError
from vitok.inputs.preprocess import ImagePreprocessor, Preprocessor, smart_resize
from vitok.inputs.preprocess_config import PreprocessConfig

QWEN3 = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
             size={"shortest_edge": 65536, "longest_edge": 16777216})
PHOTO_FILES = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))


def reference_processor(backend: str, **overrides):
    if backend == "pil":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    else:
        from transformers import Qwen2VLImageProcessor as cls
    return cls(**{**QWEN3, **overrides})


def reference_pixels(processor, path):
    image = ImageOps.exif_transpose(Image.open(path))
    out = processor(images=[image], return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("path", PHOTO_FILES, ids=lambda p: p.name)
def test_pixel_parity_on_photos(path, backend):
    expected, grid = reference_pixels(reference_processor(backend), path)
    pre = Preprocessor(PreprocessConfig(backend=backend))
    prepared = pre.load(path)
    assert prepared.grid_thw == grid
    torch.testing.assert_close(pre.pixel_values(prepared), expected, rtol=0, atol=1e-6)


SIZES = [  # (width, height): tiny, exact .5 rounding, huge, extreme aspect, min/max branches
    (1, 1), (7, 300), (100, 60), (80, 112), (48, 80), (112, 112), (640, 480), (1001, 333), (200, 30),
    (5000, 3000), (6000, 30), (30, 5999), (256, 256), (4097, 4095),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_smart_resize_matches_reference(size):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    width, height = size
    for min_pixels, max_pixels in ((65536, 16777216), (4096, 262144), (3136, 12845056)):
        try:
            expected = reference(height, width, 32, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(ImageError, match="aspect ratio"):
                smart_resize(height, width, 32, min_pixels, max_pixels)
            continue
        assert smart_resize(height, width, 32, min_pixels, max_pixels) == expected


@pytest.mark.parametrize("size", [(100, 60), (80, 112), (1001, 333), (33, 65)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixel_parity_on_synthetic_sizes(tmp_path, size):
    rng = np.random.default_rng(sum(size))
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    expected, grid = reference_pixels(reference_processor("torchvision"), path)
    pre = Preprocessor(PreprocessConfig())
    prepared = pre.load(path)
    assert prepared.grid_thw == grid
    torch.testing.assert_close(pre.pixel_values(prepared), expected, rtol=0, atol=1e-6)


def test_user_pixel_limits_and_fixed_size_match_reference():
    path = PHOTOS / "rocket.jpg"
    expected, grid = reference_pixels(
        reference_processor("torchvision", size={"shortest_edge": 4096, "longest_edge": 65536}), path
    )
    pre = Preprocessor(PreprocessConfig(min_pixels=4096, max_pixels=65536))
    prepared = pre.load(path)
    assert prepared.grid_thw == grid
    torch.testing.assert_close(pre.pixel_values(prepared), expected, rtol=0, atol=1e-6)
    fixed = Preprocessor(PreprocessConfig(mode="fixed", image_size=224)).load(path)
    assert fixed.grid_thw == (1, 14, 14)


def test_end_to_end_merged_parity_with_reference():
    reference, config = reference_model(seed=11)
    model = vitok_from_reference(reference, config)
    path = PHOTOS / "chelsea.png"
    pixels, grid = reference_pixels(reference_processor("torchvision", size={"shortest_edge": 4096,
                                                                              "longest_edge": 65536}), path)
    pre = Preprocessor(PreprocessConfig(min_pixels=4096, max_pixels=65536))
    prepared = pre.load(path)
    with torch.no_grad():
        expected = reference(pixels, torch.tensor([grid])).pooler_output
        got = model(pre.pixel_values(prepared), [prepared.grid_thw], features=("merged",)).features["merged"]
    assert rel_error(got, expected) <= 1e-5


def _load_in_worker(pre, paths):
    loader = torch.utils.data.DataLoader(paths, batch_size=None, num_workers=2, collate_fn=pre.load)
    return list(loader)


def test_preprocessing_in_dataloader_workers_equals_main_process():
    pre = Preprocessor(PreprocessConfig(max_pixels=262144))
    paths = [str(p) for p in PHOTO_FILES[:3]]
    in_workers = _load_in_worker(pre, paths)
    for path, prepared in zip(paths, in_workers):
        main = pre.load(path)
        assert prepared.grid_thw == main.grid_thw
        assert torch.equal(prepared.patches, main.patches)


def test_original_image_preprocessor_accepts_paths_pil_and_arrays():
    pre = ImagePreprocessor(img_size=224)
    path = PHOTOS / "coffee.png"
    from_path = pre.preprocess(path)
    from_pil = pre.preprocess(Image.open(path))
    from_array = pre.preprocess(np.asarray(Image.open(path).convert("RGB")))
    gray = pre.preprocess(np.zeros((50, 70), dtype=np.uint8))
    assert from_path.shape == from_pil.shape == from_array.shape == gray.shape == (1, 3, 224, 224)
    torch.testing.assert_close(from_path, from_array)
    # ImageNet normalisation: black is -mean/std
    torch.testing.assert_close(gray[0, :, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_prepare_a_pil_image_with_exif_rotation_uses_its_upright_size():
    """Regression: the target size came from the stored (unrotated) size, distorting EXIF-rotated images."""
    import io

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 200, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    pre = Preprocessor(PreprocessConfig(min_pixels=4096, max_pixels=65536))
    rotated = pre.prepare(Image.open(io.BytesIO(buffer.getvalue())))
    upright = pre.prepare(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    assert rotated.grid_thw == upright.grid_thw
    assert rotated.original_size == (60, 200)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_without_torchvision_equals_torchvision(mode):
    """vitok resizes as torchvision's v2 resize does, without importing torchvision in the decode workers."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    from vitok.inputs.preprocess import resize_like_torchvision

    rng = np.random.default_rng(0)
    interpolation = InterpolationMode.BICUBIC if mode == "bicubic" else InterpolationMode.BILINEAR
    for (h, w), (th, tw) in [((300, 400), (224, 320)), ((61, 47), (128, 96)), ((64, 64), (64, 64)),
                             ((600, 800), (608, 800)), ((1, 1), (32, 32)), ((480, 640), (96, 1280))]:
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels = torch.from_numpy(array).permute(2, 0, 1)
        expected = tvF.resize(pixels, [th, tw], interpolation=interpolation, antialias=True)
        got = resize_like_torchvision(pixels, th, tw, mode)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), (h, w, th, tw)


# ---- preprocessor_config.json as transformers reads it ------------------------------------------------------------

PROCESSOR_CONFIGS = {  # preprocessor_config.json contents: every field left out means the processor class's default
    "empty": {},
    "min-max-pixels": dict(min_pixels=1024, max_pixels=20000),
    "min-max-pixels-over-size": dict(size={"shortest_edge": 4096, "longest_edge": 1000000}, min_pixels=1024,
                                     max_pixels=20000),
    "no-rescale": dict(do_rescale=False, size={"shortest_edge": 1024, "longest_edge": 20000}),
    "no-normalize": dict(do_normalize=False, size={"shortest_edge": 1024, "longest_edge": 20000}),
    "neither": dict(do_normalize=False, do_rescale=False, size={"shortest_edge": 1024, "longest_edge": 20000}),
    "scalar-mean-std": dict(image_mean=0.5, image_std=0.25, patch_size=16, rescale_factor=1 / 127.5),
    "bilinear-p8-m1-t1": dict(resample=2, patch_size=8, merge_size=1, temporal_patch_size=1,
                              size={"shortest_edge": 64, "longest_edge": 20000}),
    "p8-m3-t3": dict(patch_size=8, merge_size=3, temporal_patch_size=3, size={"shortest_edge": 576,
                                                                             "longest_edge": 50000}),
    "no-resize": dict(do_resize=False, patch_size=8, merge_size=2),
    "min-over-max": dict(size={"shortest_edge": 40000, "longest_edge": 10000}),  # smart_resize tries max first
}
# (width, height): a pixel, thin strips either way, sizes around the factor, aspect ratio just over 200
ODD_SIZES = [(1, 1), (3, 1000), (1000, 3), (31, 33), (64, 32), (56, 56), (112, 28), (1, 201)]


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("name", PROCESSOR_CONFIGS)
def test_preprocessor_config_variants_equal_the_reference(tmp_path, name, backend):
    """pixel_values and grid_thw equal the reference processor built from the same preprocessor_config.json (its
    torchvision and PIL variants); where the reference refuses an image, vitok refuses it with an ImageError."""
    data = PROCESSOR_CONFIGS[name]
    reference = _processor_class(backend).from_dict(dict(data))
    pre = Preprocessor(PreprocessConfig.from_hf_preprocessor_config(dict(data), PreprocessConfig(backend=backend)))
    rng = np.random.default_rng(0)
    for width, height in ODD_SIZES:
        path = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        try:
            expected, grid = reference_pixels(reference, path)
        except (ValueError, RuntimeError):  # aspect ratio over 200; off the grid without resizing
            with pytest.raises(ImageError):
                pre.load(path)
            continue
        prepared = pre.load(path)
        assert prepared.grid_thw == grid, (width, height)
        torch.testing.assert_close(pre.pixel_values(prepared), expected.float(), rtol=0, atol=0)


def _processor_class(backend: str):
    if backend == "pil":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor


def test_processor_defaults_table_is_the_reference_class():
    from vitok.inputs.preprocess_config import HF_PROCESSOR_DEFAULTS

    for backend in ("torchvision", "pil"):
        cls = _processor_class(backend)
        for key, value in HF_PROCESSOR_DEFAULTS.items():
            assert getattr(cls, key) == (list(value) if isinstance(value, tuple) and key.startswith("image") else
                                         value) or tuple(getattr(cls, key)) == value, (backend, key)


@pytest.mark.parametrize(("data", "named"), [
    (dict(size={"shortest_edge": 4096}), "longest_edge"),  # the reference refuses every image
    (dict(size={"min_pixels": 3136, "max_pixels": 100000}), "shortest_edge"),
    (dict(resample=0), "resample"),  # nearest: vitok resizes bicubic or bilinear only
    (dict(image_mean=[0.5, 0.5]), "image_mean"),
])
def test_preprocessor_configs_vitok_cannot_run_are_one_line_errors(data, named):
    from vitok.errors import UsageError

    with pytest.raises(UsageError, match=named) as error:
        PreprocessConfig.from_hf_preprocessor_config(data, PreprocessConfig())
    assert "\n" not in str(error.value)


def test_one_mean_and_std_value_is_every_channels():
    config = PreprocessConfig.from_hf_preprocessor_config({"image_mean": [0.25], "image_std": 0.5}, PreprocessConfig())
    assert config.image_mean == (0.25,) * 3 and config.image_std == (0.5,) * 3


def test_min_pixels_over_max_pixels_is_refused_only_as_flags():
    from vitok.encoder.checkpoint import resolve_model
    from vitok.errors import UsageError
    from vitok.run.job import preprocess_for
    from vitok.run.options import ExtractOptions

    source = resolve_model("qwen3-vl-tiny")
    with pytest.raises(UsageError, match="--min-pixels 90000 is larger than --max-pixels 80000"):
        preprocess_for(source, ExtractOptions(min_pixels=90000, max_pixels=80000))
    assert preprocess_for(source, ExtractOptions()).max_pixels == source.preprocess.max_pixels


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_without_rgb_conversion_only_rgb_files_are_taken_as_the_reference(tmp_path, backend):
    """do_convert_rgb false: an RGB file equals the reference; any other mode (which the reference processor cannot
    normalise) is an ImageError for that image."""
    data = dict(do_convert_rgb=False, size={"shortest_edge": 1024, "longest_edge": 20000})
    reference = _processor_class(backend).from_dict(dict(data))
    pre = Preprocessor(PreprocessConfig.from_hf_preprocessor_config(dict(data), PreprocessConfig(backend=backend)))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.fromarray(rgb).convert(mode).save(path)
        try:
            expected, grid = reference_pixels(reference, path)
        except (ValueError, RuntimeError):
            with pytest.raises(ImageError, match=f"a {mode} image"):
                pre.load(path)
            continue
        assert mode == "RGB"
        prepared = pre.load(path)
        assert prepared.grid_thw == grid
        torch.testing.assert_close(pre.pixel_values(prepared), expected, rtol=0, atol=0)

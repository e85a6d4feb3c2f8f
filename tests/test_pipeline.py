"""The original pipeline API: shapes and output formats."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PHOTOS
from PIL import Image

from vitok import Qwen3VLPipeline
from vitok.errors import UsageError


@pytest.fixture(scope="module")
def base():
    return Qwen3VLPipeline(model_size="base", device="cpu")


@pytest.mark.slow
def test_base_shapes(base):
    photo = PHOTOS / "rocket.jpg"
    assert base.process_image(photo).shape == (1, 256, 1024)
    assert base.process_batch([photo, Image.open(PHOTOS / "coffee.png")]).shape == (2, 256, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["mean", "max", "cls"])
def test_pooled_shapes(pool):
    pipe = Qwen3VLPipeline(model_size="small", pooling_strategy=pool, device="cpu")
    assert pipe.process_image(np.zeros((40, 60, 3), dtype=np.uint8)).shape == (1, 1, 512)


@pytest.mark.slow
def test_output_formats():
    image = np.full((30, 30), 128, dtype=np.uint8)
    assert isinstance(Qwen3VLPipeline("small", output_format="numpy").process_image(image), np.ndarray)
    as_list = Qwen3VLPipeline("small", pooling_strategy="mean", output_format="list").process_image(image)
    assert isinstance(as_list, list) and len(as_list[0][0]) == 512
    with pytest.raises(UsageError):
        Qwen3VLPipeline("small", output_format="xml")


@pytest.mark.slow
def test_original_pipeline_tokens_equal_extracts(tmp_path):
    """The original API is the same encoder and preprocessing as ``vitok.extract``, not a look-alike."""
    import vitok

    photo = PHOTOS / "rocket.jpg"
    pipe = Qwen3VLPipeline(model_size="small", pooling_strategy="mean", device="cpu", output_format="numpy")
    vitok.extract([str(photo)], tmp_path / "out", model="small", pool="mean", store_dtype="float32", workers=0)
    stored = vitok.open(tmp_path / "out")
    np.testing.assert_allclose(pipe.process_image(photo)[0], stored[stored.keys()[0]], rtol=1e-5, atol=1e-5)

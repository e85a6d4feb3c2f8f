#!/usr/bin/env python
"""The seven original examples, on the bundled photos: python scripts/examples.py"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitok import ImagePreprocessor, Qwen3VisionTransformer, Qwen3VLPipeline, create_qwen3_vl_vit

PHOTOS = sorted((Path(__file__).resolve().parent.parent / "examples" / "images").glob("*.*g"))


def example_1_basic() -> None:
    pipe = Qwen3VLPipeline(model_size="base")
    print("1. basic:", tuple(pipe.process_image(PHOTOS[0]).shape))  # (1, 256, 1024)


def example_2_batch() -> None:
    pipe = Qwen3VLPipeline(model_size="small")
    print("2. batch:", tuple(pipe.process_batch(PHOTOS[:3]).shape))  # (3, 256, 512)


def example_3_pooling() -> None:
    for strategy in ("none", "mean", "max", "cls"):
        pipe = Qwen3VLPipeline(model_size="small", pooling_strategy=strategy)
        print(f"3. pooling {strategy}:", tuple(pipe.process_image(PHOTOS[1]).shape))


def example_4_architecture() -> None:
    model = create_qwen3_vl_vit("base")
    params = sum(p.numel() for p in model.parameters())
    print(f"4. architecture: base = {model.config.hidden_size} wide, {model.config.depth} blocks, "
          f"{model.config.num_heads} heads, {params:,} parameters")


def example_5_step_by_step() -> None:
    pixels = ImagePreprocessor(img_size=224).preprocess(Image.open(PHOTOS[2]))  # (1, 3, 224, 224)
    model = create_qwen3_vl_vit("small")
    with torch.inference_mode():
        tokens = model(pixels)
    print("5. step by step:", tuple(pixels.shape), "->", tuple(tokens.shape))


def example_6_configuration() -> None:
    model = Qwen3VisionTransformer(img_size=224, patch_size=14, embed_dim=384, depth=6, num_heads=6).eval()
    with torch.inference_mode():
        print("6. custom configuration:", tuple(model(torch.randn(2, 3, 224, 224)).shape))


def example_7_numpy() -> None:
    pipe = Qwen3VLPipeline(model_size="small", pooling_strategy="mean", output_format="numpy")
    array = pipe.process_image(np.asarray(Image.open(PHOTOS[3]).convert("RGB")))
    print("7. numpy output:", type(array).__name__, array.shape, array.dtype)


if __name__ == "__main__":
    for example in (example_1_basic, example_2_batch, example_3_pooling, example_4_architecture,
                    example_5_step_by_step, example_6_configuration, example_7_numpy):
        example()

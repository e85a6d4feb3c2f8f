"""A training step of a Qwen3-VL model with the vision tower frozen: recomputing the tower from pixels every step
(what training frameworks do) against reading its features from a vitok store (``vitok.integrations``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import row

IMAGE, VIDEO, START, END = 90, 91, 92, 93


def tiny_qwen3_vl(seed: int = 0, vision_depth: int = 3, text_layers: int = 3):
    """A randomly initialised full Qwen3-VL (vision + text) small enough for a CPU test."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        vision_config=dict(depth=vision_depth, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                           num_position_embeddings=2304, deepstack_visual_indexes=[0, vision_depth - 1]),
        text_config=dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=text_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                          "mrope_interleaved": True}),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random, small enough that the model stays well conditioned
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    return model


def run(args, tmp: Path) -> None:
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    import vitok

    from ..integrations.transformers import CachedImagesCollator
    from .common import make_jpegs

    model = tiny_qwen3_vl(vision_depth=6, text_layers=2)
    model.save_pretrained(tmp / "tiny-vl")
    processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, size={"shortest_edge": 4096, "longest_edge": 448 * 448})
    processor.save_pretrained(tmp / "tiny-vl")
    paths = make_jpegs(tmp / "train-imgs", 8, (640, 480))
    vitok.extract([str(tmp / "train-imgs")], tmp / "train-store", model=str(tmp / "tiny-vl"),
                  features=["merged", "deepstack"], store_dtype="float32", workers=0)
    store = vitok.open(tmp / "train-store")
    samples = [{"input_ids": [5, 6, START, IMAGE, END, 7, 8], "images": [p.name], "labels": [5, 6, 0, 0, 0, 7, 8]}
               for p in paths[:4]]
    batch = CachedImagesCollator(store, model.config)(samples)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths[:4]], return_tensors="pt")
    text = {k: v for k, v in batch.items() if k != "mm_encoder_outputs"}
    model.model.visual.requires_grad_(False)  # frozen tower, trained language model
    model.train()

    def step(**inputs) -> None:
        model.zero_grad()
        model(**inputs).loss.backward()

    timings = {}
    for label, inputs in (("pixels", {**text, "pixel_values": pixels["pixel_values"]}), ("cache", batch)):
        step(**inputs)
        start = time.perf_counter()
        for _ in range(args.iters):
            step(**inputs)
        timings[label] = (time.perf_counter() - start) / args.iters
    row("train", "tiny Qwen3-VL (tower 6x64, LM 2x48), 4 images of 640x480 per step, forward + backward",
        pixels_ms=timings["pixels"] * 1e3, cache_ms=timings["cache"] * 1e3,
        speedup=timings["pixels"] / timings["cache"])
    store.close()

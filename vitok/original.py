"""The original vitok API, kept working on top of the one encoder.

    model = create_qwen3_vl_vit(model_size="base")          # (B, 3, 224, 224) -> (B, 256, 1024)
    model = Qwen3VisionTransformer(embed_dim=768, depth=12)  # any shape, random weights
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import EncoderConfig
from .errors import UsageError
from .model import EncoderOutput, Grid, VisionEncoder, init_random_weights
from .presets import get_preset


class Qwen3VisionTransformer(VisionEncoder):
    """The original constructor: a ViT with 2D RoPE, no class token, no merger, raster token order.

    ``model(images)`` maps a (B, C, H, W) float tensor to (B, H/p * W/p, embed_dim) tokens. ``dropout`` is accepted
    for compatibility; the encoder is an inference model and applies none.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_channels: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        seed: int | None = 0,
    ) -> None:
        config = EncoderConfig(
            name=f"vit-{embed_dim}x{depth}",
            hidden_size=embed_dim,
            depth=depth,
            num_heads=num_heads,
            intermediate_size=int(embed_dim * mlp_ratio),
            patch_size=patch_size,
            temporal_patch_size=1,
            in_channels=in_channels,
            spatial_merge_size=1,
        )
        super().__init__(config)
        self.img_size = img_size
        self.dropout = dropout
        if seed is not None:
            init_random_weights(self, seed)

    @classmethod
    def from_config(cls, config: EncoderConfig, img_size: int = 224) -> Qwen3VisionTransformer:
        model = cls.__new__(cls)
        VisionEncoder.__init__(model, config)
        model.img_size, model.dropout = img_size, 0.0
        return model

    def forward(  # type: ignore[override]
        self,
        images: torch.Tensor,
        grid_thw: Sequence[Grid] | None = None,
        features: Sequence[str] = ("patch",),
        token_order: str = "raster",
    ) -> torch.Tensor | EncoderOutput:
        if grid_thw is not None:  # the packed interface of VisionEncoder
            return super().forward(images, grid_thw, features, token_order)
        if images.ndim != 4:
            raise UsageError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        p, m, t = self.config.patch_size, self.config.spatial_merge_size, self.config.temporal_patch_size
        if h % (p * m) or w % (p * m):
            raise UsageError(f"image size {h}x{w} is not a multiple of the patch size {p * m}")
        gh, gw = h // p, w // p
        x = images.reshape(b, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, bh, bw, mh, mw, c, p, p)
        x = x[:, :, :, :, :, :, None].expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # (..., c, T, p, p)
        pixel_values = x.reshape(b * gh * gw, c * t * p * p)
        out = super().forward(pixel_values, [(1, gh, gw)] * b, ("patch",), "raster")
        return out.features["patch"].view(b, gh * gw, -1)  # (B, N, D)


def create_qwen3_vl_vit(model_size: str = "base", img_size: int = 224, patch_size: int = 14) -> Qwen3VisionTransformer:
    """The original factory: a ``small``/``base``/``large`` (or any preset) tower with seeded random weights."""
    preset = get_preset(model_size)
    config = preset.encoder
    if patch_size != config.patch_size:
        from dataclasses import replace

        config = replace(config, patch_size=patch_size)
    model = Qwen3VisionTransformer.from_config(config, img_size)
    init_random_weights(model, 0)
    return model.eval()

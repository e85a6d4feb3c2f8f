"""The original vitok API, kept working on top of the one encoder and the one preprocessing.

    model = create_qwen3_vl_vit(model_size="base")          # (B, 3, 224, 224) -> (B, 256, 1024)
    model = Qwen3VisionTransformer(embed_dim=768, depth=12)  # any shape, random weights
    pipe = Qwen3VLPipeline(model_size="base", pooling_strategy="mean")
    pipe.process_image("photo.jpg").shape                    # (1, 1, 1024)
    pipe.process_batch([img1, img2]).shape                   # (2, 1, 1024)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .encoder.config import EncoderConfig
from .encoder.inference import load_encoder
from .encoder.model import EncoderOutput, Grid, VisionEncoder, init_random_weights
from .encoder.presets import get_preset
from .errors import UsageError
from .inputs.preprocess import PreparedImage, Preprocessor
from .pipeline.pool import check_pool, pool_tokens

OUTPUT_FORMATS = ("tensor", "numpy", "list")


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


class Qwen3VLPipeline:
    """Load a model once, then encode paths, PIL images or uint8 arrays.

    Args:
        model_size: preset name or checkpoint path (``small``, ``base``, ``large``, ``qwen3-vl-2b``, a folder...).
        pooling_strategy: ``none``, ``mean``, ``max`` or ``cls`` (the first token; there is no class token).
        device: ``None``/``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        output_format: ``tensor``, ``numpy`` or ``list``.
        feature: which output to return (default: ``merged`` for Qwen towers, ``patch`` for the ViT presets).
    """

    def __init__(
        self,
        model_size: str = "base",
        pooling_strategy: str = "none",
        device: str | None = None,
        output_format: str = "tensor",
        dtype: str = "auto",
        feature: str | None = None,
    ) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise UsageError(f"output_format {output_format!r} is not one of: {', '.join(OUTPUT_FORMATS)}")
        self.pooling_strategy = check_pool(pooling_strategy)
        self.output_format = output_format
        self.encoder = load_encoder(model_size, device or "auto", dtype)
        self.model = self.encoder.model
        self.preprocessor = Preprocessor(self.encoder.preprocess)
        self.feature = feature or ("merged" if self.encoder.config.has_merger else "patch")
        self.encoder.model.check_features([self.feature])

    def _encode(self, prepared: Sequence[PreparedImage]) -> list[torch.Tensor]:
        order = "raster" if self.feature == "patch" else "block"
        outputs = self.encoder.encode(list(prepared), (self.feature,), order).split()
        return [pool_tokens(o[self.feature], self.pooling_strategy).float().cpu() for o in outputs]

    def _format(self, tensor: torch.Tensor):
        if self.output_format == "numpy":
            return tensor.numpy()
        if self.output_format == "list":
            return tensor.tolist()
        return tensor

    def process_image(self, image) -> torch.Tensor | np.ndarray | list:
        """One image -> (1, N, D) tokens ((1, 1, D) when pooled)."""
        return self._format(self._encode([self.preprocessor.prepare(image)])[0].unsqueeze(0))

    def process_batch(self, images: Sequence) -> torch.Tensor | np.ndarray | list:
        """Several images -> (B, N, D); images whose token counts differ (native resolution) need pooling."""
        tokens = self._encode([self.preprocessor.prepare(im) for im in images])
        if len({t.shape for t in tokens}) > 1:
            raise UsageError(
                "images give different token counts at native resolution; use pooling_strategy='mean', resize them "
                "to one size, or call process_image for each"
            )
        return self._format(torch.stack(tokens))

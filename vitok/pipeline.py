"""The original pipeline API: images in memory -> token tensors, one call.

    pipe = Qwen3VLPipeline(model_size="base", pooling_strategy="mean")
    pipe.process_image("photo.jpg").shape        # (1, 1, 1024)
    pipe.process_batch([img1, img2]).shape       # (2, 1, 1024)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import UsageError
from .pool import check_pool, pool_tokens
from .preprocess import PreparedImage, Preprocessor
from .runtime import load_encoder

OUTPUT_FORMATS = ("tensor", "numpy", "list")


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

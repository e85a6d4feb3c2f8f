"""vitok: batch visual-token extraction with the Qwen3-VL vision encoder.

    import vitok
    vitok.extract(["./imgs"], "out/", model="qwen3-vl-2b", features=["merged"])
    store = vitok.open("out/")
    tokens = store[store.keys()[0]]            # (n, dim) float32

Heavy modules (torch) are imported on first use, so ``import vitok`` and ``vitok --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "extract": ("vitok.runner", "extract"),
    "ExtractOptions": ("vitok.options", "ExtractOptions"),
    "open": ("vitok.store", "open_store"),
    "verify": ("vitok.verify", "verify_store"),
    "load_encoder": ("vitok.inference", "load_encoder"),
    "VisionEncoder": ("vitok.model", "VisionEncoder"),
    "EncoderConfig": ("vitok.config", "EncoderConfig"),
    "PreprocessConfig": ("vitok.config", "PreprocessConfig"),
    "Preprocessor": ("vitok.preprocess", "Preprocessor"),
    "ImagePreprocessor": ("vitok.preprocess", "ImagePreprocessor"),
    "Qwen3VisionTransformer": ("vitok.original_api", "Qwen3VisionTransformer"),
    "create_qwen3_vl_vit": ("vitok.original_api", "create_qwen3_vl_vit"),
    "Qwen3VLPipeline": ("vitok.original_api", "Qwen3VLPipeline"),
    "VitokError": ("vitok.errors", "VitokError"),
}

if TYPE_CHECKING:
    from .config import EncoderConfig, PreprocessConfig
    from .errors import VitokError
    from .inference import load_encoder
    from .model import VisionEncoder
    from .options import ExtractOptions
    from .original_api import Qwen3VisionTransformer, Qwen3VLPipeline, create_qwen3_vl_vit
    from .preprocess import ImagePreprocessor, Preprocessor
    from .runner import extract
    from .store import open_store as open
    from .verify import verify_store as verify


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitok' has no attribute {name!r}")


__all__ = [*_EXPORTS, "__version__"]

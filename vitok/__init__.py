"""vitok: batch visual-token extraction with the Qwen vision encoders (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

    import vitok
    vitok.extract(["./imgs"], "out/", model="qwen3-vl-2b", features=["merged"])
    store = vitok.open("out/")
    tokens = store[store.keys()[0]]            # (n, dim) float32

Heavy modules (torch) are imported on first use, so ``import vitok`` and ``vitok --help`` stay instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

_EXPORTS = {
    "extract": ("vitok.run.extract", "extract"),
    "ExtractOptions": ("vitok.run.options", "ExtractOptions"),
    "open": ("vitok.storage.store", "open_store"),
    "verify": ("vitok.storage.verify", "verify_store"),
    "load_encoder": ("vitok.encoder.inference", "load_encoder"),
    "VisionEncoder": ("vitok.encoder.model", "VisionEncoder"),
    "EncoderConfig": ("vitok.encoder.config", "EncoderConfig"),
    "PreprocessConfig": ("vitok.inputs.preprocess_config", "PreprocessConfig"),
    "Preprocessor": ("vitok.inputs.preprocess", "Preprocessor"),
    "ImagePreprocessor": ("vitok.inputs.preprocess", "ImagePreprocessor"),
    "Qwen3VisionTransformer": ("vitok.original_api", "Qwen3VisionTransformer"),
    "create_qwen3_vl_vit": ("vitok.original_api", "create_qwen3_vl_vit"),
    "Qwen3VLPipeline": ("vitok.original_api", "Qwen3VLPipeline"),
    "VitokError": ("vitok.errors", "VitokError"),
}

if TYPE_CHECKING:
    from .encoder.config import EncoderConfig
    from .encoder.inference import load_encoder
    from .encoder.model import VisionEncoder
    from .errors import VitokError
    from .inputs.preprocess import ImagePreprocessor, Preprocessor
    from .inputs.preprocess_config import PreprocessConfig
    from .original_api import Qwen3VisionTransformer, Qwen3VLPipeline, create_qwen3_vl_vit
    from .run.extract import extract
    from .run.options import ExtractOptions
    from .storage.store import open_store as open
    from .storage.verify import verify_store as verify


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitok' has no attribute {name!r}")


__all__ = [*_EXPORTS, "__version__"]

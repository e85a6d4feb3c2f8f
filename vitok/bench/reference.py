"""The transformers reference tower of each family, built from a vitok config (for the benchmark and the tests).
Imports transformers when called: it is a test/bench dependency, never a runtime one."""

from __future__ import annotations

from ..encoder.config import EncoderConfig


def reference_config(config: EncoderConfig):
    """The transformers vision config equal to a vitok EncoderConfig."""
    family = config.family
    common = dict(depth=config.depth, num_heads=config.num_heads, in_channels=config.in_channels,
                  patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                  spatial_merge_size=config.spatial_merge_size)
    if family in ("qwen3_vl", "qwen3_5"):
        if family == "qwen3_5":
            from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig as Config
            extra = {}
        else:
            from transformers import Qwen3VLVisionConfig as Config
            extra = dict(deepstack_visual_indexes=list(config.deepstack_visual_indexes))
        return Config(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                      out_hidden_size=config.out_hidden_size, hidden_act=config.hidden_act,
                      num_position_embeddings=config.num_position_embeddings, **common, **extra)
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

        ratio = config.intermediate_size / config.hidden_size
        return Qwen2VLVisionConfig(embed_dim=config.hidden_size, hidden_size=config.out_hidden_size,
                                   mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
                                   hidden_act=config.hidden_act, **common)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

        return Qwen2_5_VLVisionConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                      out_hidden_size=config.out_hidden_size, hidden_act=config.hidden_act,
                                      window_size=config.window_size,
                                      fullatt_block_indexes=list(config.fullatt_block_indexes), **common)
    raise ValueError(f"no transformers reference for family {family!r}")


def reference_tower(config: EncoderConfig):
    """An (untrained) transformers tower of the config's family and shape."""
    hf_config = reference_config(config)
    family = config.family
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Model
    elif family == "qwen3_5":
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel as Model
    elif family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Model
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Model,
        )
    return Model._from_config(hf_config)

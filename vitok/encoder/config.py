"""Typed configuration of the encoder: what the tower is, and the image processor each family ships with.

Presets are data (``configs/*.toml``, see ``vitok.encoder.presets``); these dataclasses are their schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..inputs.preprocess_config import CLIP_MEAN, CLIP_STD, PreprocessConfig
from ..inputs.video_config import VideoConfig, rule_of

FEATURES = ("patch", "merged", "deepstack")
# family -> what differs, as configuration: module names (merger, MLP) and defaults of the released towers
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
# block MLP activations: transformers' ACT2FN names that have no parameters (vitok.encoder.model.ACTIVATIONS)
ACTIVATIONS = (
    "gelu_pytorch_tanh", "gelu", "quick_gelu", "silu", "swish", "gelu_new", "gelu_accurate", "gelu_python_tanh",
    "gelu_python", "gelu_fast", "gelu_10", "relu", "relu2", "relu6", "leaky_relu", "hardswish", "mish", "sigmoid",
    "tanh", "linear", "laplace", "sqrtsoftplus",
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("sdpa", "varlen", "eager")  # eager: the slow test oracle
TOKEN_ORDERS = ("block", "raster")  # rows of patch-level outputs: the reference's 2x2-block order, or row-major
# vision model_type (or the checkpoint's top-level model_type) -> family
MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl", "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_vision": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl", "qwen3_vl_vision": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl", "qwen3_vl_moe_vision": "qwen3_vl",
    "qwen3_5": "qwen3_5", "qwen3_5_vision": "qwen3_5", "qwen3_5_moe": "qwen3_5", "qwen3_5_moe_vision": "qwen3_5",
}
# The defaults of transformers' (5.24) vision config classes: what a config.json that leaves a field out means. The MoE
# variants' classes have the same fields and defaults. (tests/test_checkpoint.py checks this table against them.)
_QWEN3_DEFAULTS = dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16,
                       in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                       num_position_embeddings=2304)
HF_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       out_hidden_size=3584, fullatt_block_indexes=(7, 15, 23, 31)),
    "qwen3_vl": {**_QWEN3_DEFAULTS, "deepstack_visual_indexes": (8, 16, 24)},
    "qwen3_5": dict(_QWEN3_DEFAULTS),  # no DeepStack
}
HF_ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}  # the classes' attribute_map

@dataclass(frozen=True)
class EncoderConfig:
    """Shape of one vision tower. Field names follow the Hugging Face ``vision_config``."""

    name: str
    hidden_size: int  # D: width of every block
    depth: int  # L: number of transformer blocks
    num_heads: int  # H: attention heads; head_dim = D / H
    intermediate_size: int  # I: MLP hidden width
    patch_size: int = 16  # p: pixels per patch side
    temporal_patch_size: int = 2  # T: frames per patch (a still image is repeated T times)
    in_channels: int = 3
    spatial_merge_size: int = 2  # m: the merger fuses m x m patches; 1 means raster order and no merger
    out_hidden_size: int | None = None  # O: merger output width; None = the tower has no merger
    num_position_embeddings: int = 0  # P: learned absolute table (sqrt(P) per side); 0 = RoPE only
    deepstack_visual_indexes: tuple[int, ...] = ()  # DeepStack merger k taps block [k] (see deepstack_layers)
    hidden_act: str = "gelu_pytorch_tanh"  # block MLP activation (mergers always use erf GELU)
    patch_embed_bias: bool = True
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    family: str = "qwen3_vl"  # module names of the checkpoint: qwen2_vl | qwen2_5_vl | qwen3_vl | qwen3_5
    norm: str = "layernorm"  # layernorm (weight and bias) | rmsnorm (weight only, computed in float32): Qwen2.5-VL
    mlp: str = "gelu"  # gelu: fc1 -> act -> fc2 | swiglu: down(act(gate) * up), Qwen2.5-VL
    window_size: int = 0  # Qwen2.5-VL: attention within windows of this many pixels (0: whole images everywhere)
    fullatt_block_indexes: tuple[int, ...] = ()  # with window_size: the blocks that attend to the whole image

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UsageError(
                f"{self.name}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise UsageError(f"{self.name}: head_dim {self.head_dim} must be a multiple of 4 for the 2D rotary")
        if self.hidden_act not in ACTIVATIONS:
            raise UsageError(f"{self.name}: hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.family not in FAMILIES:
            raise UsageError(f"{self.name}: family {self.family!r} is not one of: {', '.join(FAMILIES)}")
        if self.norm not in ("layernorm", "rmsnorm") or self.mlp not in ("gelu", "swiglu"):
            raise UsageError(f"{self.name}: norm must be layernorm|rmsnorm and mlp gelu|swiglu")
        if self.window_size and self.window_size < self.patch_size * self.spatial_merge_size:
            raise UsageError(f"{self.name}: window_size {self.window_size} is smaller than patch x merge "
                             f"({self.patch_size * self.spatial_merge_size}); windows hold window_size // (patch x "
                             "merge) merged tokens a side")
        if self.deepstack_visual_indexes and self.out_hidden_size is None:
            raise UsageError(f"{self.name}: DeepStack mergers need out_hidden_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """The blocks whose output is tapped, in the reference's order (block order). As in transformers, every index
        has a merger (its weights are in the checkpoint), a repeated block is tapped once (by its first merger), and an
        index outside 0..depth-1 (a config that leaves the field at its (8, 16, 24) default on a shallow tower) is
        never reached."""
        return tuple(i for i in range(self.depth) if i in self.deepstack_visual_indexes)

    @property
    def has_merger(self) -> bool:
        return self.out_hidden_size is not None

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: C * T * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def features(self) -> tuple[str, ...]:
        """Named outputs this tower can produce."""
        out = ["patch"]
        if self.has_merger:
            out.append("merged")
        if self.deepstack_layers:
            out.append("deepstack")
        return tuple(out)

    def num_parameters(self) -> int:
        """Closed-form parameter count (checked against a meta-device build in the tests)."""
        d, i, o = self.hidden_size, self.intermediate_size, self.out_hidden_size

        def norm(size: int) -> int:
            return 2 * size if self.norm == "layernorm" else size

        mlp = 3 * d * i + 2 * i + d if self.mlp == "swiglu" else 2 * d * i + i + d
        n = d * self.patch_dim + (d if self.patch_embed_bias else 0)
        n += self.num_position_embeddings * d
        n += self.depth * (4 * d * d + 4 * d + 2 * norm(d) + mlp)
        if o is not None:
            wide = d * self.spatial_merge_size**2
            n += norm(d) + wide * wide + wide + wide * o + o
            n += len(self.deepstack_visual_indexes) * (norm(wide) + wide * wide + wide + wide * o + o)
        return n

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["deepstack_visual_indexes"] = list(self.deepstack_visual_indexes)
        data["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown encoder config fields {unknown}; valid: {sorted(known)}")
        data = dict(data)
        data["deepstack_visual_indexes"] = tuple(data.get("deepstack_visual_indexes", ()))
        data["fullatt_block_indexes"] = tuple(data.get("fullatt_block_indexes", ()))
        return cls(**data)

    @classmethod
    def from_hf_vision_config(cls, vision: dict[str, Any], name: str, model_type: str | None = None) -> EncoderConfig:
        """Build from a Hugging Face ``vision_config`` dict of any supported family (``model_type``: the
        checkpoint's top-level type, used when the vision config does not name its own).

        A field the dict leaves out takes the default of the family's transformers config class
        (``HF_VISION_DEFAULTS``), as ``from_pretrained`` does; a value vitok cannot run is one UsageError naming it.
        """
        kind = vision.get("model_type") or model_type or "qwen3_vl_vision"
        family = MODEL_TYPES.get(kind) or MODEL_TYPES.get(model_type or "")
        if family is None:
            raise UsageError(
                f"{name}: model_type {kind!r} is not supported; vitok reads the vision towers of "
                f"{', '.join(sorted(MODEL_TYPES))}"
            )
        given = {HF_ALIASES.get(key, key): value for key, value in vision.items()}
        hf = {**HF_VISION_DEFAULTS[family], **{k: v for k, v in given.items() if v is not None}}
        rope = given.get("rope_parameters") or given.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "axial"))
        if rope_type != "axial":
            raise UsageError(f"{name}: vision rope_parameters.rope_type {rope_type!r} is not supported (only 'axial', "
                             "as in transformers' Qwen vision towers)")
        width = int(hf["embed_dim"] if family == "qwen2_vl" else hf["hidden_size"])
        heads = int(hf["num_heads"])
        if hf.get("head_dim") is not None and heads and int(hf["head_dim"]) != width // heads:
            raise UsageError(f"{name}: vision_config head_dim {hf['head_dim']} differs from the width / num_heads "
                             f"({width} / {heads}); transformers' tower cannot run it either")
        common = dict(
            name=name, depth=int(hf["depth"]), num_heads=heads, hidden_size=width,
            in_channels=int(hf["in_channels"] if "in_channels" in given else given.get("in_chans", 3)),
            patch_size=_int_field(name, hf, "patch_size"), temporal_patch_size=_int_field(name, hf,
                                                                                         "temporal_patch_size"),
            spatial_merge_size=int(hf["spatial_merge_size"]), hidden_act=str(hf["hidden_act"]),
            rope_theta=float(rope.get("rope_theta", given.get("rope_theta", 10000.0))), family=family,
        )
        if family == "qwen2_vl":  # its hidden_size is the merger's output; the tower's width is embed_dim
            return cls(**common, intermediate_size=int(width * hf["mlp_ratio"]), out_hidden_size=int(hf["hidden_size"]),
                       patch_embed_bias=False)
        if family == "qwen2_5_vl":
            window = int(hf["window_size"])
            unit = common["patch_size"] * common["spatial_merge_size"]
            if window < unit:  # transformers divides by window // unit
                raise UsageError(f"{name}: window_size {window} is smaller than patch_size x spatial_merge_size "
                                 f"({unit}): no window holds a merged token")
            return cls(**common, intermediate_size=int(hf["intermediate_size"]),
                       out_hidden_size=int(hf["out_hidden_size"]), patch_embed_bias=False, norm="rmsnorm",
                       mlp="swiglu", window_size=window,
                       fullatt_block_indexes=tuple(int(i) for i in hf["fullatt_block_indexes"]))
        deepstack = tuple(int(i) for i in hf["deepstack_visual_indexes"]) if family == "qwen3_vl" else ()
        return cls(**common, intermediate_size=int(hf["intermediate_size"]), out_hidden_size=int(hf["out_hidden_size"]),
                   num_position_embeddings=int(hf["num_position_embeddings"]), deepstack_visual_indexes=deepstack)


def _int_field(name: str, hf: dict[str, Any], key: str) -> int:
    """transformers types patch sizes ``int | list``; its towers use them as one int (a cube or square kernel)."""
    value = hf[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UsageError(f"{name}: vision_config {key} {list(value)} is not supported (vitok's patches are square)")
        value = value[0]
    return int(value)


def preprocess_for_tower(encoder: EncoderConfig) -> PreprocessConfig:
    """The released image processor's settings for a tower's family (when a checkpoint ships none)."""
    qwen2 = encoder.family in ("qwen2_vl", "qwen2_5_vl")
    return PreprocessConfig(patch_size=encoder.patch_size, merge_size=encoder.spatial_merge_size,
                            temporal_patch_size=encoder.temporal_patch_size,
                            min_pixels=3136 if qwen2 else 65536, max_pixels=12845056 if qwen2 else 16777216,
                            image_mean=CLIP_MEAN if qwen2 else (0.5, 0.5, 0.5),
                            image_std=CLIP_STD if qwen2 else (0.5, 0.5, 0.5))


def check_preprocess_fits(preprocess: PreprocessConfig, encoder: EncoderConfig, where: str = "preprocessing") -> None:
    """Refuse patches the tower cannot take (transformers' tower would fail on them or misread them)."""
    pairs = [("patch_size", preprocess.patch_size, "patch_size", encoder.patch_size),
             ("merge_size", preprocess.merge_size, "spatial_merge_size", encoder.spatial_merge_size),
             ("temporal_patch_size", preprocess.temporal_patch_size, "temporal_patch_size",
              encoder.temporal_patch_size),
             ("channels (RGB)", len(preprocess.image_mean), "in_channels", encoder.in_channels)]
    for ours, value, theirs, tower in pairs:
        if value != tower:
            raise UsageError(f"{where}: {ours} {value} does not fit the vision tower's {theirs} {tower}")


# The video processor settings the released checkpoints ship: Qwen3-VL's video_preprocessor_config.json (Qwen3.5
# reuses its processor); Qwen2-VL and Qwen2.5-VL ship none, so transformers reads their image processor's
# preprocessor_config.json as the video processor's (its min_pixels / max_pixels become the per-frame budget).
RELEASED_VIDEO = {
    "qwen3_vl": {"size": {"shortest_edge": 4096, "longest_edge": 25165824}},
    "qwen2_vl": {"min_pixels": 3136, "max_pixels": 12845056},
}


def video_for_tower(encoder: EncoderConfig, settings: dict[str, Any] | None = None,
                    where: str = "the released video processor settings") -> VideoConfig:
    """How videos are preprocessed for a tower: its checkpoint's video processor ``settings`` as transformers finds
    them (None: the family's released settings, with the tower's patch sizes), checked against the tower."""
    if not encoder.has_merger or encoder.spatial_merge_size != 2:
        raise UsageError(f"{encoder.name}: videos need a Qwen tower (a merger of 2x2 patches); this one has none")
    rule = rule_of(encoder.family)
    if settings is None:
        settings = {**RELEASED_VIDEO[rule], "patch_size": encoder.patch_size,
                    "temporal_patch_size": encoder.temporal_patch_size, "merge_size": encoder.spatial_merge_size}
    video = VideoConfig.from_hf_video_processor_config(settings, rule, where)
    check_preprocess_fits(video.pixels, encoder, where)
    return video

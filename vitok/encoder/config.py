"""Typed configuration: what the encoder is and how images are turned into its input.

Presets are data (``configs/*.toml``, see ``vitok.encoder.presets``); these dataclasses are their schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURES = ("patch", "merged", "deepstack")
# family -> what differs, as configuration: module names (merger, MLP) and defaults of the released towers
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "quick_gelu", "silu")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("sdpa", "varlen", "eager")  # eager: the slow test oracle
TOKEN_ORDERS = ("block", "raster")  # rows of patch-level outputs: the reference's 2x2-block order, or row-major
RESIZE_BACKENDS = ("torchvision", "pil")
DECODERS = ("exact", "gpu")
# vision model_type (or the checkpoint's top-level model_type) -> family
MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl", "qwen2_vl_vision": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_vision": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl", "qwen3_vl_vision": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl", "qwen3_vl_moe_vision": "qwen3_vl",
    "qwen3_5": "qwen3_5", "qwen3_5_vision": "qwen3_5", "qwen3_5_moe": "qwen3_5", "qwen3_5_moe_vision": "qwen3_5",
}

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
    deepstack_visual_indexes: tuple[int, ...] = ()  # blocks whose output feeds a DeepStack merger
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
        if self.window_size and self.window_size % (self.patch_size * self.spatial_merge_size):
            raise UsageError(f"{self.name}: window_size {self.window_size} is not a multiple of patch x merge")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise UsageError(f"{self.name}: deepstack_visual_indexes {bad} outside 0..{self.depth - 1}")
        if self.deepstack_visual_indexes and self.out_hidden_size is None:
            raise UsageError(f"{self.name}: DeepStack mergers need out_hidden_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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
        if self.deepstack_visual_indexes:
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
        checkpoint's top-level type, used when the vision config does not name its own)."""
        kind = vision.get("model_type") or model_type or "qwen3_vl_vision"
        family = MODEL_TYPES.get(kind) or MODEL_TYPES.get(model_type or "")
        if family is None:
            raise UsageError(
                f"{name}: model_type {kind!r} is not supported; vitok reads the vision towers of "
                f"{', '.join(sorted(MODEL_TYPES))}"
            )
        rope = vision.get("rope_parameters") or {}
        common = dict(
            name=name, depth=int(vision["depth"]), num_heads=int(vision["num_heads"]),
            in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
            patch_size=int(vision.get("patch_size", 14 if family.startswith("qwen2") else 16)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))), family=family,
        )
        if family == "qwen2_vl":  # its hidden_size is the merger's output; the tower's width is embed_dim
            width = int(vision["embed_dim"])
            return cls(**common, hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4))),
                       out_hidden_size=int(vision["hidden_size"]), hidden_act=str(vision.get("hidden_act",
                                                                                               "quick_gelu")),
                       patch_embed_bias=False)
        if family == "qwen2_5_vl":
            full = tuple(int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31)))
            return cls(**common, hidden_size=int(vision["hidden_size"]),
                       intermediate_size=int(vision["intermediate_size"]),
                       out_hidden_size=int(vision["out_hidden_size"]), hidden_act=str(vision.get("hidden_act", "silu")),
                       patch_embed_bias=False, norm="rmsnorm", mlp="swiglu",
                       window_size=int(vision.get("window_size", 112)), fullatt_block_indexes=full)
        deepstack = () if family == "qwen3_5" else tuple(int(i) for i in vision.get("deepstack_visual_indexes", ()))
        return cls(**common, hidden_size=int(vision["hidden_size"]),
                   intermediate_size=int(vision["intermediate_size"]), out_hidden_size=int(vision["out_hidden_size"]),
                   num_position_embeddings=int(vision.get("num_position_embeddings", 2304)),
                   deepstack_visual_indexes=deepstack, hidden_act=str(vision.get("hidden_act", "gelu_pytorch_tanh")))


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded RGB image becomes encoder patches.

    ``mode="qwen"`` is the Qwen3-VL image processor (smart_resize to multiples of patch*merge, bicubic);
    ``mode="fixed"`` resizes every image to ``image_size`` x ``image_size`` (the original small/base/large
    design, and ``--image-size`` for Qwen towers).
    """

    mode: Literal["qwen", "fixed"] = "qwen"
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65536  # HF "shortest_edge": 64 merged tokens
    max_pixels: int = 16777216  # HF "longest_edge": 16384 merged tokens
    image_size: int | None = None  # fixed square side (mode="fixed")
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    backend: Literal["torchvision", "pil"] = "torchvision"  # torchvision = the reference's default
    fast_decode: bool = False  # JPEG DCT-domain downscale (draft) when the target is >= 2x smaller
    decode: Literal["exact", "gpu"] = "exact"  # gpu: baseline JPEGs decoded by nvJPEG (vitok.inputs.gpu_decode)
    max_image_pixels: int = 178_956_970  # refuse larger images from their header (decompression bombs)
    allow_truncated: bool = False  # decode truncated files as far as they go (the record says so)
    max_aspect_ratio: float = 200.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("qwen", "fixed"):
            raise UsageError(f"preprocess mode {self.mode!r} is not one of: qwen, fixed")
        if self.decode not in DECODERS:
            raise UsageError(f"decode {self.decode!r} is not one of: {', '.join(DECODERS)}")
        if self.backend not in RESIZE_BACKENDS:
            raise UsageError(f"preprocess backend {self.backend!r} is not one of: {', '.join(RESIZE_BACKENDS)}")
        if self.resample not in ("bicubic", "bilinear"):
            raise UsageError(f"resample {self.resample!r} is not one of: bicubic, bilinear")
        if self.mode == "fixed":
            if not self.image_size:
                raise UsageError("fixed-size preprocessing needs image_size")
            if self.image_size % self.factor:
                raise UsageError(
                    f"image size {self.image_size} must be a multiple of {self.factor} "
                    f"(patch {self.patch_size} x merge {self.merge_size})"
                )
        if self.min_pixels > self.max_pixels:
            raise UsageError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown preprocess config fields {unknown}; valid: {sorted(known)}")
        data = dict(data)
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)

    def replace(self, **changes: Any) -> PreprocessConfig:
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_tower(cls, encoder: EncoderConfig) -> PreprocessConfig:
        """The released image processor's settings for a tower's family (when a checkpoint ships none)."""
        qwen2 = encoder.family in ("qwen2_vl", "qwen2_5_vl")
        return cls(patch_size=encoder.patch_size, merge_size=encoder.spatial_merge_size,
                   temporal_patch_size=encoder.temporal_patch_size,
                   min_pixels=3136 if qwen2 else 65536, max_pixels=12845056 if qwen2 else 16777216,
                   image_mean=CLIP_MEAN if qwen2 else (0.5, 0.5, 0.5), image_std=CLIP_STD if qwen2 else (0.5, 0.5, 0.5))

    @classmethod
    def from_hf_preprocessor_config(cls, data: dict[str, Any], base: PreprocessConfig) -> PreprocessConfig:
        """Read a Hugging Face ``preprocessor_config.json`` (Qwen2-VL image processor family)."""
        size = data.get("size") or {}
        resample = {2: "bilinear", 3: "bicubic"}.get(int(data.get("resample", 3)), "bicubic")
        return dataclasses.replace(
            base,
            mode="qwen",
            patch_size=int(data.get("patch_size", base.patch_size)),
            merge_size=int(data.get("merge_size", base.merge_size)),
            temporal_patch_size=int(data.get("temporal_patch_size", base.temporal_patch_size)),
            min_pixels=int(size.get("shortest_edge", data.get("min_pixels", base.min_pixels))),
            max_pixels=int(size.get("longest_edge", data.get("max_pixels", base.max_pixels))),
            image_mean=tuple(float(v) for v in data.get("image_mean", base.image_mean)),
            image_std=tuple(float(v) for v in data.get("image_std", base.image_std)),
            rescale_factor=float(data.get("rescale_factor", base.rescale_factor)),
            resample=resample,
        )

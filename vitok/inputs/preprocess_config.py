"""Typed configuration of preprocessing: how a decoded RGB image becomes the encoder's patches.

Read from a checkpoint's image processor settings (``from_hf_preprocessor_config``) or a preset; what the encoder
requires of it is checked on the encoder's side (``encoder.config.check_preprocess_fits``).
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
RESIZE_BACKENDS = ("torchvision", "pil")
DECODERS = ("exact", "gpu")


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
    do_resize: bool = True  # False: images go in at their own size, which must be a multiple of patch * merge
    do_rescale: bool = True  # multiply by rescale_factor
    do_normalize: bool = True  # subtract image_mean, divide by image_std
    do_convert_rgb: bool = True  # False: only RGB files are taken (the reference cannot normalise other modes)
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

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        # the reference's switches are recorded only when off: stores written before they existed keep their settings
        # (and fingerprint)
        for switch in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if data[switch]:
                data.pop(switch)
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
    def from_hf_preprocessor_config(cls, data: dict[str, Any], base: PreprocessConfig,
                                    where: str = "preprocessor_config.json") -> PreprocessConfig:
        """Read a Hugging Face ``preprocessor_config.json`` (every Qwen VL family uses ``Qwen2VLImageProcessor``).

        As transformers reads it: a field left out takes the processor class's default (``HF_PROCESSOR_DEFAULTS``,
        not the tower's released values); ``min_pixels`` / ``max_pixels`` override ``size``; a ``size`` replaces the
        default whole. Settings the reference cannot run, or vitok cannot reproduce, are one UsageError naming them.
        """
        hf = {**HF_PROCESSOR_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
        size = dict(data["size"]) if data.get("size") is not None else dict(HF_PROCESSOR_DEFAULTS["size"])
        if data.get("min_pixels") is not None:
            size["shortest_edge"] = data["min_pixels"]
        if data.get("max_pixels") is not None:
            size["longest_edge"] = data["max_pixels"]
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise UsageError(f"{where}: size {data.get('size')} lacks shortest_edge or longest_edge (and no "
                             "min_pixels / max_pixels); transformers' Qwen2VLImageProcessor refuses every image then")
        resample = {2: "bilinear", 3: "bicubic"}.get(hf["resample"] if isinstance(hf["resample"], int) else -1)
        if resample is None:
            raise UsageError(f"{where}: resample {hf['resample']!r} is not supported (2 = bilinear, 3 = bicubic)")

        def per_channel(key: str) -> tuple[float, ...]:  # one value (or a list of one) is every channel's
            value = hf[key]
            values = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)
            values = values * 3 if len(values) == 1 else values
            if len(values) != 3:
                raise UsageError(f"{where}: {key} {list(values)} needs one value per RGB channel (3)")
            return values

        return dataclasses.replace(
            base,
            mode="qwen",
            patch_size=int(hf["patch_size"]),
            merge_size=int(hf["merge_size"]),
            temporal_patch_size=int(hf["temporal_patch_size"]),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            image_mean=per_channel("image_mean"),
            image_std=per_channel("image_std"),
            rescale_factor=float(hf["rescale_factor"]),
            resample=resample,
            do_resize=bool(hf["do_resize"]),
            do_rescale=bool(hf["do_rescale"]),
            do_normalize=bool(hf["do_normalize"]),
            do_convert_rgb=bool(hf["do_convert_rgb"]),
        )

# transformers' Qwen2VLImageProcessor class defaults (the processor of every Qwen VL family): what a
# preprocessor_config.json that leaves a field out means (tests/test_preprocess.py checks them against the class)
HF_PROCESSOR_DEFAULTS: dict[str, Any] = dict(
    patch_size=14, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    image_mean=CLIP_MEAN, image_std=CLIP_STD, rescale_factor=1 / 255, resample=3, do_resize=True, do_rescale=True,
    do_normalize=True, do_convert_rgb=True,
)

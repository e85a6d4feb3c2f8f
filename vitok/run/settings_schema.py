"""The store's settings schema, as a run decides it: the settings that decide the tokens (``make_settings``, whose
hash is the store's fingerprint), the layout each feature is stored in, a new store's header, and the options an
older header implies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..encoder.config import EncoderConfig
from ..encoder.features import token_orders
from ..errors import SettingsMismatchError
from ..inputs.identity import CONTENT_ID, SOURCE_HASH
from ..inputs.sources import listing_kind
from ..storage import RunHeader
from ..storage.format import FeatureLayout
from ..storage.records import ModelSettings, Settings, diff_settings, vision_revision
from ..version import __version__

if TYPE_CHECKING:
    from .job import Job


def feature_layouts(config: EncoderConfig, features: Sequence[str]) -> dict[str, FeatureLayout]:
    """Stored shape of each feature: (rows, dim), or (K, rows, dim) for deepstack; pooling keeps the shape."""
    layouts = {}
    for feature in features:
        if feature == "deepstack":
            layouts[feature] = FeatureLayout(int(config.out_hidden_size), len(config.deepstack_layers))
        elif feature == "merged":
            layouts[feature] = FeatureLayout(int(config.out_hidden_size))
        else:  # patch, block:N
            layouts[feature] = FeatureLayout(config.hidden_size)
    return layouts


def make_settings(job: Job, weights: str | None) -> Settings:
    """The settings that decide what the tokens are (compared on resume; their hash is the fingerprint)."""
    config = job.source.encoder.to_dict()
    config.pop("name")
    options = job.options
    return Settings(
        model=ModelSettings(job.source.name, config.get("family", "qwen3_vl"), weights, job.source.random_weights,
                            config),
        preprocess=job.preprocess.to_dict(),
        features=tuple(job.features),
        pool=options.pool,
        pool_by="step" if options.pool_steps else None,
        compute_dtype=str(job.dtype).removeprefix("torch."),
        store_dtype=options.store_dtype,
        token_order=token_orders(job.source.encoder, job.features, options.token_order),
        format=options.format,
        shard_size=options.shard_size,
        input={"kind": job.plan.kind if job.plan else listing_kind(job.listing), **job.reader_options.to_dict()},
        video=job.video.to_dict() if job.video is not None else None,
    )


def check_settings(job: Job, weights: str | None) -> None:
    """Refuse a store written with other settings (the weights compared once they are known)."""
    stored = job.header.settings.to_json()
    requested = make_settings(job, weights).to_json()
    if weights is None:
        stored = {**stored, "model": {**stored["model"], "weights": None}}
    differences = diff_settings(stored, requested)
    if job.header.schema != 2:
        raise SettingsMismatchError(f"{job.out} was written by vitok {job.header.vitok_version} (store schema "
                                    f"{job.header.schema}); this vitok writes schema 2: use another -o, or "
                                    "--overwrite to start over")
    if differences:
        raise SettingsMismatchError(
            f"{job.out} was written with other settings ({'; '.join(differences)}); use the same settings to "
            "resume, another -o, or --overwrite to start over")


def new_header(job: Job, settings: Settings, environment: dict[str, Any]) -> RunHeader:
    """The header of a new store: its settings, the environment that wrote it and the identity of what made its
    tokens."""
    header = RunHeader(settings, __version__, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), environment,
                       options=job.options.to_store())
    header.identity = header_identity(settings, environment.get("decoders", {}))
    return header


def header_identity(settings: Settings, decoders: dict[str, Any]) -> dict[str, Any]:
    """The run header's ``identity``: vision revision, decoder identity, and the algorithms of the record hashes."""
    preprocess = settings.preprocess
    return {
        "vision_revision": vision_revision(settings.model.config, settings.model.weights),
        "decoder": {**decoders, "decode": preprocess.get("decode", "exact"), "backend": preprocess.get("backend"),
                    "fast_decode": preprocess.get("fast_decode", False)},
        "content_id": CONTENT_ID,
        "source_hash": SOURCE_HASH,
    }


def options_from_settings(stored: Settings) -> dict[str, Any]:
    """The options a store made before headers recorded them was made with, as far as its settings tell."""
    from ..encoder.presets import registry

    settings = stored.to_json()
    options: dict[str, Any] = {name: settings[name] for name in ("features", "pool", "store_dtype", "format",
                                                                 "shard_size") if name in settings}
    name = settings.get("model", {}).get("name")
    if name in registry():
        options["model"] = name
    preprocess = settings.get("preprocess", {})
    for option_name in ("min_pixels", "max_pixels", "backend", "max_image_pixels", "fast_decode", "allow_truncated",
                        "decode"):
        if option_name in preprocess:
            options[option_name] = preprocess[option_name]
    if preprocess.get("mode") == "fixed":
        options["image_size"] = preprocess.get("image_size")
    if any(order == "raster" for order in settings.get("token_order", {}).values()):
        options["token_order"] = "raster"  # (the merged rows are "raster over the merged grid" either way)
    for option_name in ("meta_fields", "image_column", "key_column"):
        if settings.get("input", {}).get(option_name) is not None:
            options[option_name] = settings["input"][option_name]
    return options


def video_limits_from_settings(stored: Settings) -> dict[str, Any]:
    """The limits a store of videos was made with, from its settings: a store made when a limit's default was
    another (``--max-video-patches`` was 262144 before long videos were cut in time) resumes with its own."""
    video = stored.video or {}
    return {name: video[name] for name in ("max_video_patches", "max_video_frames", "max_video_seconds")
            if video.get(name) is not None}

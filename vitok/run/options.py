"""Everything ``vitok extract`` can be told, declared once.

Each field of :class:`ExtractOptions` carries its help, its panel in ``--help``, its choices (the owning modules'
constants) and its lower bound;
the CLI builds its flags from these fields (``vitok.cli.flags``), ``validate`` checks them before anything is read or
written, and ``to_argv`` turns them back into flags (``--gpus`` starts its children with it). Adding an option is one
field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ..encoder.config import ATTENTION_KERNELS, COMPUTE_DTYPES, TOKEN_ORDERS
from ..errors import UsageError
from ..inputs.preprocess_config import DECODERS, RESIZE_BACKENDS
from ..inputs.sources import INPUT_FORMATS
from ..inputs.video_config import (
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_PATCHES,
    MAX_VIDEO_SECONDS,
    VIDEO_CHUNK_PATCHES,
    VIDEO_DECODERS,
)
from ..pipeline.batcher import BUDGET_CPU, BUDGET_CUDA
from ..pipeline.pool import POOLS
from ..storage.dtypes import STORE_DTYPES
from ..storage.hdf5 import COMPRESSIONS
from ..storage.plan.changes import MODES as CHANGE_MODES
from ..storage.roots import STORAGE_OPTION_HELP, check_location, parse_storage_options
from ..storage.shards import FORMATS
from .ray_connect import check_address

CONNECT_TIMEOUT = 30  # seconds: a healthy cluster answers in well under one
PANELS = ("Model", "Inputs", "Outputs", "Preprocessing", "Video", "Speed", "Cluster")


def option(default: Any, help: str, panel: str, *, choices: Sequence[str] | None = None, minimum: int | None = None,
           flags: Sequence[str] = (), metavar: str | None = None, listing: bool = False, multiple: bool = False) -> Any:
    """A dataclass field with its CLI metadata (``listing``: a comma-separated list on the command line;
    ``multiple``: a flag given once per value)."""
    assert panel in PANELS, panel
    meta = {"help": help, "panel": panel, "choices": tuple(choices) if choices else None, "minimum": minimum,
            "flags": tuple(flags), "metavar": metavar, "listing": listing, "multiple": multiple}
    return field(default=default, metadata={"cli": meta})


@dataclass
class ExtractOptions:
    # ---- Model
    model: str = option("base", "Preset name (see 'vitok models'), checkpoint folder, .safetensors file or Hugging "
                        "Face repo id.", "Model", flags=("--model", "-m"), metavar="NAME|PATH")
    device: str = option("auto", "auto | cpu | cuda | cuda:N.", "Model", metavar="DEVICE")
    dtype: str = option("auto", "Compute dtype: auto is bfloat16 on GPUs that support it, else float32.", "Model",
                        choices=("auto", *COMPUTE_DTYPES))
    attention: str = option("auto", "Attention kernel: auto is varlen FlashAttention on CUDA in half precision, "
                            "else sdpa; eager is the slow test oracle.", "Model",
                            choices=("auto", *ATTENTION_KERNELS))
    seed: int = option(0, "Seed of the random weights of a preset without a checkpoint.", "Model")
    # ---- Inputs
    files_from: str | None = option(None, "File with one input per line (an image, video, tar or parquet path, or a "
                                    "URL of a video, tar or parquet file); '-' = stdin.", "Inputs", metavar="LIST")
    input_format: str = option("auto", "Kind of input: auto decides by extension (a folder holding images is a "
                               "folder of images, else of videos, else of tars, else of parquet files) and whether "
                               "tars hold images or videos by their first members; wds: tars of images; video: "
                               "video files (found by extension or content) or tars of videos.", "Inputs",
                               choices=INPUT_FORMATS)
    image_column: str | None = option(None, "Parquet: the column holding image bytes. [default: found]", "Inputs",
                                      metavar="COLUMN")
    key_column: str | None = option(None, "Parquet: the column holding keys. [default: 'key' if there is one, else "
                                    "the row number]", "Inputs", metavar="COLUMN")
    meta_fields: tuple[str, ...] | None = option(None, "Archive samples: the json fields / parquet columns kept in "
                                                 "each record (comma list). [default: the whole json and the "
                                                 "caption]", "Inputs", listing=True, metavar="A,B")
    update: bool = option(False, "Plan inputs added to the sources since the store was planned into new shards and "
                          "record the removed ones; finished shards stay untouched.", "Inputs")
    detect_changes: str = option("mtime", "How a rerun or --update tells that an input already extracted changed: "
                                 "mtime compares size and modification time, hash the content (reads every input "
                                 "again), off trusts the names.", "Inputs", choices=CHANGE_MODES)
    # ---- Outputs
    features: tuple[str, ...] | None = option(None, "Comma list of patch, merged, deepstack, block:N. [default: "
                                              "merged for Qwen towers, patch for small/base/large]", "Outputs",
                                              listing=True, metavar="A,B")
    pool: str = option("none", "Reduce each image (each video) to one row; 'cls' is the FIRST token (the encoder has "
                       "no class token).", "Outputs", choices=POOLS)
    pool_steps: bool = option(False, "Videos with --pool: one row per temporal step (a pair of frames fused; its time "
                              "is the record's video.step_times) instead of one per video.", "Outputs")
    store_dtype: str = option("float16", "Stored dtype; bfloat16 is kept losslessly as its bits.", "Outputs",
                              choices=STORE_DTYPES)
    format: str = option("hdf5", "Shard format: one HDF5 file, a folder of .npy files, or a webdataset tar with one "
                         "member per image and feature.", "Outputs", choices=tuple(FORMATS))
    shard_size: int = option(1000, "Images per shard of loose files (the unit of resume and of parallel work); "
                             "archive inputs give one shard per tar or parquet row group.", "Outputs", minimum=1)
    compression: str | None = option(None, "HDF5 compression.", "Outputs", choices=COMPRESSIONS)
    token_order: str = option("block", "Order of 'patch' rows: block (the reference's 2x2-block order) or raster "
                              "(row-major).", "Outputs", choices=TOKEN_ORDERS)
    overwrite: bool = option(False, "Delete the store in OUT and start over.", "Outputs")
    reuse: tuple[str, ...] | None = option(None, "A finished store made with the same model and settings: images "
                                           "with equal pixels take its tokens, unencoded (repeatable).", "Outputs",
                                           metavar="STORE", multiple=True)
    storage_options: tuple[str, ...] | None = option(None, STORAGE_OPTION_HELP, "Outputs", flags=("--storage-option",),
                                                     metavar="KEY=VALUE", multiple=True)
    # ---- Preprocessing
    min_pixels: int | None = option(None, "Qwen resize: least pixels after resize. [default: the model's]",
                                    "Preprocessing", minimum=1)
    max_pixels: int | None = option(None, "Qwen resize: most pixels after resize. [default: the model's]",
                                    "Preprocessing", minimum=1)
    image_size: int | None = option(None, "Resize every image to this square size instead.", "Preprocessing",
                                    minimum=1)
    backend: str | None = option(None, "Resize backend. [default: torchvision, as the reference]", "Preprocessing",
                                 choices=RESIZE_BACKENDS)
    fast_decode: bool = option(False, "Decode JPEGs at reduced DCT scale when the target is at least 2x smaller "
                               "(faster, not bit-exact).", "Preprocessing")
    decode: str = option("exact", "Where images are decoded. exact: on the CPU, as the reference. gpu: baseline JPEGs "
                         "by nvJPEG on the CUDA device (not bit-exact; other images stay exact; videos are always "
                         "decoded exactly on the CPU).", "Preprocessing",
                         choices=DECODERS)
    allow_truncated: bool = option(False, "Decode truncated files as far as they go (the record says so).",
                                   "Preprocessing")
    max_image_pixels: int | None = option(None, "Refuse images whose header claims more pixels (video frames too). "
                                          "[default: 178956970]", "Preprocessing", minimum=1)
    # ---- Video (named as transformers' video processors name them; defaults: the model's video processor)
    fps: float | None = option(None, "Frames sampled per second of video (turns sampling on). [default: the model's "
                               "video processor: 2 for Qwen3-VL; every frame for Qwen2-VL/2.5-VL]", "Video",
                               metavar="FPS")
    num_frames: int | None = option(None, "Sample this many frames per video instead of --fps.", "Video", minimum=1)
    min_frames: int | None = option(None, "Least frames sampled by --fps. [default: the model's, 4]", "Video",
                                    minimum=1)
    max_frames: int | None = option(None, "Most frames sampled by --fps. [default: the model's, 768]", "Video",
                                    minimum=1)
    video_min_pixels: int | None = option(None, "The video pixel budget's floor (size.shortest_edge): per frame for "
                                          "Qwen2-VL/2.5-VL, over frames x height x width for Qwen3-VL/3.5. "
                                          "[default: the model's]", "Video", minimum=1)
    video_max_pixels: int | None = option(None, "The video pixel budget (size.longest_edge): per frame for "
                                          "Qwen2-VL/2.5-VL, over frames x height x width for Qwen3-VL/3.5. "
                                          "[default: the model's]", "Video", minimum=1)
    cap_pixels_per_frame: bool = option(False, "Cap each frame's pixels as qwen-vl-utils does (transformers' "
                                        "cap_pixels_per_frame). [default: the model's; off in transformers 5.24]",
                                        "Video")
    video_decoder: str = option("torchcodec", "Video decoder: torchcodec (what transformers' video processors use; "
                                "needs FFmpeg's libraries) or pyav (bundles FFmpeg; ignores rotation metadata, as "
                                "transformers' PyAV reader).", "Video", choices=VIDEO_DECODERS)
    max_video_patches: int | None = option(None, "Refuse videos whose sampled frames give more patches (a video's "
                                           "tokens are held until its record is written). [default: "
                                           f"{MAX_VIDEO_PATCHES}]", "Video", minimum=1)
    max_video_frames: int | None = option(None, "Refuse video files whose metadata claims more frames (a "
                                          f"decompression bomb in time). [default: {MAX_VIDEO_FRAMES}]", "Video",
                                          minimum=1)
    max_video_seconds: float | None = option(None, "Refuse video files whose metadata claims a longer duration, in "
                                             f"seconds. [default: {MAX_VIDEO_SECONDS:g}]", "Video", metavar="SECONDS")
    video_chunk_patches: int = option(VIDEO_CHUNK_PATCHES, "A video whose sampled frames give more patches is decoded, "
                                      "resized and encoded a piece of whole temporal steps at a time, about this many "
                                      "patches each (at least one encoder batch, --token-budget), so memory holds a "
                                      "piece's frames and patches, not the video's; its tokens are those of the video "
                                      "encoded whole, bit for bit.", "Video", minimum=1, metavar="PATCHES")
    # ---- Speed
    token_budget: int | None = option(None, f"Patches per encoder batch. [default: {BUDGET_CPU} on CPU, "
                                      f"{BUDGET_CUDA} on CUDA]", "Speed", minimum=1)
    workers: int | None = option(None, "Decode worker processes (0 = decode in the main process). [default: from "
                                 "the CPU count]", "Speed", minimum=0)
    # ---- Cluster
    part: int | None = option(None, "This process's part (0-based) of --num-parts.", "Cluster", minimum=0)
    num_parts: int | None = option(None, "Split the plan's shards over this many processes.", "Cluster", minimum=1)
    engine: str = option("local", "Who spreads the work: local (this process, its decode workers and device; "
                         "torchrun and SLURM parts are local engines) or ray (Ray Data: decode as CPU tasks on the "
                         "cluster, encode on a pool of GPU actors, one per GPU, or CPU actors without GPUs; this "
                         "process commits the shards). The store is the same.", "Cluster", choices=("local", "ray"))
    address: str | None = option(None, "--engine ray: the Ray cluster to join: HOST:PORT (the head's GCS port, 6379 "
                                 "by default), auto (the one running on this node), local (a new local instance) or "
                                 "ray://HOST:PORT (Ray Client). [default: RAY_ADDRESS, else the cluster 'ray start' "
                                 "started on this node, else a new local instance]", "Cluster", metavar="ADDRESS")
    connect_timeout: int = option(CONNECT_TIMEOUT, "--engine ray: seconds to wait for the Ray cluster at the address "
                                  "to answer before giving up.", "Cluster", minimum=1, metavar="SECONDS")

    # The options given (to make_options, so on the command line); None: all of them count as given. A resume
    # takes the others from the store (``from_store``). Not a flag; kept by ``replace``, left out of comparisons.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False, metadata={"cli": None})
    # Options that decide the tokens or the layout of the store: recorded in its header, taken from it on a resume
    STORED: ClassVar[tuple[str, ...]] = (
        "model", "seed", "dtype", "input_format", "image_column", "key_column", "meta_fields", "features", "pool",
        "store_dtype", "format", "shard_size", "compression", "token_order", "min_pixels", "max_pixels",
        "image_size", "backend", "fast_decode", "decode", "allow_truncated", "max_image_pixels", "pool_steps", "fps",
        "num_frames", "min_frames", "max_frames", "video_min_pixels", "video_max_pixels", "cap_pixels_per_frame",
        "video_decoder", "max_video_patches", "max_video_frames", "max_video_seconds")

    def __post_init__(self) -> None:
        for name in ("features", "meta_fields"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, split_list(value, name))
            elif value is not None:
                setattr(self, name, tuple(value))
        if self.reuse is not None:
            self.reuse = (self.reuse,) if isinstance(self.reuse, str) else tuple(str(v) for v in self.reuse) or None
        if isinstance(self.storage_options, dict):
            self.storage_options = tuple(f"{k}={v}" for k, v in self.storage_options.items()) or None
        elif self.storage_options is not None:
            values = self.storage_options
            self.storage_options = (values,) if isinstance(values, str) else tuple(str(v) for v in values) or None

    def validate(self) -> ExtractOptions:
        """Check every choice and bound; raises UsageError naming the flag and what it accepts."""
        for f in option_fields(self):
            meta, value = f.metadata["cli"], getattr(self, f.name)
            flag = flag_of(f)
            if value is None:
                continue
            if meta["choices"] and value not in meta["choices"]:
                raise UsageError(f"{flag} {value!r} is not one of: {', '.join(meta['choices'])}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise UsageError(f"{flag} must be at least {meta['minimum']}, got {value}")
            if meta["listing"] and not value:
                raise UsageError(f"{flag} needs at least one name")
        if self.compression and self.format != "hdf5":
            raise UsageError("--compression applies to --format hdf5 only")
        if self.part is not None and self.num_parts is not None and self.part >= self.num_parts:
            raise UsageError(f"--part {self.part} must be in 0..{self.num_parts - 1}")
        if self.address is not None and self.engine != "ray":
            raise UsageError("--address names a Ray cluster; it needs --engine ray")
        if self.address is not None:
            check_address(self.address)
        if self.connect_timeout != CONNECT_TIMEOUT and self.engine != "ray":
            raise UsageError("--connect-timeout is the wait for a Ray cluster; it needs --engine ray")
        if self.update and self.overwrite:
            raise UsageError("--update and --overwrite contradict each other; give one")
        if self.fps is not None and self.num_frames is not None:
            raise UsageError("--fps and --num-frames are exclusive (as in transformers' video processors); give one")
        if self.pool_steps and self.pool == "none":
            raise UsageError("--pool-steps pools each temporal step: give --pool mean, max or cls with it")
        parse_storage_options(self.storage_options)
        for store in self.reuse or ():
            check_location(store, "--reuse")  # a URL it cannot serve: refused before anything is done
        return self

    def replace(self, **changes: Any) -> ExtractOptions:
        return dataclasses.replace(self, **changes)

    def to_store(self) -> dict[str, Any]:
        """The options recorded in a new store's header: those of ``STORED`` not at their defaults (JSON types; a
        local model path made absolute, so a resume from another folder finds it)."""
        import os

        defaults = {f.name: f.default for f in fields(self)}
        recorded = {}
        for name in self.STORED:
            value = getattr(self, name)
            if value != defaults[name]:
                recorded[name] = list(value) if isinstance(value, tuple) else value
        model = recorded.get("model")
        if model is not None and os.path.exists(os.path.expanduser(model)):
            recorded["model"] = os.path.abspath(os.path.expanduser(model))
        return recorded

    def from_store(self, stored: dict[str, Any]) -> ExtractOptions:
        """These options, with those not given taken from a store's recorded ones (the rest keep their defaults,
        as when the store was made)."""
        if self.given is None:
            return self
        taken = {name: tuple(value) if isinstance(value, list) else value for name, value in stored.items()
                 if name in self.STORED and name not in self.given}
        if not taken:
            return self
        return self.replace(**taken).validate()

    def to_argv(self) -> list[str]:
        """Command-line flags that give these options (the defaults left out)."""
        argv: list[str] = []
        for f in option_fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = flag_of(f)
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif f.metadata["cli"]["listing"]:
                argv += [flag, ",".join(value)]
            elif f.metadata["cli"].get("multiple"):
                argv += [part for v in value for part in (flag, str(v))]
            else:
                argv += [flag, str(value)]
        return argv


def option_fields(record: Any) -> list[dataclasses.Field]:
    """The fields of an options record (class or instance) that are options: those declared with ``option``."""
    return [f for f in fields(record) if f.metadata.get("cli")]


def flag_of(f: dataclasses.Field) -> str:
    flags = f.metadata["cli"]["flags"]
    return flags[0] if flags else "--" + f.name.replace("_", "-")


def split_list(value: str, name: str = "value") -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise UsageError(f"--{name.replace('_', '-')} {value!r} names nothing; give a comma list")
    return items


def make_options(**values: Any) -> ExtractOptions:
    """Options from keyword arguments; unknown names are a usage error listing the valid ones."""
    known = {f.name for f in option_fields(ExtractOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"unknown extract option(s) {unknown}; valid: {sorted(known)}")
    return ExtractOptions(**values, given=frozenset(values)).validate()

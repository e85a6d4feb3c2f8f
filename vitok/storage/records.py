"""The store's records as types: the run header (``vitok.json``), one image's record, and a shard's sidecar.

Every record has ``to_json``/``from_json`` and carries the schema version it was written with. JSON is written with
ASCII escapes, so keys that are not valid UTF-8 (file names are bytes on POSIX; Python keeps them as surrogate
escapes) survive the round trip unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import StoreError

SCHEMA_VERSION = 2


def dumps(data: Any) -> str:
    """JSON as the store writes it: sorted keys, ASCII (surrogate-escaped names round-trip)."""
    return json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of the settings that decide what the tokens are; equal fingerprints = comparable tokens."""
    return "blake2b:" + hashlib.blake2b(dumps(settings).encode(), digest_size=12).hexdigest()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def diff_settings(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable differences, one per setting: ``name: stored -> requested``."""
    old, new = flatten(stored), flatten(requested)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def vision_revision(config: dict[str, Any], weights: str) -> str:
    """sha256 of the encoder config (canonical JSON) and the weights hash (which covers every tower tensor),
    lowercase hex: the identity of what turns pixels into tokens (``vitok.inputs.identity``)."""
    return hashlib.sha256(dumps(config).encode() + b"\n" + str(weights).encode()).hexdigest()


def _compact(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@dataclass
class VideoRecord:
    """Which frames of a video were encoded and when (a video store's records carry one; ``grid`` is its
    ``video_grid_thw``): times are the reference processor's, a frame's index over the file's average fps."""

    frame_count: int  # frames in the file, as its decoder counts them
    fps: float | None  # the file's average frame rate (None: the file does not say; times then assume 24)
    duration: float | None  # seconds, as the decoder reports it
    indices: list[int]  # sampled frame ordinals, in order
    timestamps: list[float]  # seconds, one per sampled frame
    step_times: list[float]  # seconds, one per temporal step (a pair of frames fused): its rows' time
    decoder: str  # torchcodec | pyav

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VideoRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ImageRecord:
    """What happened to one input (an image, or a video: ``video`` set). ``row`` is its position among the shard's
    ok inputs."""

    key: str
    status: str  # ok | skipped | failed
    source: str  # the file, or the archive holding it
    member: str | None = None  # tar member, or "row_group/row" in a parquet file
    reason: str | None = None  # skipped / failed: one line
    row: int | None = None
    tokens: dict[str, int] | None = None  # rows per feature
    grid: list[int] | None = None  # (t, h, w) in patches
    size: list[int] | None = None  # original (width, height), upright
    source_bytes: int | None = None
    source_mtime_ns: int | None = None  # loose files: detects a changed image
    decoder: str | None = None  # which decoder produced the pixels
    notes: list[str] | None = None
    float16_overflow: int | None = None
    nonfinite: int | None = None  # NaN/Inf values in the encoder's output (all features); exports leave them out
    meta: dict[str, Any] | None = None  # caption / json fields of an archive sample
    source_sha256: str | None = None  # sha256 of the file's bytes (vitok.inputs.identity)
    content_id: str | None = None  # sha256 of the grid and uint8 patches the encoder saw (vitok.inputs.identity)
    copied_from: str | None = None  # not encoded: the record its rows were copied from, "<shard>/<key>" (another
    # store's: "STORE::<shard>/<key>"); that record holds these pixels whatever its key holds later
    video: VideoRecord | None = None  # a video's frames and times

    @property
    def nonfinite_values(self) -> int:
        """NaN/Inf values in the stored tokens, as counted at extraction: the encoder's, and float16 overflow (stored
        as Inf). The one test of "this image's tokens are not finite" (extract, info, verify and export share it)."""
        return (self.nonfinite or 0) + (self.float16_overflow or 0)

    def to_json(self) -> dict[str, Any]:
        return _compact(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        if isinstance(record.video, dict):
            record.video = VideoRecord.from_json(record.video)
        return record


@dataclass(frozen=True)
class ModelSettings:
    """Which tower made the tokens: its name, family, weights hash and full config (``EncoderConfig.to_dict``)."""

    name: str
    family: str = "qwen3_vl"
    weights: str | None = None  # the weights' content hash ("seeded-random:N" for a preset without a checkpoint)
    random_weights: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def media_noun(video) -> str:
    """"videos" for a store of videos (its ``video`` settings set), else "images": the noun its messages count."""
    return "videos" if video is not None else "images"


def per_second(media: str) -> str:
    """The unit of a rate of ``media``: img/s, videos/s."""
    return "img/s" if media == "images" else f"{media}/s"


@dataclass(frozen=True)
class Settings:
    """What decides a store's tokens and layout, compared on every resume; ``fingerprint`` hashes its JSON.

    The JSON form is the contract (older stores' fingerprints must not change): keys absent from a stored header
    stay absent, and keys this version does not know are kept in ``extra``."""

    model: ModelSettings
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig.to_dict
    features: tuple[str, ...] = ()
    pool: str = "none"
    pool_by: str | None = None  # "step": one pooled row per temporal step of a video (None: one per input)
    compute_dtype: str = "float32"
    store_dtype: str = "float16"
    token_order: dict[str, str] = field(default_factory=dict)  # feature -> how its rows are ordered, in words
    format: str = "hdf5"
    shard_size: int | None = None
    input: dict[str, Any] | None = None  # what the readers were told (kind, columns, meta fields)
    video: dict[str, Any] | None = None  # a store of videos: their sampling, decoder and limits (VideoConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    NOT_FOR_TOKENS: ClassVar[tuple[str, ...]] = ("format", "shard_size", "input")  # layout only: tokens unchanged

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "extra")}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if v is not None}
        return {"model": dataclasses.asdict(self.model), **data, **self.extra}

    def token_json(self) -> dict[str, Any]:
        """The settings that decide the tokens (model, weights, preprocessing, features, pooling, dtypes, order)."""
        return {k: v for k, v in self.to_json().items() if k not in self.NOT_FOR_TOKENS}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def media(self) -> str:
        """What the store's inputs are called in messages (a store holds one kind)."""
        return media_noun(self.video)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        model_names = {f.name for f in dataclasses.fields(ModelSettings)}
        model = data["model"]
        unknown_model = set(model) - model_names
        if unknown_model:
            raise ValueError(f"unknown model settings {sorted(unknown_model)}")
        known = {k: v for k, v in data.items() if k in names and k != "model"}
        if "features" in known:
            known["features"] = tuple(known["features"])
        return cls(model=ModelSettings(**model), **known, extra={k: v for k, v in data.items() if k not in names})


@dataclass
class RunHeader:
    """``OUT/vitok.json``: who wrote the store and with which settings. ``settings`` decide the tokens (compared on
    every resume); ``environment`` describes the machine and libraries of the first run (informative)."""

    settings: Settings
    vitok_version: str
    created: str
    environment: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    options: dict[str, Any] = field(default_factory=dict)  # the extract options that made it, not at their defaults
    # (a local model as an absolute path): a resume that does not give an option takes it from here
    identity: dict[str, Any] = field(default_factory=dict)  # vision revision, decoders, hash contract (inputs.identity)

    @property
    def fingerprint(self) -> str:
        return self.settings.fingerprint

    @property
    def features(self) -> list[str]:
        return list(self.settings.features)

    def to_json(self) -> dict[str, Any]:
        data = {"schema": self.schema, "vitok_version": self.vitok_version, "created": self.created,
                "fingerprint": self.fingerprint, "settings": self.settings.to_json(),
                "environment": self.environment}
        if self.identity:
            data["identity"] = self.identity
        return {**data, "options": self.options} if self.options else data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "vitok.json") -> RunHeader:
        try:
            return cls(settings=Settings.from_json(data["settings"]), vitok_version=data.get("vitok_version", "?"),
                       created=data.get("created", ""), environment=data.get("environment", {}),
                       schema=int(data.get("schema", 1)), options=dict(data.get("options") or {}),
                       identity=data.get("identity") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where} is damaged ({type(exc).__name__}: {exc})") from None


@dataclass
class FileSum:
    bytes: int
    blake2b: str | None = None  # None: written before checksums existed (schema 1)


@dataclass
class UnitInfo:
    """What a sidecar says about the input unit its shard holds: where it came from and why it stopped early."""

    kind: str = "files"  # files | wds | parquet (| ray: written through vitok.integrations.ray)
    plan_generation: int = 0
    unit: str | None = None  # the planned unit (a retry shard holds attempt > 0 of it)
    attempt: int | None = None
    path: str | None = None  # archives: the tar or parquet file
    row_group: int | None = None
    bytes: int | None = None  # archives: size and modification time when planned (change detection)
    mtime_ns: int | None = None
    sha256: str | None = None  # archives planned with --detect-changes hash
    error: str | None = None  # why the rest of the unit could not be read
    failed: bool | None = None  # ... because it was unavailable (retried by a later run) rather than damaged
    inputs: str | None = None  # digest of the planned unit's inputs (vitok.storage.plan.binding); None: older sidecars

    def to_json(self) -> dict[str, Any]:
        return _compact(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> UnitInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class Sidecar:
    """``shards/<name>.json``: a committed shard. Its existence is the commit; its records say what happened to
    every input of the unit, its files' sizes and checksums let resume and ``verify`` check the data."""

    shard: str
    format: str
    data: str  # data file or folder name, beside the sidecar
    files: dict[str, FileSum]  # relative to ``shards/``
    features: dict[str, int]  # rows per feature
    records: list[ImageRecord]
    fingerprint: str | None = None  # the run header's settings fingerprint
    unit: UnitInfo = field(default_factory=UnitInfo)  # the input unit: archive, row group, read error, ...
    part: str = "0/1"
    vitok_version: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    def ok_records(self) -> list[ImageRecord]:
        return sorted((r for r in self.records if r.status == "ok"), key=lambda r: r.row)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "shard": self.shard, "format": self.format, "data": self.data,
            "files": {name: _compact(dataclasses.asdict(s)) for name, s in self.files.items()},
            "bytes": self.bytes, "features": self.features, "fingerprint": self.fingerprint,
            "unit": self.unit.to_json(), "part": self.part, "vitok_version": self.vitok_version,
            "num_ok": self.count("ok"), "num_skipped": self.count("skipped"), "num_failed": self.count("failed"),
            "records": [r.to_json() for r in sorted(self.records, key=lambda r: r.key)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "sidecar") -> Sidecar:
        try:
            if "files" in data:
                files = {name: FileSum(**value) for name, value in data["files"].items()}
            else:  # schema 1: one size for the whole data file or folder
                files = {data["data"]: FileSum(int(data["bytes"]))}
            return cls(
                shard=data["shard"], format=data["format"], data=data["data"], files=files,
                features={k: int(v) for k, v in data["features"].items()},
                records=[ImageRecord.from_json(r) for r in data["records"]],
                fingerprint=data.get("fingerprint"), unit=UnitInfo.from_json(data.get("unit")),
                part=data.get("part", "0/1"), vitok_version=data.get("vitok_version", ""),
                schema=int(data.get("schema", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where} is damaged ({type(exc).__name__}: {exc})") from None

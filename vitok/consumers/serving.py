"""Serving layouts: a store's tokens where inference servers read them instead of running the vision encoder, and
the validator every exported embedding passes (at export, and again with ``vitok verify DEST --embeds``).

**vllm-ec**, vLLM's encoder-cache connector (encode/prefill/decode disaggregation, ``ec_role="ec_consumer"``).
Followed at vLLM commit 0487d5c235baf6fdfb5ad1e0d97449ba548c68a0 (``ECExampleConnector``,
``vllm/distributed/ec_transfer/ec_connector/example_connector.py``: it loads
``<shared_storage_path>/<mm_hash>/encoder_cache.safetensors`` with ``safetensors.torch.load_file(...)["ec_cache"]``
and counts a hit by ``os.path.exists``) and the Qwen3-VL tower of ``vllm/model_executor/models/qwen3_vl.py`` at
002d7b939754b844a3832dd7fbf9e5fd0c0e9f1b (``torch.cat([merger] + deepstack_features, dim=1)``, levels in
``deepstack_visual_indexes`` order; per image ``grid_thw.prod(-1) // merge_size**2`` rows). Not a stable vLLM API::

    DEST/<name>/encoder_cache.safetensors   one tensor "ec_cache": [t*h*w / merge**2, width] bfloat16, dense,
                                            contiguous; width = out_hidden_size * (1 + DeepStack levels) for
                                            Qwen3-VL (merger output first, then the levels in order), out_hidden_size
                                            for Qwen2-VL / Qwen2.5-VL / Qwen3.5
    DEST/uuids.jsonl                        one line per image: {"key", "uuid" (= <name>), "image_grid_thw", "tokens"};
                                            pass "uuid" as the request's multi_modal_uuids. "key" is the key's
                                            text form (``vitok.storage.keys.key_text``: injective, printable;
                                            a backslash doubled, bytes that are not UTF-8 as ``\\xNN``); where it
                                            differs from the key, "key_bytes_hex" holds the exact bytes

A consumer serves an entry only for a request that carries its uuid and no ``mm_processor_kwargs`` or
``media_io_kwargs`` (``vitok.consumers.vllm_client`` builds such requests, the grid-only one among them).

**Videos** (a store of videos): an entry is one video item, the tensor vLLM's ``_process_video_input`` splits per
video (``video_embeds.split(grid_thw.prod(-1) // merge**2)``, ``qwen3_vl.py`` at 002d7b9): the same rows and width
as an image's, ``Store.video_embeds``'s tensor. Its uuids.jsonl line says ``"modality": "video"`` and carries
``video_grid_thw`` instead of ``image_grid_thw`` and ``video_metadata`` (``fps``, ``frames_indices``,
``total_num_frames``, ``duration``: Qwen3-VL's prompt takes its ``<t seconds>`` from them); pass the uuid as
``multi_modal_uuids={"video": [uuid]}``.

``<name>`` is the key made file-system safe (characters outside ``[A-Za-z0-9._-]`` become ``_``, at most its last
60) followed by ``-`` and 32 hex digits of blake2b over the key's bytes: distinct keys get distinct names, also on
case-insensitive file systems. ``--key content`` names entries by the record's ``content_id`` instead (one entry
per distinct content).

**sglang**: ``DEST/embeds-NNNNN.parquet``, one row per image: ``key`` (its text form, as in uuids.jsonl),
``key_bytes`` (the exact key), ``feature`` (the same tensor as vllm-ec, packed bfloat16 little-endian, row
major), ``dtype`` ("bfloat16"), ``shape`` ([tokens, width]), ``image_grid_thw`` ([[t, h, w]]). Readable with
pyarrow alone; ``examples/sglang_precomputed.py`` builds SGLang's ``{"format": "precomputed_embedding", ...}`` item.
SGLang 0.5.23 uses such an item as the embedding for Qwen2.5-VL, but its Qwen3-VL feeds it to the vision tower as
pixels: the layout serves Qwen3-VL stores to no released SGLang (docs/exports.md). A store of videos gives
``video_grid_thw`` in place of ``image_grid_thw`` and the columns ``fps``, ``frames_indices``, ``total_num_frames``
and ``second_per_grid_ts`` (Qwen2.5-VL's M-RoPE time step, ``temporal_patch_size`` over the sampled frame rate;
null for other families), for an item ``{"format": "precomputed_embedding", "feature": F, "video_grid_thw": G}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError, UsageError
from ..storage.keys import key_bytes, key_text
from .export import nonfinite_reason

logger = logging.getLogger(__name__)

ENTRY_FILE = "encoder_cache.safetensors"
TENSOR_NAME = "ec_cache"
UUIDS_FILE = "uuids.jsonl"
ROWS_PER_FILE = 4096  # sglang: images per parquet file
ROWS_PER_GROUP = 64  # sglang: images per row group (bounds the memory of a write and of a reader's batch)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
GRID_FIELDS = {"image": "image_grid_thw", "video": "video_grid_thw"}  # an entry's grid, by its modality


def store_modality(store) -> str:
    """image or video: what the store's records are (one store holds one kind)."""
    return "video" if store.header.settings.video is not None else "image"


def entry_grid(entry: dict[str, Any]) -> Any:
    """The grid of a uuids.jsonl line or an sglang row, whichever modality it is (None: neither field)."""
    return entry.get("video_grid_thw", entry.get("image_grid_thw"))


def second_per_grid_ts(video: dict[str, Any], temporal_patch_size: int = 2) -> float:
    """Qwen2.5-VL's M-RoPE time step of a video (its record's ``video``: fps, frame_count, indices):
    ``temporal_patch_size`` over the sampled frame rate, as transformers' ``Qwen2_5_VLProcessor`` computes it from
    ``VideoMetadata.sampled_fps`` (``len(indices) / frames * fps``; the fps, 24 when unknown, where any is missing)."""
    fps, total, indices = video.get("fps"), video.get("frame_count"), video.get("indices")
    sampled = len(indices) / total * fps if fps and total and indices is not None else (fps or 24)
    return temporal_patch_size / sampled


def video_problems(metadata: Any, grid: Any, temporal_patch_size: int = 2) -> list[str]:
    """Why a video entry's metadata cannot give its prompt (Qwen3-VL: one ``<t seconds>`` per temporal step, from
    ``frames_indices`` and ``fps``); empty when it can."""
    if not isinstance(metadata, dict):
        return [f"video_metadata {metadata!r} is not an object with fps and frames_indices"]
    indices, fps = metadata.get("frames_indices"), metadata.get("fps")
    if not isinstance(indices, list) or not indices or not all(isinstance(i, int) and i >= 0 for i in indices):
        return [f"video_metadata frames_indices {indices!r} is not a list of frame numbers"]
    if not isinstance(fps, (int, float)) or fps <= 0:
        return [f"video_metadata fps {fps!r} is not a positive frame rate"]
    try:
        steps = int(grid[0][0])
    except (TypeError, ValueError, IndexError):
        return []  # the grid's own problem is reported by the contract
    expected = -(-len(indices) // temporal_patch_size)
    if expected != steps:
        return [f"video_metadata holds {len(indices)} frame(s), {expected} temporal step(s); the grid has {steps}"]
    return []


@dataclass(frozen=True)
class EmbedsContract:
    """What a served embedding must look like for the store's model family."""

    family: str
    merge_size: int
    out_hidden_size: int
    levels: int  # DeepStack levels concatenated after the merger output (Qwen3-VL); 0 otherwise
    dtype: str = "bfloat16"

    @property
    def width(self) -> int:
        return self.out_hidden_size * (1 + self.levels)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "width": self.width}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EmbedsContract:
        return cls(data["family"], int(data["merge_size"]), int(data["out_hidden_size"]), int(data["levels"]),
                   data.get("dtype", "bfloat16"))

    @classmethod
    def of_store(cls, header) -> EmbedsContract:
        model = header.settings.model
        config = model.config
        family = config.get("family", model.family)
        if not config.get("out_hidden_size"):
            raise UsageError(f"model {model.name} has no merger: serving layouts need merged tokens")
        indexes = config.get("deepstack_visual_indexes") or () if family == "qwen3_vl" else ()
        # the blocks tapped, as the tower stores them (an index past the last block never is)
        levels = sum(1 for i in range(int(config.get("depth", max(indexes, default=-1) + 1))) if i in indexes)
        return cls(family, int(config.get("spatial_merge_size", 2)), int(config["out_hidden_size"]), levels)

    def problems(self, tensor, grid) -> list[str]:
        """Why ``tensor`` (torch) with ``grid`` ([[t, h, w]]) cannot be served; empty when it can."""
        import torch

        try:
            thw = [[int(v) for v in row] for row in (grid.tolist() if hasattr(grid, "tolist") else grid)]
        except (TypeError, ValueError):
            return [f"grid {grid!r} is not [[t, h, w]]"]
        if len(thw) != 1 or len(thw[0]) != 3 or min(thw[0]) < 1:
            return [f"grid {thw} is not one [t, h, w] of positive integers"]
        t, h, w = thw[0]
        found = []
        if h % self.merge_size or w % self.merge_size:
            found.append(f"grid {thw[0]} is not divisible by the merge size {self.merge_size}")
        if not isinstance(tensor, torch.Tensor):
            return [*found, f"not a tensor ({type(tensor).__name__})"]
        if tensor.layout != torch.strided:
            return [*found, f"not dense ({tensor.layout})"]
        tokens = t * h * w // self.merge_size**2
        if tensor.ndim != 2 or tuple(tensor.shape) != (tokens, self.width):
            found.append(f"shape {tuple(tensor.shape)}, the grid {thw[0]} and merge size {self.merge_size} of "
                         f"{self.family} give ({tokens}, {self.width})")
        if str(tensor.dtype).removeprefix("torch.") != self.dtype:
            found.append(f"dtype {str(tensor.dtype).removeprefix('torch.')}, not {self.dtype}")
        if not tensor.is_contiguous():
            found.append("not contiguous")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(f"{int((~torch.isfinite(tensor)).sum())} NaN/Inf value(s)")
        return found

    def check(self, key: str, tensor, grid) -> None:
        found = self.problems(tensor, grid)
        if found:
            raise StoreError(f"{key_text(key)!r} cannot be served: {'; '.join(found)}; nothing exported")


def entry_name(key: str) -> str:
    """A directory name for a key: readable, safe on every file system, distinct for distinct keys."""
    digest = hashlib.blake2b(key_bytes(key), digest_size=16).hexdigest()
    readable = _UNSAFE.sub("_", key)[-60:].lstrip(".-")
    return f"{readable}-{digest}" if readable else digest


def content_entry_name(content_id: str) -> str:
    """``--key content``: the content id itself where it is a safe name, else made one like a key."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}", content_id):
        return content_id
    return entry_name(content_id)


def _embeds_needs(store) -> None:
    """UsageError when the store cannot give the model's encoder output (pooled, or a feature missing)."""
    contract = EmbedsContract.of_store(store.header)
    if store.header.settings.pool != "none":
        raise UsageError("serving layouts need every token of each image; this store is pooled (extract without "
                         "--pool)")
    needed = ["merged", "deepstack"] if contract.levels else ["merged"]
    missing = [f for f in needed if f not in store.features]
    if missing:
        raise UsageError(f"serving {contract.family} needs the features {', '.join(needed)}; this store lacks "
                         f"{', '.join(missing)} (extract with --features {','.join(needed)})")


def _served(store, keys) -> Iterator[tuple[str, Any, Any, str | None, dict[str, Any] | None]]:
    """(key, bf16 tensor, grid, reason to leave it out or None, video metadata or None) for each key."""
    import torch

    videos = store_modality(store) == "video"
    for key in keys:
        if videos:
            embeds, grid, metadata = store.video_embeds(key, dtype=torch.bfloat16)
        else:
            (embeds, grid), metadata = store.image_embeds(key, dtype=torch.bfloat16), None
        embeds = embeds.contiguous()
        yield key, embeds, grid, nonfinite_reason(store.info(key), embeds), metadata


class _ServingLayout:
    name = ""

    def __init__(self, key_mode: str = "store") -> None:
        self.key_mode = key_mode
        self.contract: EmbedsContract | None = None

    @property
    def options(self) -> dict[str, Any]:
        return {"key": self.key_mode}

    @property
    def contract_json(self) -> dict[str, Any] | None:
        return self.contract.to_json() if self.contract else None

    def check(self, store) -> None:
        self.contract = EmbedsContract.of_store(store.header)
        _embeds_needs(store)
        if self.key_mode == "content":
            lacking = [k for k in store.keys() if not store.info(k).get("content_id")]
            if lacking:
                raise UsageError(f"--key content needs a content_id in every image record; {len(lacking)} of "
                                 f"{len(store)} lack one (e.g. {key_text(lacking[0])!r}): this store was written "
                                 "before content ids. Use --key store")


class VllmEcLayout(_ServingLayout):
    """vLLM's encoder-cache connector layout (module docstring)."""

    name = "vllm-ec"

    def write(self, store, folder: Path, done=None) -> tuple[int, dict[str, str]]:
        """Write the entries and ``uuids.jsonl`` into ``folder``, calling ``done(path)`` on each finished file."""
        from safetensors.torch import save_file

        left_out: dict[str, str] = {}
        written: dict[str, str] = {}  # entry name folded to lower case (case-insensitive file systems) -> name
        count = 0
        with open(folder / UUIDS_FILE, "w", encoding="ascii") as uuids:
            for key, embeds, grid, reason, metadata in _served(store, store.keys()):
                if reason:
                    left_out[key] = reason
                    continue
                self.contract.check(key, embeds, grid)
                if self.key_mode == "content":  # equal content ids share one entry
                    name = content_entry_name(str(store.info(key)["content_id"]))
                else:
                    name = entry_name(key)
                if name.lower() in written and (self.key_mode == "store" or written[name.lower()] != name):
                    raise StoreError(f"{key_text(key)!r}: its entry name {name!r} collides with another's")
                if name.lower() not in written:
                    written[name.lower()] = name
                    (folder / name).mkdir()
                    save_file({TENSOR_NAME: embeds}, str(folder / name / ENTRY_FILE))
                    if done is not None:
                        done(folder / name / ENTRY_FILE)
                line: dict[str, Any] = {"key": key_text(key), "uuid": name}
                if metadata is not None:
                    line["modality"] = "video"
                line[GRID_FIELDS["image" if metadata is None else "video"]] = grid.tolist()
                line["tokens"] = int(embeds.shape[0])
                if metadata is not None:
                    line["video_metadata"] = metadata
                if line["key"] != key:  # (the text form is exact too; the bytes save a reader the unescaping)
                    line["key_bytes_hex"] = key_bytes(key).hex()
                uuids.write(json.dumps(line, ensure_ascii=True) + "\n")
                count += 1
        if done is not None:
            done(folder / UUIDS_FILE)
        return count, left_out


class SglangLayout(_ServingLayout):
    """Parquet records of packed bfloat16 features for SGLang's precomputed_embedding items (module docstring)."""

    name = "sglang"

    def check(self, store) -> None:
        super().check(store)
        if self.contract.family == "qwen3_vl":
            logger.warning("SGLang 0.5.23 feeds a precomputed Qwen3-VL item to its vision tower as pixels, so it "
                           "cannot serve this export; serve Qwen3-VL through vLLM's encoder cache (--layout vllm-ec)")

    @staticmethod
    def schema(modality: str = "image"):
        import pyarrow as pa

        fields = [("key", pa.string()), ("key_bytes", pa.binary()), ("feature", pa.binary()),
                  ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
                  (GRID_FIELDS[modality], pa.list_(pa.list_(pa.int64())))]
        if modality == "video":
            fields += [("fps", pa.float64()), ("frames_indices", pa.list_(pa.int64())),
                       ("total_num_frames", pa.int64()), ("second_per_grid_ts", pa.float64())]
        return pa.schema(fields)

    def write(self, store, folder: Path, done=None) -> tuple[int, dict[str, str]]:
        """Write the parquet files into ``folder``, calling ``done(path)`` on each once it is closed."""
        import pyarrow as pa

        from ..inputs.readers.parquet import pyarrow_parquet

        pq = pyarrow_parquet()
        left_out: dict[str, str] = {}
        count, writer, rows, path = 0, None, [], folder
        modality = store_modality(store)
        schema = self.schema(modality)
        temporal = int(store.header.settings.model.config.get("temporal_patch_size", 2))

        def flush() -> None:
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows.clear()

        try:
            for key, embeds, grid, reason, metadata in _served(store, store.keys()):
                if reason:
                    left_out[key] = reason
                    continue
                self.contract.check(key, embeds, grid)
                if count % ROWS_PER_FILE == 0:
                    flush()
                    if writer is not None:
                        writer.close()
                        writer = None
                        if done is not None:
                            done(path)
                    path = folder / f"embeds-{count // ROWS_PER_FILE:05d}.parquet"
                    writer = pq.ParquetWriter(path, schema)
                row = {"key": key_text(key), "key_bytes": key_bytes(key), "feature": pack_bf16(embeds),
                       "dtype": "bfloat16", "shape": list(embeds.shape), GRID_FIELDS[modality]: grid.tolist()}
                if metadata is not None:
                    row.update(fps=metadata["fps"], frames_indices=metadata["frames_indices"],
                               total_num_frames=metadata["total_num_frames"],
                               second_per_grid_ts=second_per_grid_ts(store.info(key)["video"], temporal)
                               if self.contract.family == "qwen2_5_vl" else None)
                rows.append(row)
                count += 1
                if len(rows) >= ROWS_PER_GROUP:
                    flush()
            flush()
        finally:
            if writer is not None:
                writer.close()
        if writer is not None and done is not None:
            done(path)
        return count, left_out


def pack_bf16(tensor) -> bytes:
    """A bfloat16 tensor's values as little-endian bytes, row major."""
    import torch

    return tensor.contiguous().view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def unpack_bf16(data: bytes, shape):
    """Bytes written by ``pack_bf16`` -> a bfloat16 tensor of ``shape``."""
    import numpy as np
    import torch

    bits = np.frombuffer(data, dtype="<i2").astype(np.int16)
    return torch.from_numpy(bits).view(torch.bfloat16).reshape([int(s) for s in shape])


# ---- the validator ---------------------------------------------------------------------------------------------------


@dataclass
class EmbedsReport:
    checked: int
    problems: list[str]
    layout: str  # vllm-ec, sglang, or "store"

    @property
    def clean(self) -> bool:
        return not self.problems


def _vllm_ec_entries(root) -> Iterator[tuple[str, Any, Any, str | None, Any]]:
    """(key, tensor, grid, problem or None, video metadata or None) per line of uuids.jsonl."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        text = root.read(UUIDS_FILE).decode("ascii")
    except FileNotFoundError:
        raise StoreError(f"{root} has no {UUIDS_FILE}: not a vllm-ec export") from None
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
            key, name, grid = entry["key"], entry["uuid"], entry_grid(entry)
            video = entry.get("modality", "image") == "video"
            if grid is None or video != ("video_grid_thw" in entry):
                raise KeyError(GRID_FIELDS["video" if video else "image"])
            metadata = entry.get("video_metadata") if video else None
            if "key_bytes_hex" in entry:  # the exact key, where its text form differs
                key = bytes.fromhex(entry["key_bytes_hex"]).decode("utf-8", "surrogateescape")
        except (ValueError, KeyError, TypeError, AttributeError):
            yield f"{UUIDS_FILE} line {number}", None, None, "not a JSON line with key, uuid and the grid of its " \
                                                             "modality (image_grid_thw, video_grid_thw)", None
            continue
        if "/" in name or name in (".", ".."):
            yield key, None, grid, f"entry name {name!r} is not a plain folder name", metadata
            continue
        try:
            tensors = load(root.read(f"{name}/{ENTRY_FILE}"))  # the file's bytes, parsed as the connector parses them
        except FileNotFoundError:
            yield key, None, grid, f"{name}/{ENTRY_FILE} is missing", metadata
            continue
        except (SafetensorError, OSError, ValueError) as exc:
            yield key, None, grid, f"{name}/{ENTRY_FILE} cannot be read ({exc})", metadata
            continue
        if set(tensors) != {TENSOR_NAME}:
            yield key, None, grid, f"{name}/{ENTRY_FILE} holds {sorted(tensors)}, not exactly [{TENSOR_NAME!r}]", \
                metadata
            continue
        yield key, tensors[TENSOR_NAME], grid, None, {} if video and metadata is None else metadata


def read_sglang(folder, storage_options=None) -> Iterator[dict[str, Any]]:
    """The rows of an sglang export (a folder, ``s3://BUCKET/PREFIX`` or a store root), in order (the reader
    shipped beside the writer)."""
    from ..inputs.readers.parquet import pyarrow_parquet
    from ..storage.roots import store_root

    pq = pyarrow_parquet()
    root = store_root(folder, "DEST", storage_options)
    for entry in root.list(""):
        if entry.folder or not re.fullmatch(r"embeds-.*\.parquet", entry.name):
            continue
        with root.open(entry.name) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                yield from parquet.read_row_group(group).to_pylist()


def _sglang_entries(root) -> Iterator[tuple[str, Any, Any, str | None, Any]]:
    for row in read_sglang(root):
        key = (row.get("key_bytes") or b"").decode("utf-8", "surrogateescape") or row.get("key") or "?"
        shape, data, dtype = row.get("shape") or [], row.get("feature") or b"", row.get("dtype")
        grid = entry_grid(row)
        metadata = {"fps": row.get("fps"), "frames_indices": row.get("frames_indices")} \
            if "video_grid_thw" in row else None
        if dtype != "bfloat16":
            yield key, None, grid, f"dtype {dtype!r}, not 'bfloat16'", metadata
            continue
        expected = 2
        for size in shape:
            expected *= int(size)
        if len(shape) != 2 or len(data) != expected:
            yield key, None, grid, f"{len(data)} bytes do not hold a bfloat16 tensor of shape {shape}", metadata
            continue
        yield key, unpack_bf16(data, shape), grid, None, metadata


def verify_embeds(path, storage_options=None) -> EmbedsReport:
    """Check every embedding of a vllm-ec or sglang export (or, given a store, every image as it would be exported)
    against the model family's contract: token count vs grid and merge size, width, dtype, finiteness, dense and
    contiguous. ``path``: a folder, ``s3://BUCKET/PREFIX`` (``storage_options`` for its client) or a store root.
    Nothing is modified."""
    from ..storage import META_FILE
    from ..storage.roots import store_root
    from .export_target import read_marker

    folder = store_root(path, "OUT", storage_options)
    marker = read_marker(folder)
    if marker is None:
        if not folder.exists(META_FILE):
            raise UsageError(f"{path} is neither a vitok export (no .vitok-export.json) nor a store")
        from ..storage.store import open_store

        with open_store(folder) as store:
            contract = EmbedsContract.of_store(store.header)
            _embeds_needs(store)
            problems, checked = [], 0
            for key, embeds, grid, reason, metadata in _served(store, store.keys()):
                checked += 1
                found = ([reason] if reason else []) + contract.problems(embeds, grid)
                if metadata is not None:
                    found += video_problems(metadata, grid.tolist())
                if found:
                    problems.append(f"{key_text(key)!r}: {'; '.join(found)}")
            return EmbedsReport(checked, problems, "store")
    if marker.layout not in ("vllm-ec", "sglang") or not marker.contract:
        raise UsageError(f"{path} is a {marker.layout} export; --embeds checks the vllm-ec and sglang layouts")
    contract = EmbedsContract.from_json(marker.contract)
    entries = _vllm_ec_entries(folder) if marker.layout == "vllm-ec" else _sglang_entries(folder)
    problems, checked = [], 0
    for key, tensor, grid, problem, metadata in entries:
        checked += 1
        found = [problem] if problem else contract.problems(tensor, grid)
        if metadata is not None and not problem:  # a video: its prompt's times must fit its grid
            found += video_problems(metadata, grid)
        if found:
            problems.append(f"{key_text(key)!r}: {'; '.join(found)}")
    if checked != marker.images:
        problems.append(f"{checked} embedding(s) found, the marker says {marker.images} were exported")
    return EmbedsReport(checked, problems, marker.layout)

"""Exports: a store's tokens written where other tools read them (``vitok export STORE DEST --layout NAME``).

    embedding-reader   DEST/img_emb/img_emb_{i}.npy      (n_i, D) float16 or float32, one file per non-empty shard
                       DEST/metadata/metadata_{i}.parquet the same rows in order: key, source, member, caption (when
                                                          the input had one), the json fields of archive samples;
                                                          with ``steps``, one row per temporal step of a video, its
                                                          ``step`` and ``time`` (seconds) added
    vllm-ec            vLLM's encoder-cache connector folder (``vitok.consumers.serving``)
    sglang             parquet records for SGLang's precomputed_embedding items (``vitok.consumers.serving``)

Every layout goes through one gate, in this order, and nothing is created before the last step:

1. the options and the layout's needs (feature, pooling, DeepStack, content ids): ``UsageError`` (exit 2);
2. DEST: new, empty, or an earlier export of this store (``vitok.consumers.export_target``); anything else is refused;
3. the store: every shard checked against its checksums (a damaged shard is refused, named), and an incomplete
   store (planned shards not done, inputs that failed) refused unless ``allow_partial``, which logs what is missing
   and records it in the marker;
4. the export is written in a temporary folder beside DEST and swapped in whole.

Images whose tokens hold NaN or Inf (counted at extraction in the record's ``nonfinite``, float16 overflow, or
found in the data) are **left out with a count**: logged, and listed with the reason in ``DEST/.vitok-export.json``
(``left_out``). A store where every image would be left out is refused. Every key is exported: text columns
(``key``, ``source``, ``member``) hold ``vitok.storage.keys.key_text``, the one injective text form of a name (a
backslash doubled; bytes that are not UTF-8 and control characters as ``\\xNN``), and when any key's text differs
from the key a ``key_bytes`` column holds the exact bytes. pyarrow is the ``vitok[parquet]`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import AtomicFile
from ..errors import StoreError, UsageError
from ..interrupts import stop_on_signals
from ..pipeline.pool import POOLS as ALL_POOLS
from ..run.options import option
from ..storage.files import is_no_space, raise_store_error
from ..storage.keys import key_bytes, key_text
from ..storage.roots import STORAGE_OPTION_HELP

logger = logging.getLogger(__name__)
EXPORT_STORAGE_OPTION_HELP = ("The store, DEST, or both in S3 (s3://BUCKET/PREFIX; one client configuration for both): "
                              + STORAGE_OPTION_HELP.removeprefix("Stores in S3 (s3://BUCKET/PREFIX): "))

LAYOUTS = ("embedding-reader", "vllm-ec", "sglang")
POOLS = tuple(p for p in ALL_POOLS if p != "none")  # an export is one vector per image
KEY_MODES = ("store", "content")
NORMALIZE = ("l2",)
EXPORT_DTYPES = ("float16", "float32")  # of embedding-reader vectors


@dataclass
class ExportOptions:
    """Everything ``vitok export`` can be told, declared once: the CLI's flags, help and choices derive from these
    fields (as ``extract``'s from ``ExtractOptions``), and :func:`export` takes them as keyword arguments."""

    layout: str = option("embedding-reader", "embedding-reader: img_emb/img_emb_N.npy + metadata/metadata_N.parquet "
                         "(clip-retrieval, embedding-reader, autofaiss); vllm-ec: vLLM's encoder-cache connector "
                         "folder (UUID/encoder_cache.safetensors + uuids.jsonl); sglang: parquet records of bf16 "
                         "features for SGLang's precomputed_embedding items. From a store of videos, vllm-ec and "
                         "sglang write one video item per video (video_grid_thw and the frames' metadata).",
                         "Outputs", choices=LAYOUTS)
    feature: str | None = option(None, "Feature to export (embedding-reader). [default: the store's first]",
                                 "Outputs", metavar="NAME")
    pool: str | None = option(None, "Reduce each image's tokens to one vector (needed when the store holds every "
                              "token).", "Outputs", choices=POOLS)
    normalize: str | None = option(None, "Scale every vector to unit length (for inner-product search).", "Outputs",
                                   choices=NORMALIZE)
    dtype: str = option("float16", "Stored vector dtype (embedding-reader).", "Outputs", choices=EXPORT_DTYPES)
    key: str = option("store", "vllm-ec: name entries by the store key, or by the records' content_id.", "Outputs",
                      choices=KEY_MODES)
    allow_partial: bool = option(False, "Export an unfinished store (shards not done, inputs that failed), saying "
                                 "what is missing.", "Outputs")
    steps: bool = option(False, "Videos (embedding-reader): one vector per temporal step, a pair of frames fused, "
                         "with its step and time in the metadata, instead of one per video.", "Outputs")
    storage_options: tuple[str, ...] | None = option(None, EXPORT_STORAGE_OPTION_HELP, "Outputs",
                                                     flags=("--storage-option",),
                                                     metavar="KEY=VALUE", multiple=True)


@dataclass
class ExportResult:
    layout: str
    dest: Path | str  # a local folder, or the URL of an object-store prefix
    images: int  # exported: images, videos, or a video store's temporal steps (``counted``)
    left_out: dict[str, str] = field(default_factory=dict)  # key -> why it was not exported
    missing: list[str] = field(default_factory=list)  # what a partial store lacked (--allow-partial)
    counted: str = "images"  # what ``images`` counts: "images", "videos" or "temporal steps"


# ---- helpers shared by the layouts ---------------------------------------------------------------------------------


def printable(text: str | None) -> str | None:
    """Free text (a caption) any UTF-8 consumer accepts: bytes that were not UTF-8 become ``\\xNN``; valid text is
    unchanged. Names (keys, sources, members) are written with ``key_text`` instead, which is injective."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_text(name: str | None) -> str | None:
    """``key_text`` of a key, source or member; None stays None."""
    return None if name is None else key_text(name)


def needs_key_bytes(keys: list[str]) -> bool:
    """Whether a ``key_bytes`` column is written: some key's text form is not the key itself."""
    return any(key_text(k) != k for k in keys)


def nonfinite_reason(record: dict[str, Any], values=None) -> str | None:
    """Why an image's tokens must not be exported (None: they may): NaN/Inf counted at extraction, float16
    overflow (stored as Inf), or NaN/Inf found in ``values`` (numpy array or torch tensor) now."""
    if record.get("nonfinite"):
        return f"{record['nonfinite']} NaN/Inf value(s) in its tokens (counted at extraction)"
    if record.get("float16_overflow"):
        return f"{record['float16_overflow']} value(s) beyond float16's range, stored as Inf"
    if values is not None:
        import numpy as np

        if hasattr(values, "isfinite"):  # torch
            import torch

            bad = int((~torch.isfinite(values.float())).sum())
        else:
            bad = int((~np.isfinite(values)).sum())
        if bad:
            return f"{bad} NaN/Inf value(s) in its tokens"
    return None


def check_store(store, allow_partial: bool) -> list[str]:
    """Refuse a damaged store (StoreError naming the first damaged shard); list what an incomplete store lacks and
    refuse it unless ``allow_partial``. Returns the list of what is missing (empty for a finished store)."""
    from ..storage.verify import verify_store

    report = verify_store(store.root)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise StoreError(f"{store.root} is damaged: {printable(report.problems[0])}{more}; nothing exported "
                         f"(run vitok verify {store.root})")
    missing = report.unfinished  # one definition of finished, shared with vitok verify
    if missing and not allow_partial:
        raise StoreError(f"{store.root} is incomplete: {'; '.join(missing)}. Finish it (rerun vitok extract), or "
                         "pass --allow-partial to export what it holds")
    if report.all_nonfinite:  # one definition with vitok verify (ImageRecord.nonfinite_values)
        raise StoreError(every_image_nonfinite(store.root, report.images_nonfinite, media=report.media))
    if missing:
        logger.warning("exporting a partial store; it lacks %s", "; ".join(missing))
    return missing


def every_image_nonfinite(root, count: int, example: str = "", media: str = "images") -> str:
    """Why a store whose every image (or video) holds NaN/Inf values is refused (export and verify say the same)."""
    return (f"every {media[:-1]} of {root} holds NaN/Inf values ({count}{example}): nothing to export. Check the "
            "checkpoint and the store dtype")


# ---- embedding-reader -----------------------------------------------------------------------------------------------


def _pooled(tokens, offsets, pool: str | None):
    import numpy as np

    from ..pipeline.pool import pool_packed

    if pool is None:
        return tokens
    if len(offsets) < 2:
        return tokens[:0]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf images are left out after pooling, not warned about
        return pool_packed(tokens, np.diff(offsets).tolist(), pool)


def _no_callback(path: Path) -> None:
    pass


def _save_npy(path: Path, array) -> None:
    import numpy as np

    with AtomicFile(path.parent, path.name, path) as atomic:  # np.save on a name would append ".npy"
        np.save(atomic.handle, array)


class EmbeddingReaderLayout:
    """clip-retrieval's layout, read by embedding-reader and autofaiss: one vector per image."""

    name = "embedding-reader"

    def __init__(self, feature: str | None, pool: str | None, normalize: str | None, dtype: str,
                 steps: bool = False) -> None:
        if pool is not None and pool not in POOLS:
            raise UsageError(f"--pool {pool!r} is not one of: {', '.join(POOLS)}")
        if normalize is not None and normalize not in NORMALIZE:
            raise UsageError(f"--normalize {normalize!r} is not one of: {', '.join(NORMALIZE)}")
        if dtype not in EXPORT_DTYPES:
            raise UsageError(f"--dtype {dtype!r} is not one of: {', '.join(EXPORT_DTYPES)}")
        self.feature, self.pool, self.normalize, self.dtype, self.steps = feature, pool, normalize, dtype, steps
        self.by_step = False  # the store holds one pooled row per temporal step (extract --pool-steps)

    @property
    def options(self) -> dict[str, Any]:
        options = {"feature": self.feature, "pool": self.pool, "normalize": self.normalize, "dtype": self.dtype}
        return {**options, "steps": True} if self.steps else options

    def check(self, store) -> None:
        from ..inputs.readers.parquet import pyarrow_parquet

        pyarrow_parquet()  # the extra is installed
        self.feature = feature_of(store, self.feature)
        settings = store.header.settings
        one = settings.media[:-1]
        if self.feature == "deepstack":
            raise UsageError(f"the embedding-reader layout writes one vector per {one}: choose merged or patch, not "
                             "deepstack")
        if self.pool is None and settings.pool == "none":
            raise UsageError(f"this store holds every token of each {one}: pass --pool mean|max|cls to export one "
                             f"vector per {one}" + (" (or --steps, one per temporal step)" if settings.video else ""))
        self.by_step = settings.pool_by == "step"
        if self.steps and settings.video is None:
            raise UsageError("--steps exports a video's temporal steps; this store holds images")
        if self.steps and settings.pool != "none" and not self.by_step:
            raise UsageError("this store holds one pooled row per video: --steps needs a store of every token or "
                             "one extracted with --pool-steps")
        if self.steps and self.by_step and self.pool is not None:
            raise UsageError("this store is pooled per temporal step already: leave --pool out with --steps")
        if self.by_step and not self.steps and self.pool is None:  # one row per video: its steps' rows pooled again
            self.pool = settings.pool  # (equal-sized steps: the same mean, max or first token as the whole)

    def write(self, store, folder: Path, done=_no_callback) -> tuple[int, dict[str, str]]:
        """Write the files into ``folder``, calling ``done(path)`` on each once it is finished."""
        import numpy as np

        from ..inputs.readers.parquet import pyarrow_parquet

        pq = pyarrow_parquet()
        count, index, left_out = 0, 0, {}
        for keys, tokens, offsets in store.iter_shards(self.feature):
            if not keys:  # a shard with no usable image (empty tar, every sample skipped, superseded)
                continue
            records = [store.info(key) for key in keys]
            if self.steps:  # each video's rows split into its temporal steps: a "row" is now one step
                keys, records, offsets = _steps(keys, records, offsets)
            vectors = _pooled(tokens, offsets, None if self.steps and self.by_step else self.pool)
            if self.normalize == "l2":
                with np.errstate(invalid="ignore", over="ignore"):
                    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
            keep = []
            for i, (key, record) in enumerate(zip(keys, records)):
                segment = tokens[offsets[i]:offsets[i + 1]]
                reason = nonfinite_reason(record, segment) or nonfinite_reason({}, vectors[i])
                if reason:
                    left_out[key] = reason
                else:
                    keep.append(i)
            if not keep:
                continue
            vectors = vectors[keep].astype(self.dtype)
            kept_keys = [keys[i] for i in keep]
            for sub in ("img_emb", "metadata"):
                (folder / sub).mkdir(exist_ok=True)
            _save_npy(folder / "img_emb" / f"img_emb_{index}.npy", vectors)
            done(folder / "img_emb" / f"img_emb_{index}.npy")
            pq.write_table(_metadata_table(kept_keys, [records[i] for i in keep]),
                           folder / "metadata" / f"metadata_{index}.parquet")
            done(folder / "metadata" / f"metadata_{index}.parquet")
            index += 1
            count += len(keep)
        return count, left_out


def _steps(keys: list[str], records: list[dict[str, Any]], offsets):
    """Per temporal step of each video: its key, its record with ``step`` and ``time`` added, and the row offsets
    of the step (a video's rows are its steps' rows, step after step, equal in number)."""
    import numpy as np

    step_keys, step_records, step_offsets = [], [], [0]
    for i, (key, record) in enumerate(zip(keys, records)):
        steps = int(record["grid_thw"][0])
        size = (int(offsets[i + 1]) - int(offsets[i])) // steps
        times = (record.get("video") or {}).get("step_times") or [None] * steps
        for step in range(steps):
            step_keys.append(key)
            step_records.append({**record, "step": step, "time": times[step]})
            step_offsets.append(step_offsets[-1] + size)
    return step_keys, step_records, np.asarray(step_offsets)


def _metadata_table(keys: list[str], rows: list[dict[str, Any]]):
    import pyarrow as pa

    table = {"key": [key_text(k) for k in keys], "source": [name_text(r.get("source")) for r in rows],
             "member": [name_text(r.get("member")) for r in rows]}
    if needs_key_bytes(keys):
        table["key_bytes"] = pa.array([key_bytes(k) for k in keys], type=pa.binary())
    captions = [(r.get("meta") or {}).get("caption") for r in rows]
    if any(c is not None for c in captions):
        table["caption"] = [printable(c) if isinstance(c, str) else c for c in captions]
    extra = [(r.get("meta") or {}).get("json") for r in rows]
    if any(e is not None for e in extra):
        table["json"] = [json.dumps(e) if e is not None else None for e in extra]  # ASCII escapes: always valid
    if rows and "step" in rows[0]:  # one row per temporal step of a video: which, and when (seconds)
        table["step"] = pa.array([r["step"] for r in rows], type=pa.int32())
        table["time"] = pa.array([r["time"] for r in rows], type=pa.float64())
    return pa.table(table)


# ---- the gate ------------------------------------------------------------------------------------------------------


def feature_of(store, feature: str | None) -> str:
    feature = feature or store.features[0]
    if feature not in store.features:
        raise UsageError(f"--feature {feature!r} is not in this store; it has: {', '.join(store.features)}")
    return feature


def make_layout(layout: str, feature: str | None = None, pool: str | None = None, normalize: str | None = None,
                dtype: str = "float16", key: str = "store", steps: bool = False):
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r} is not one of: {', '.join(LAYOUTS)}")
    if key not in KEY_MODES:
        raise UsageError(f"--key {key!r} is not one of: {', '.join(KEY_MODES)}")
    if layout == "embedding-reader":
        if key != "store":
            raise UsageError("--key content applies to the vllm-ec layout")
        return EmbeddingReaderLayout(feature, pool, normalize, dtype, steps)
    if steps:
        raise UsageError("--steps applies to the embedding-reader layout")
    if pool is not None or normalize is not None or feature is not None:
        raise UsageError(f"--layout {layout} exports every token of each input as the model's encoder output; "
                         "--feature, --pool and --normalize apply to embedding-reader")
    if dtype != "float16":
        raise UsageError(f"--dtype applies to embedding-reader vectors; --layout {layout} writes bfloat16, the "
                         "dtype the serving stack's encoder produces")
    from .serving import SglangLayout, VllmEcLayout

    return VllmEcLayout(key) if layout == "vllm-ec" else SglangLayout(key)


def export(store_path: str | Path, dest: str | Path, layout: str = "embedding-reader", *, feature: str | None = None,
           pool: str | None = None, normalize: str | None = None, dtype: str = "float16", key: str = "store",
           allow_partial: bool = False, steps: bool = False, storage_options=None) -> ExportResult:
    """Export a store into DEST in ``layout``; see the module docstring for the rules every layout follows."""
    from ..storage.location import url_scheme
    from ..storage.roots import SERVED, check_location, parse_storage_options
    from ..storage.store import open_store
    from ..version import __version__
    from .export_target import ExportMarker, open_target, store_identity

    check_location(dest, "DEST")
    options = parse_storage_options(storage_options)  # for whichever of the store and DEST is an object store
    remote_store, remote_dest = url_scheme(store_path) in SERVED, url_scheme(dest) in SERVED
    if options and not (remote_store or remote_dest):
        raise UsageError("--storage-option applies to object stores (s3://...); neither the store nor DEST is one")
    writer = make_layout(layout, feature, pool, normalize, dtype, key, steps)
    with stop_on_signals(), contextlib.ExitStack() as stack:  # (SIGTERM/SIGINT: Interrupted, the folder removed)
        first = stack.enter_context(open_store(store_path, storage_options=options if remote_store else None))
        writer.check(first)
        identity = store_identity(first.header)
        target = open_target(dest, identity, first.root, options if remote_dest else None)
        missing = check_store(first, allow_partial)
        # opened again after the check: what a run still writing committed since the first opening is exported with
        # the rest (the first opening's key list would leave it out of an export the check called finished)
        store = stack.enter_context(open_store(first.root))
        folder = target.begin()
        try:
            try:
                count, left_out = writer.write(store, folder, target.done)
            except Exception as exc:  # (safetensors and pyarrow say ENOSPC in their own exception types)
                if is_no_space(exc):
                    raise_store_error(exc, getattr(target, "dest", folder))
                raise
            if left_out and not count:  # NaN/Inf found in the data now (pooled values too)
                example = f"; e.g. {key_text(next(iter(left_out)))!r}: {next(iter(left_out.values()))}"
                raise StoreError(every_image_nonfinite(store.root, len(left_out), example, store.header.settings.media))
            if left_out:
                sample = ", ".join(repr(key_text(k)) for k in list(left_out)[:5])
                logger.warning("left out %d %s whose tokens hold NaN/Inf values (%s%s); the list is in %s",
                               len(left_out), store.header.settings.media, sample, ", ..." if len(left_out) > 5 else "",
                               target.show(".vitok-export.json"))
            import datetime

            marker = ExportMarker(
                layout=writer.name, store=store.root.where, store_id=identity,
                fingerprint=store.header.fingerprint, images=count, vitok_version=__version__,
                created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                options=writer.options, left_out=left_out, missing=missing,
                contract=getattr(writer, "contract_json", None))
            target.commit(marker)
        except BaseException:
            target.abort()
            raise
    counted = "temporal steps" if getattr(writer, "steps", False) else store.header.settings.media
    return ExportResult(writer.name, dest if remote_dest else Path(dest), count, left_out, missing, counted)


def export_embedding_reader(store_path, dest, feature: str | None = None, pool: str | None = None,
                            normalize: str | None = None, dtype: str = "float16", allow_partial: bool = False) -> int:
    """Write a store's vectors in embedding-reader's parquet_npy layout; returns the number of vectors."""
    return export(store_path, dest, "embedding-reader", feature=feature, pool=pool, normalize=normalize, dtype=dtype,
                  allow_partial=allow_partial).images

"""vitok inside a Ray Data pipeline you already have: an encoder for ``Dataset.map_batches`` and a store writer.

    import ray
    from vitok.integrations.ray import TokenEncoder, write_store

    options = dict(model="qwen3-vl-2b", features=("merged",), store_dtype="float16")
    ds = ray.data.read_parquet("s3://bucket/laion/")               # a "jpg" column of image bytes, a "key" column
    ds = ds.map_batches(TokenEncoder, fn_constructor_kwargs={"image_column": "jpg", **options},
                        compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_size=64)
    ds.take(1)[0]["merged"].shape                                   # (tokens, 2048); "grid": (t, h, w) in patches
    write_store(ds, "out/", key_column="key", **options)            # a store vitok.open reads

``TokenEncoder`` takes image bytes (a column of bytes, or Hugging Face image structs ``{"bytes": ...}``) or decoded
uint8 arrays (H, W, 3); it returns the batch without the image column, plus one column per feature holding each
image's tokens (``(tokens, dim)``; deepstack ``(levels, tokens, dim)``; one row with ``pool``), ``grid`` and
``vitok_error`` (empty, or why the image was skipped: an undecodable image costs its row's tokens, not the job).

``write_store`` writes what it is given in the order Ray hands it over, on the driver, into a new store (shards of
``shard_size`` rows, the same commit protocol and header): it does not resume. For a resumable, planned run with
the same guarantees as ``vitok extract``, use ``vitok extract SOURCES -o OUT --engine ray``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError, UsageError
from ..storage.keys import key_text, unstorable
from ..storage.layout import SHARDS_DIR, shard_name

IMAGE_COLUMN = "image"


class TokenEncoder:
    """A callable class for ``Dataset.map_batches``: image bytes or arrays in, per-image tokens and grids out.

    Args:
        image_column: the column holding the images.
        **options: fields of :class:`vitok.ExtractOptions` that decide the tokens (model, device, dtype,
            features, pool, store_dtype, token_order, token_budget, min_pixels, max_pixels, image_size, ...).
    """

    def __init__(self, image_column: str = IMAGE_COLUMN, **options: Any) -> None:
        from ..encoder.inference import load_encoder
        from ..inputs.gpu_decode import device_decode
        from ..inputs.preprocess import Preprocessor
        from ..pipeline.batcher import default_budget
        from ..pipeline.device import DevicePipeline

        self.image_column = image_column
        spec = Spec(options)
        self.encoder = load_encoder(spec.source, spec.options.device, spec.options.dtype, seed=spec.options.seed,
                                    attention=spec.options.attention, preprocess=spec.preprocess)
        self.spec, self.preprocessor = spec, Preprocessor(spec.preprocess)
        self.pipeline = DevicePipeline(self.encoder, spec.features, spec.options.pool, spec.options.store_dtype,
                                       spec.options.token_order,
                                       decode=device_decode(self.encoder.preprocess, self.encoder.device))
        self.budget = spec.options.token_budget or default_budget(self.encoder.device.type)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..pipeline.batcher import plan_batches
        from ..pipeline.types import Batch, Item
        from ..storage.format import row_offsets
        from ..storage.records import ImageRecord

        images = batch[self.image_column]
        count = len(images)
        errors = [""] * count
        items = []
        for i, value in enumerate(images):
            try:
                image = self._prepare(value)
                items.append(Item(ImageRecord(str(i), "ok", "", grid=list(image.grid_thw)), image))
            except ImageError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # an exotic decoder failure costs one image
                errors[i] = f"internal error while decoding: {type(exc).__name__}: {exc}"
        outputs: dict[str, list] = {feature: [None] * count for feature in self.spec.features}
        grids = np.zeros((count, 3), dtype=np.int32)
        for batch_range in plan_batches([item.image.num_patches for item in items], self.budget):
            chosen = [items[j] for j in batch_range]
            for encoded in self.pipeline.submit(Batch(0, chosen)) + self.pipeline.drain():
                for record in encoded.skipped:
                    errors[int(record.key)] = record.reason or "skipped"
                for feature, array in encoded.arrays.items():
                    starts = row_offsets(encoded.rows[feature])
                    for record, start, stop in zip(encoded.records, starts[:-1], starts[1:]):
                        outputs[feature][int(record.key)] = array[..., start:stop, :]
                for record in encoded.records:
                    grids[int(record.key)] = record.grid
        result = {name: column for name, column in batch.items() if name != self.image_column}
        for feature, values in outputs.items():
            result[feature] = _column([v if v is not None else self._empty(feature) for v in values])
        result["grid"], result["vitok_error"] = grids, np.array(errors, dtype=object)
        return result

    def _prepare(self, value):
        if isinstance(value, dict):  # a Hugging Face image struct
            value = value.get("bytes")
        if value is None:
            raise ImageError("no image in this row")
        if isinstance(value, (bytes, bytearray, np.bytes_)):
            image = self.preprocessor.load(bytes(value))
        else:
            image = self.preprocessor.prepare(np.asarray(value))
        if image.patches is None:
            raise ImageError("decoded on the GPU (--decode gpu) is not supported here")
        return image

    def _empty(self, feature: str) -> np.ndarray:
        layout = self.spec.layouts[feature]
        shape = (0, layout.dim) if layout.levels is None else (layout.levels, 0, layout.dim)
        return np.zeros(shape, layout.numpy_dtype(self.spec.options.store_dtype))


def _column(values: list[np.ndarray]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class Spec:
    """What the options decide: model source, features, preprocessing, stored layouts (shared by both ends)."""

    def __init__(self, options: dict[str, Any]) -> None:
        from ..encoder.checkpoint import resolve_model
        from ..encoder.features import check_features, default_features
        from ..run.job import preprocess_for
        from ..run.options import make_options
        from ..run.settings_schema import feature_layouts

        self.options = make_options(**options)
        self.source = resolve_model(self.options.model)
        config = self.source.encoder
        self.features = check_features(config, self.options.features or default_features(config))
        self.preprocess = preprocess_for(self.source, self.options)
        self.layouts = feature_layouts(config, self.features)


def write_store(dataset, out: str | os.PathLike, *, key_column: str = "key", shard_size: int = 1000,
                **options: Any) -> int:
    """Write ``TokenEncoder``'s output into a new vitok store at ``out``; returns the number of shards.

    Args:
        dataset: a Ray Dataset (or any iterable of column batches) with ``key_column``, the feature columns,
            ``grid`` and ``vitok_error``.
        out: a new or empty folder.
        key_column: the column of unique keys (``vitok.open(out)[key]``).
        shard_size: rows per shard.
        **options: the same options ``TokenEncoder`` was given (they are the store's settings; give ``dtype``
            explicitly when the actors' device differs from the driver's, since ``auto`` depends on the device).
    """
    from ..encoder.inference import load_encoder, resolve_device, resolve_dtype
    from ..environment import describe_environment
    from ..run.job import Job, check_out_folder
    from ..run.settings_schema import make_settings, new_header
    from ..storage import SidecarStamp, get_format, new_store


    out = Path(out)
    if check_out_folder(out) is not None or (out / SHARDS_DIR).exists():
        raise UsageError(f"{out} already holds a store; write_store writes a new one (choose an empty folder)")
    spec = Spec({**options, "shard_size": shard_size})
    opts = spec.options
    encoder = load_encoder(spec.source, "cpu", opts.dtype if opts.dtype != "auto" else "float32", seed=opts.seed)
    device = resolve_device(opts.device)
    job = Job.for_stream(out, opts, spec.source, spec.preprocess, spec.features, device,
                         resolve_dtype(opts.dtype, device))
    header = new_header(job, make_settings(job, encoder.weights_hash), describe_environment(encoder))
    out.mkdir(parents=True, exist_ok=True)
    header, created = new_store(out, header)
    if not created:
        raise UsageError(f"{out} was started by another writer meanwhile")
    writer = _ShardWriter(out, get_format(opts.format), spec, SidecarStamp(header.fingerprint, "0/1"))
    batches = dataset.iter_batches(batch_size=None, batch_format="numpy") if hasattr(dataset, "iter_batches") \
        else dataset
    for batch in batches:
        writer.add(batch, key_column)
    return writer.close()


class _ShardWriter:
    """Rows in, shards of ``shard_size`` rows out, each committed by ``ShardSink`` (temporary file, sidecar)."""

    def __init__(self, out: Path, fmt, spec: Spec, stamp) -> None:
        self.out, self.fmt, self.spec, self.stamp = out, fmt, spec, stamp
        self.run = f"ray-{uuid.uuid4().hex[:8]}"
        self.sink, self.rows, self.shards = None, 0, 0

    def add(self, batch: dict[str, np.ndarray], key_column: str) -> None:
        for i in range(len(batch[key_column])):
            self._row({name: column[i] for name, column in batch.items()}, key_column)

    def _row(self, row: dict[str, Any], key_column: str) -> None:
        from ..pipeline.sink import ShardSink
        from ..pipeline.types import EncodedBatch
        from ..storage.records import ImageRecord

        spec = self.spec
        if self.sink is None:
            self.sink = ShardSink(self.out, self.fmt, shard_name(self.shards), spec.layouts,
                                  spec.options.store_dtype, spec.options.compression, self.run)
        key = str(row[key_column])
        error = str(row.get("vitok_error") or "")
        problem = unstorable(key)
        if problem is not None:  # costs this row, not the shard
            error = f"its key '{key_text(key)}' {problem}; not stored"
        if error:
            self.sink.add_record(ImageRecord(key, "skipped", "ray", reason=error))
        else:
            record = ImageRecord(key, "ok", "ray", grid=[int(v) for v in row["grid"]])
            arrays = {f: np.asarray(row[f]) for f in spec.features}
            rows = {f: [arrays[f].shape[-2]] for f in spec.features}
            self.sink.add_batch(EncodedBatch(self.shards, [record], arrays, rows))
        self.rows += 1
        if self.rows == spec.options.shard_size:
            self._commit()

    def _commit(self) -> None:
        from ..storage.records import UnitInfo

        self.sink.commit(unit=UnitInfo(kind="ray"), **self.stamp.fields())
        self.sink, self.rows, self.shards = None, 0, self.shards + 1

    def close(self) -> int:
        if self.sink is not None:
            self._commit()
        return self.shards

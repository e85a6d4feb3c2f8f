"""Exports for retrieval indexes: the layout clip-retrieval writes and embedding-reader / autofaiss read.

    DEST/img_emb/img_emb_{i}.npy            (n_i, D) float16 or float32, one file per store shard
    DEST/metadata/metadata_{i}.parquet      the same rows in order: key, source, member, caption (when the input had
                                            one), and the json fields of archive samples

Written file by file under temporary names (a killed export leaves no half file under a final name); pyarrow is the
``vitok[parquet]`` extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..storage.files import file_mode

POOLS = ("mean", "max", "cls")


def _pooled(tokens: np.ndarray, offsets: np.ndarray, pool: str | None) -> np.ndarray:
    if tokens.ndim != 2:
        raise UsageError("export writes one vector per image: choose merged or patch, not deepstack")
    if pool is None:
        if np.any(np.diff(offsets) != 1):
            raise UsageError("this store holds every token of each image: pass --pool mean|max|cls to export one "
                             "vector per image")
        return tokens
    segments = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    if pool == "mean":
        return np.stack([s.mean(0) for s in segments])
    if pool == "max":
        return np.stack([s.max(0) for s in segments])
    return np.stack([s[0] for s in segments])


def _metadata_table(store, keys: list[str]):
    import pyarrow as pa

    rows = [store.info(key) for key in keys]
    table = {"key": keys, "source": [r.get("source") for r in rows], "member": [r.get("member") for r in rows]}
    captions = [(r.get("meta") or {}).get("caption") for r in rows]
    if any(c is not None for c in captions):
        table["caption"] = captions
    extra = [(r.get("meta") or {}).get("json") for r in rows]
    if any(e is not None for e in extra):
        table["json"] = [json.dumps(e) if e is not None else None for e in extra]
    return pa.table(table)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save on a name would append ".npy" to the temporary name
        np.save(handle, array)


def _save(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def export_embedding_reader(store_path, dest, feature: str | None = None, pool: str | None = None,
                            normalize: str | None = None, dtype: str = "float16") -> int:
    """Write a store's vectors in embedding-reader's parquet_npy layout; returns the number of vectors."""
    import vitok

    from ..inputs.readers.parquet import pyarrow_parquet

    pq = pyarrow_parquet()
    if pool is not None and pool not in POOLS:
        raise UsageError(f"--pool {pool!r} is not one of: {', '.join(POOLS)}")
    if normalize not in (None, "l2"):
        raise UsageError(f"--normalize {normalize!r} is not one of: l2")
    store = vitok.open(store_path)
    feature = feature or store.features[0]
    dest = Path(dest)
    (dest / "img_emb").mkdir(parents=True, exist_ok=True)
    (dest / "metadata").mkdir(parents=True, exist_ok=True)
    count = 0
    for index, (keys, tokens, offsets) in enumerate(store.iter_shards(feature)):
        vectors = _pooled(tokens, offsets, pool)
        if normalize == "l2":
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        vectors = vectors.astype(dtype)
        _save(dest / "img_emb" / f"img_emb_{index}.npy", lambda tmp, v=vectors: _save_npy(tmp, v))
        table = _metadata_table(store, keys)
        _save(dest / "metadata" / f"metadata_{index}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
        count += len(keys)
    store.close()
    return count

"""Build SGLang's precomputed-embedding image items from a `vitok export --layout sglang` folder.

    vitok export out/ embeds/ --layout sglang
    python examples/sglang_precomputed.py embeds/ [KEY ...]

Needs pyarrow and torch only (not vitok). Each parquet row holds one image: ``key`` (text), ``key_bytes`` (the exact
key), ``feature`` (bfloat16, little-endian, row major), ``dtype``, ``shape`` ([tokens, width]) and
``image_grid_thw`` ([[t, h, w]]). The item this script builds is what SGLang's offline engine takes as an image
(docs: advanced_features/vlm_query, "precomputed_embedding"); one format per request::

    import sglang as sgl
    engine = sgl.Engine(model_path="Qwen/Qwen3-VL-2B-Instruct")
    engine.generate(input_ids=prompt_ids, image_data=[item])   # prompt_ids hold the image's placeholder tokens
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def rows(folder):
    """Every exported row, in order, read row group by row group."""
    for path in sorted(Path(folder).glob("embeds-*.parquet")):
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield from parquet.read_row_group(group).to_pylist()


def precomputed_item(row) -> dict:
    """SGLang's item for one row: the feature as a bfloat16 tensor [tokens, width] and its grid."""
    assert row["dtype"] == "bfloat16", row["dtype"]
    bits = np.frombuffer(row["feature"], dtype="<i2").astype(np.int16)
    feature = torch.from_numpy(bits).view(torch.bfloat16).reshape(row["shape"])
    return {"format": "precomputed_embedding", "feature": feature,
            "image_grid_thw": torch.tensor(row["image_grid_thw"], dtype=torch.long)}


def items(folder) -> dict[str, dict]:
    """key -> item, for every image of the export (keys as exact strings; non-UTF-8 bytes surrogate-escaped)."""
    return {row["key_bytes"].decode("utf-8", "surrogateescape"): precomputed_item(row) for row in rows(folder)}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    wanted = set(argv[1:])
    for key, item in items(argv[0]).items():
        if wanted and key not in wanted:
            continue
        feature = item["feature"]
        print(f"{key!r}: feature {tuple(feature.shape)} {feature.dtype}, image_grid_thw "
              f"{item['image_grid_thw'].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

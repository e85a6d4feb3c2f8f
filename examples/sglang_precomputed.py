"""Build SGLang's precomputed-embedding item for one request from a `vitok export --layout sglang` folder.

    vitok extract imgs/ -o out/ --model Qwen/Qwen2.5-VL-3B-Instruct --store-dtype bfloat16
    vitok export out/ embeds/ --layout sglang
    python examples/sglang_precomputed.py embeds/ [KEY ...]

Needs pyarrow and torch only (not vitok). Each parquet row holds one image: ``key`` (its text form), ``key_bytes``
(the exact key), ``feature`` (bfloat16, little-endian, row major), ``dtype``, ``shape`` ([tokens, width]) and
``image_grid_thw`` ([[t, h, w]]). SGLang takes one precomputed item per modality per request, so the images of a
request are one item (features concatenated, grids stacked), and it passes the given ``input_ids`` through
unchanged, so they must hold ``t*h*w / merge**2`` image-pad tokens per image (``expand_prompt``)::

    import sglang as sgl
    engine = sgl.Engine(model_path="Qwen/Qwen2.5-VL-3B-Instruct")
    rows = rows_by_key("embeds/")
    item = request_item([rows["cat.jpg"], rows["dog.jpg"]])
    ids = expand_prompt(prompt_ids, item["image_grid_thw"], image_pad_id)  # one pad per image in prompt_ids
    engine.generate(input_ids=ids, image_data=[item])

Which models take it (SGLang 0.5.23, read in its source): Qwen2.5-VL passes such a feature through as the image's
embedding; **Qwen3-VL does not** (its ``get_image_feature`` feeds ``feature`` to the vision tower as pixel patches),
so do not use this for Qwen3-VL stores: serve them through vLLM's encoder cache (docs/exports.md).
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


def rows_by_key(folder) -> dict[str, dict]:
    """key -> row (keys as exact strings: bytes that are not UTF-8 surrogate-escaped, as vitok names them)."""
    return {row["key_bytes"].decode("utf-8", "surrogateescape"): row for row in rows(folder)}


def feature(row) -> torch.Tensor:
    """One row's embedding: bfloat16 [tokens, width]."""
    assert row["dtype"] == "bfloat16", row["dtype"]
    bits = np.frombuffer(row["feature"], dtype="<i2").astype(np.int16)
    return torch.from_numpy(bits).view(torch.bfloat16).reshape(row["shape"])


def request_item(request_rows) -> dict:
    """SGLang's one precomputed item for the images of a request, in prompt order."""
    return {"format": "precomputed_embedding", "feature": torch.cat([feature(r) for r in request_rows]),
            "image_grid_thw": torch.tensor([g for r in request_rows for g in r["image_grid_thw"]], dtype=torch.long)}


def precomputed_item(row) -> dict:
    """The item of a request of one image."""
    return request_item([row])


def items(folder) -> dict[str, dict]:
    """key -> the item of a request of that image alone, for every image of the export."""
    return {key: precomputed_item(row) for key, row in rows_by_key(folder).items()}


def expand_prompt(input_ids, grids, image_pad_id: int, merge_size: int = 2) -> list[int]:
    """``input_ids`` with its k-th image-pad token repeated as many times as image k has tokens."""
    ids = list(input_ids)
    counts = [int(t) * int(h) * int(w) // merge_size**2 for t, h, w in grids.tolist()]
    if ids.count(image_pad_id) != len(counts):
        raise ValueError(f"the prompt holds {ids.count(image_pad_id)} image placeholder(s) for {len(counts)} image(s)")
    expanded, images = [], iter(counts)
    for token in ids:
        expanded += [token] * next(images) if token == image_pad_id else [token]
    return expanded


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    wanted = set(argv[1:])
    for key, item in items(argv[0]).items():
        if wanted and key not in wanted:
            continue
        print(f"{key!r}: feature {tuple(item['feature'].shape)} {item['feature'].dtype}, image_grid_thw "
              f"{item['image_grid_thw'].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Build a faiss index over a `vitok export` folder and query it with its own vectors.

    vitok export out/ index/ --pool mean --normalize l2
    python scripts/faiss_index.py index/            # prints recall@1 of each image against itself

Reads the folder with embedding-reader (as autofaiss does); inner product on L2-normalised vectors = cosine.
Needs faiss-cpu and embedding-reader (pip install faiss-cpu embedding-reader).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a `vitok export` folder (img_emb/ and metadata/)")
    parser.add_argument("--k", type=int, default=5, help="neighbours to print for the first query")
    args = parser.parse_args(argv)
    import faiss
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(f"{args.folder}/img_emb", file_format="parquet_npy", meta_columns=["key"],
                             metadata_folder=f"{args.folder}/metadata")
    vectors, keys = [], []
    for batch, meta in reader(batch_size=100_000, start=0, end=reader.count):
        vectors.append(batch.astype(np.float32))
        keys += list(meta["key"])
    data = np.concatenate(vectors)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    _, neighbours = index.search(data, args.k)
    recall = float(np.mean(neighbours[:, 0] == np.arange(len(data))))
    print(f"{len(data)} vectors of {data.shape[1]} dims; nearest neighbour is the image itself for "
          f"{recall:.1%} of them")
    print(f"neighbours of {keys[0]}: {[keys[i] for i in neighbours[0]]}")
    return 0 if recall == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Check that `beit embed` Parquet output reads with pyarrow and pandas and holds exactly the
values of the JSON-lines output of the same images.

    beit embed --model M IMAGES --output emb.jsonl
    beit embed --model M IMAGES --output emb.parquet        # or shards: out/emb-*.parquet
    python scripts/check_parquet.py emb.parquet emb.jsonl   # PARQUET may be a folder of shards

Needs numpy, pandas and pyarrow (pip install pyarrow pandas).
"""

import json
import sys

import numpy as np
import pandas as pd
import pyarrow.dataset as ds


def main(parquet, jsonl):
    table = ds.dataset(parquet, format="parquet").to_table()
    print(table.schema)
    df = table.to_pandas()
    expected = {}
    for line in open(jsonl):
        row = json.loads(line)
        if "embedding" in row:
            expected[row["path"]] = np.array(row["embedding"], dtype=np.float32)
    assert sorted(df.path) == sorted(expected), "different images"
    assert len(set(df.path)) == len(df), "an image twice"
    for path, emb in zip(df.path, df.embedding):
        assert emb.dtype == np.float32, emb.dtype
        assert np.array_equal(emb, expected[path]), path
    x = np.stack(df.embedding.to_numpy())
    print(f"OK: {x.shape[0]} embeddings of dimension {x.shape[1]}, equal to {jsonl}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

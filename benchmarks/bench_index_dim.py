"""Fidelity of ``projidx index --index-dim d``: scores through the second JL against the full concatenation.

On a demo store (``projidx demo --out DIR``: 4 checkpoints x k = 2048, so C x k = 8192), 32 held-out digits are
featurized once; for each method and each d, the (queries x training rows) scores of the sketched vectors are
compared with those of the full vectors: Spearman per query (averaged) and top-10 overlap. Each index is C x k
wide without the option, d wide with it, whatever the number of checkpoints.

    python benchmarks/bench_index_dim.py --store demo-out/store.zarr --out bench-out/index_dim.json

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from projidx.analysis.bias import rank_agreement
from projidx.data.datasets import load_dataset
from projidx.features.featurization import featurize_queries
from projidx.search.attribution import store_checkpoints
from projidx.search.index import store_sketch
from projidx.search.scoring import query_vectors, train_vectors, vector_dim
from projidx.store.feature_store import FeatureStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="bench-out/index_dim.json")
    p.add_argument("--dims", default="256,512,1024,2048,4096")
    p.add_argument("--queries", type=int, default=32)
    args = p.parse_args()
    store = FeatureStore.open(args.store)
    queries = load_dataset("digits:test").subset(slice(0, args.queries))
    qf = featurize_queries(store, store_checkpoints(store), queries, progress=False)
    rows = []
    for method in ("matched", "retrac", "tracin"):
        qv = query_vectors(store, qf, method)
        tv = np.concatenate([train_vectors(store, method, i) for i in range(store.n_chunks)])
        full = qv @ tv.T
        full_dim = vector_dim(store, method)
        for d in [int(v) for v in args.dims.split(",")]:
            sketch = store_sketch(store, method, d)
            agreement = rank_agreement(sketch(qv) @ sketch(tv).T, full, ks=(10,))
            rows.append({"method": method, "index_dim": d, "full_dim": full_dim, **agreement})
            print(f"{method:<8} d={d:<5} (full {full_dim}): Spearman {agreement['spearman']:.3f}, top-10 overlap"
                  f" {agreement['top10_overlap']:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"store": args.store, "queries": args.queries, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""`reco neighbors` against bare faiss search + gather on the same index.

    python benchmarks/neighbors.py [--rows 50000] [--d 64] [--k 10] [--key IVF256,Flat] [--repeats 2]

Writes a memory of clustered, embedding-like pairs and indexes it once with `reco index`.
Then, each repeat (the two sides interleaved), every memory pair is a query, in both modalities:
- ours: `neighbors(cfg)` end to end (shard-job actors holding the memory, search with
  k + margin, drop the pair itself and image near-duplicates, gather the cross-modal
  embeddings, write Parquet neighbour shards + manifest);
- bare: read the queries from the memory Parquet, `index.search(queries, k)` on the same
  index file with the same search parameters, and gather the other modality's rows from
  the same embedding arrays with numpy (no de-duplication, no output written).
Queries/s medians are printed; the last line is the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from common import interleaved, load, median

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from autofaiss.indices.index_utils import set_search_hyperparameters  # noqa: E402

from benchmarks.index import clustered  # noqa: E402
from indexing.build import build_index  # noqa: E402
from indexing.neighbors import neighbors  # noqa: E402
from reco.cluster import init_ray  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.contracts import IndexManifest, embeddings_to_numpy, index_folder, write_memory  # noqa: E402

OTHER = {"image": "text", "text": "image"}


def bare(workdir: str, k: int, queries: str | None = None) -> None:
    """Bare faiss search + numpy gather of every pair of `queries` (a memory-format folder;
    default the memory itself), both modalities."""
    tables = [pq.read_table(p) for p in sorted(Path(queries or Path(workdir) / "memory").glob("part-*.parquet"))]
    queries = {m: np.concatenate([embeddings_to_numpy(t[f"{m}_embedding"]) for t in tables]) for m in OTHER}
    index, rows = {}, {}
    for m in OTHER:
        manifest = IndexManifest.read(index_folder(workdir, m))
        folder = Path(index_folder(workdir, m))
        index[m] = faiss.read_index(str(folder / manifest.shards[0].path), faiss.IO_FLAG_MMAP)
        if manifest.index_param:
            set_search_hyperparameters(index[m], manifest.index_param, False)
        rows[m] = np.concatenate([np.load(folder / c.embeddings) for c in manifest.shards[0].memory_shards])
    for m in OTHER:
        _, ids = index[m].search(queries[m], k)
        rows[OTHER[m]][ids].astype(np.float32)


def ours(cfg) -> None:
    shutil.rmtree(cfg.path("neighbors"), ignore_errors=True)
    neighbors(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--key", default="IVF256,Flat")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-neighbors-"))
    write_memory(str(root / "memory"), *clustered(args.rows, args.d, seed=1), shard_rows=-(-args.rows // 8),
                 model="bench")
    cfg = config_from_dict({"workdir": str(root), "index": {"key": args.key}, "neighbors": {"k": args.k}})
    init_ray()
    faiss.omp_set_num_threads(os.cpu_count())
    build_index(cfg)
    times = interleaved({"bare": lambda: bare(str(root), args.k), "ours": lambda: ours(cfg)}, args.repeats)
    qps = {name: args.rows / median(t) for name, t in times.items()}
    print(f"{args.rows} pairs, d={args.d}, k={args.k}, index {args.key}, {args.repeats} repeats (medians; {load()})")
    print(f"  ours {qps['ours']:.0f} queries/s (both modalities, dedup, Parquet written)")
    print(f"  bare {qps['bare']:.0f} queries/s (faiss search k + numpy gather)")
    print(f"neighbors: {qps['ours'] / qps['bare']:.2f}x of bare faiss search + gather")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark `reco index` against bare autofaiss and bare faiss on the same memory.

    python benchmarks/index.py [--rows 200000] [--d 512] [--key IVF2048,Flat] [--repeats 3]

Writes a memory of clustered, embedding-like float16 vectors (memory format, 20 shards),
then, each repeat (the two sides interleaved):
- build: `build_index(cfg)` (both modalities, on Ray) vs autofaiss `build_index` on the
  same Parquet folder with the same key, once per modality, in this process;
- recall@10 of `MemoryIndex.search` against exact (brute-force) search on fresh queries;
- search QPS: `MemoryIndex.search` vs `index.search` of bare faiss on the same index file,
  same nprobe, same queries (one batch of 2k).
Medians are printed; the last line is the build ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from common import interleaved, load, median

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from autofaiss import build_index as autofaiss_build_index  # noqa: E402

from indexing.build import build_index, index_recall  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.contracts import index_folder, write_memory  # noqa: E402
from reco.demo.synthetic import clustered_embeddings  # noqa: E402
from reco.search import MemoryIndex  # noqa: E402


def clustered(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered pairs like a web corpus's embeddings: 1000 concepts, loose clusters."""
    return clustered_embeddings(n, d, seed, clusters=1000, spread=0.6, text_spread=0.3)


def build_ours(root: Path, memory: Path, key: str) -> None:
    """`reco index` of `memory` with `key`, in a new workdir under `root` (ours-*)."""
    work = Path(tempfile.mkdtemp(prefix="ours-", dir=root))
    os.symlink(memory, work / "memory")
    build_index(config_from_dict({"workdir": str(work), "index": {"key": key}}))


def build_bare(root: Path, memory: Path, key: str) -> None:
    """Bare autofaiss building both modalities' indices of `memory` with `key`, one after
    the other, in this process, into a new folder under `root`."""
    out = Path(tempfile.mkdtemp(prefix="bare-", dir=root))
    for modality in ("image", "text"):
        autofaiss_build_index(str(memory), file_format="parquet", embedding_column_name=f"{modality}_embedding",
                              index_path=str(out / f"{modality}.index"), index_infos_path=str(out / f"{modality}.json"),
                              index_key=key, max_index_memory_usage="4GB", current_memory_available="16GB",
                              should_be_memory_mappable=True, verbose=logging.WARNING)


def qps(search, queries: np.ndarray, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - t)
    return len(queries) / median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--key", default="IVF2048,Flat", help="autofaiss's memory-mappable choice for 200k rows")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image, text = clustered(args.rows, args.d, seed=1)
        write_memory(str(root / "memory"), image, text, shard_rows=-(-len(image) // 20), model="bench")
        seconds = interleaved({"ours": lambda: build_ours(root, root / "memory", args.key),
                               "bare autofaiss": lambda: build_bare(root, root / "memory", args.key)}, args.repeats)
        memory = MemoryIndex.open(str(next(root.glob("ours-*"))))
        manifest = memory.manifests["image"]
        queries = clustered(2_000, args.d, seed=2)[0]
        exact = faiss.IndexFlatIP(args.d)
        exact.add(image.astype(np.float16).astype(np.float32))
        _, truth = exact.search(queries[:1000], 10)
        _, found = memory.search(queries[:1000], 10, "image")
        bare_index = faiss.read_index(str(Path(index_folder(memory.workdir, "image")) / manifest.shards[0].path),
                                      faiss.IO_FLAG_MMAP)
        faiss.ParameterSpace().set_index_parameters(bare_index, manifest.index_param)
        ours_qps = qps(lambda q: memory.search(q, 10, "image"), queries)
        bare_qps = qps(lambda q: bare_index.search(q, 10), queries)
        print(f"rows {args.rows} x d {args.d}, key {manifest.key}, search {manifest.index_param} ({load()})")
        print(f"recall@10 vs exact: {index_recall(found, truth):.4f} (manifest, held-out: {manifest.recall_at_10:.4f})")
        print(f"search: {ours_qps:.0f} q/s vs bare faiss {bare_qps:.0f} q/s: {ours_qps / bare_qps:.2f}x of bare faiss")
        ours, bare = median(seconds["ours"]), median(seconds["bare autofaiss"])
        print(f"index build: {ours:.1f}s vs {bare:.1f}s: {ours / bare:.2f}x of bare autofaiss")


if __name__ == "__main__":
    main()

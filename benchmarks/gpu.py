"""On one NVIDIA GPU: embed, search and train, each against its bare library, as ratios.

    python benchmarks/gpu.py [--pairs 4096] [--rows 200000] [--train-rows 65536] [--repeats 3]

- embed: `reco embed` end to end (ViT-B-32, a seeded random init: no weights are needed
  for speed; fp16 autocast, one replica on the GPU) against the bare open_clip forward
  on the same pairs already decoded and preprocessed, the same fp16 autocast and batch
  (benchmarks/embed.py's bare forward);
- search: the same built index searched by `MemoryIndex` on the GPU (faiss-gpu) against
  on the CPU (faiss), same queries, k and nprobe: a speed-up, not an overhead;
- train: `reco train` (one Ray Train worker on the GPU, bf16 autocast) steady-state
  steps/s against a bare PyTorch loop on the GPU (benchmarks/train.py's loop).

It stops with a message when torch sees no CUDA device or faiss has no GPU support.
The last line holds the three ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import load, median, parser

import torch  # noqa: E402


def require_gpu() -> None:
    """Stop with a clear message where this benchmark cannot run."""
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False "
                 "here. Run it on a GPU machine (see docs/gpu.md); the CPU benchmarks are "
                 "benchmarks/embed.py, index.py and train.py.")
    from reco.search import gpu_available

    if not gpu_available():
        sys.exit("benchmarks/gpu.py needs faiss with GPU support: install the gpu extra "
                 "(pip install -e \".[gpu]\", docs/gpu.md).")


def embed_ratio(pairs: int, batch_size: int, repeats: int) -> float:
    """`reco embed` end to end over the bare fp16 forward, pairs/s over pairs/s."""
    from embed import bare_forward, bare_inputs, write_corpus

    from pipeline.embed import embed
    from reco.config import config_from_dict
    from reco.models import load_clip

    root = tempfile.mkdtemp(prefix="reco-bench-gpu-embed-")
    samples = write_corpus(root, pairs, shard_size=1024, image_size=256)
    base = {"model": {"name": "ViT-B-32"}, "embed": {"input": f"{root}/corpus", "batch_size": batch_size}}
    clip = load_clip(config_from_dict({"workdir": root, **base}).model, device="cuda")
    images, tokens = bare_inputs(clip, samples)
    bare_forward(clip, images[:batch_size], tokens[:batch_size], batch_size, "cuda")  # CUDA context, kernels
    ours, bare = [], []
    for r in range(repeats):
        start = time.perf_counter()
        assert embed(config_from_dict({"workdir": f"{root}/work-{r}", **base})).total_rows == pairs
        ours.append(time.perf_counter() - start)
        bare.append(bare_forward(clip, images, tokens, batch_size, "cuda"))
        print(f"  embed repeat {r}: reco {pairs / ours[-1]:.0f} pairs/s, bare {pairs / bare[-1]:.0f} ({load()})")
    return median(bare) / median(ours)


def search_ratio(rows: int, queries: int, repeats: int) -> float:
    """Queries/s of the index on the GPU over the same index on the CPU."""
    from indexing.build import build_index
    from reco.config import config_from_dict
    from reco.contracts import MEMORY_DIR, write_memory
    from reco.demo.synthetic import clustered_embeddings
    from reco.search import MemoryIndex

    root = tempfile.mkdtemp(prefix="reco-bench-gpu-search-")
    cfg = config_from_dict({"workdir": root, "index": {"key": "IVF1024,Flat", "index_param": "nprobe=32"}})
    image, text = clustered_embeddings(rows, 512, seed=0, clusters=1000, spread=0.6, text_spread=0.3)
    write_memory(cfg.path(MEMORY_DIR), image, text, shard_rows=50_000)
    build_index(cfg)
    q = clustered_embeddings(queries, 512, seed=1, clusters=1000, spread=0.6)[0]
    seconds = {}
    for device, use_gpu in (("cpu", False), ("gpu", True)):
        memory = MemoryIndex.open(root, use_gpu=use_gpu)
        memory.search(q[:256], 10, "image")  # warm-up (GPU copies, kernels)
        seconds[device] = []
        for _ in range(repeats):
            start = time.perf_counter()
            memory.search(q, 10, "image")
            seconds[device].append(time.perf_counter() - start)
        print(f"  search on {device}: {queries / median(seconds[device]):.0f} queries/s ({load()})")
    return median(seconds["cpu"]) / median(seconds["gpu"])


def train_ratio(rows: int, repeats: int) -> float:
    """`reco train` steady-state steps/s over a bare loop's, both on the GPU."""
    from train import bare_loop, ours

    from reco import storage
    from reco.cluster import init_ray
    from reco.config import config_from_dict
    from reco.demo.neighbour_splits import synthetic_split, write_split

    root = tempfile.mkdtemp(prefix="reco-bench-gpu-train-")
    write_split(root, synthetic_split(rows, 512, 10), shards=8)
    cfg = config_from_dict({"workdir": root, "train": {"use_gpu": True, "batch_size": 1024, "epochs": 2,
                                                        "checkpoint_every": 10**6, "log_every": 1}})
    init_ray()
    bare, reco = [], []
    for r in range(repeats):
        bare.append(bare_loop(cfg, storage.join(root, "neighbors", "train"), "cuda")[1])
        reco.append(ours(cfg)[1])
        print(f"  train repeat {r}: reco {1 / reco[-1]:.1f} steps/s, bare {1 / bare[-1]:.1f} ({load()})")
    return median(bare) / median(reco)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows", type=int, default=200_000, help="memory rows for the search")
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--train-rows", type=int, default=65_536)
    args = p.parse_args()
    require_gpu()
    print(f"{torch.cuda.get_device_name(0)}, {load()}")
    embed = embed_ratio(args.pairs, args.batch_size, args.repeats)
    search = search_ratio(args.rows, args.queries, args.repeats)
    train = train_ratio(args.train_rows, args.repeats)
    print(f"gpu: embed {embed:.2f} of the bare fp16 forward; faiss-gpu search {search:.1f}x CPU search; "
          f"train {train:.2f} of a bare loop's steps/s")


if __name__ == "__main__":
    main()

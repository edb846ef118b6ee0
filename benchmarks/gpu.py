"""On one NVIDIA GPU: embed, search and train, each against its bare library, as ratios.

    python benchmarks/gpu.py [--parts embed,search,train] [--pairs 4096] [--rows 200000]
                             [--train-rows 65536] [--repeats 3] [--device cuda]

- embed: `reco embed` end to end (ViT-B-32, a seeded random init: no weights are needed
  for speed; fp16 autocast, one replica on the GPU, decoding in one process per CPU it
  reserves: `--replica-cpus 8,16` compares replicas of 8 and 16 CPUs) against the bare open_clip forward
  on the same pairs already decoded and preprocessed, the same fp16 autocast and batch
  (benchmarks/embed.py's bare forward);
- search: the same built index searched by `MemoryIndex` on the GPU (faiss-gpu) against
  on the CPU (faiss), same queries, k and nprobe: a speed-up, not an overhead;
- train: `reco train` on the GPU (bf16 autocast), in local mode (`train.num_workers: 0`)
  and with one Ray Train worker, steps/s against a bare PyTorch loop on the GPU
  (benchmarks/train.py's loop), steady state and end to end.

It stops with a message when torch sees no CUDA device. `--device cpu` runs every part on
the CPU instead, small sizes in hand, to check the script where no GPU is (its ratios then
say nothing of a GPU). The search part needs faiss
with GPU support; where faiss has none, it is reported as not run, and the rest runs.
The last line holds the ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import load, median, parser

import torch  # noqa: E402


PARTS = ("embed", "search", "train")


def require_gpu() -> None:
    """Stop with a clear message where this benchmark cannot run."""
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False "
                 "here. Run it on a GPU machine (see docs/gpu.md); the CPU benchmarks are "
                 "benchmarks/embed.py, index.py and train.py.")


def embed_ratio(pairs: int, batch_size: int, repeats: int, device: str, replica_cpus: list[int | None]) -> str:
    """`reco embed` end to end over the bare fp16 forward, pairs/s over pairs/s, for each
    of `replica_cpus` (CPUs, so decoding processes, of the replica; None: the default)."""
    from embed import bare_forward, bare_inputs, replica_seconds, write_corpus

    from pipeline.embed import embed
    from reco.config import config_from_dict
    from reco.encode import replica_resources
    from reco.models import load_clip

    root = tempfile.mkdtemp(prefix="reco-bench-gpu-embed-")
    samples = write_corpus(root, pairs, shard_size=1024, image_size=256)
    cfgs = {cpus: config_from_dict({"workdir": root, "model": {"name": "ViT-B-32"},
                                    "embed": {"input": f"{root}/corpus", "batch_size": batch_size,
                                              "cpus_per_actor": cpus}})
            for cpus in replica_cpus}
    clip = load_clip(cfgs[replica_cpus[0]].model, device=device)
    images, tokens = bare_inputs(clip, samples)
    bare_forward(clip, images[:batch_size], tokens[:batch_size], batch_size, device)  # CUDA context, kernels
    runs = {cpus: {"ours": [], "start": [], "shards": [], "forward": []} for cpus in replica_cpus}
    bare, cut = [], []
    for r in range(repeats):
        for cpus, cfg in cfgs.items():
            start = time.perf_counter()
            manifest = embed(cfg.model_copy(update={"workdir": f"{root}/work-{cpus}-{r}"}))
            seconds = time.perf_counter() - start
            assert manifest.total_rows == pairs
            resources = replica_resources(cfg, len(manifest.inputs))
            # The replicas' time waiting for their decoding processes to start, in the shards
            # (read, decode, forward) and in the forward alone: where the end-to-end time goes.
            run = runs[cpus]
            run["ours"].append(seconds)
            run["start"].append(replica_seconds(manifest, resources.actors, "decoder_start"))
            run["forward"].append(replica_seconds(manifest, resources.actors, "forward"))
            run["shards"].append(replica_seconds(manifest, resources.actors, "read_decode_wait", "forward"))
            print(f"  embed repeat {r}, replica of {resources.cpus:g} CPUs: reco {pairs / seconds:.0f} pairs/s end "
                  f"to end, {pairs / run['shards'][-1]:.0f} within shards, {pairs / run['forward'][-1]:.0f} in its "
                  f"forward; {run['start'][-1]:.1f} s waiting for its decoding processes' start ({load()})", flush=True)
        bare.append(bare_forward(clip, images, tokens, batch_size, device))
        cut.append(bare_forward(clip, images, tokens, batch_size, device, cut_padding=True))
        print(f"  embed repeat {r}: bare forward {pairs / bare[-1]:.0f} pairs/s, {pairs / cut[-1]:.0f} with the "
              f"text padding cut as reco's ({load()})", flush=True)
    results = []
    for cpus, run in runs.items():
        ours, shards, forward = (median(run[k]) for k in ("ours", "shards", "forward"))
        name = f"{cpus} CPUs" if cpus else "default CPUs"
        print(f"  embed medians, replica of {name}: reco {pairs / ours:.0f} pairs/s end to end, "
              f"{pairs / shards:.0f} within shards, {pairs / forward:.0f} in its forward; "
              f"{median(run['start']):.1f} s waiting for its decoding processes' start")
        results.append("embed ({}) {:.2f} of the bare fp16 forward end to end, {:.2f} within shards, {:.2f} in "
                       "the forward ({:.2f}, {:.2f}, {:.2f} of it with the padding cut)".format(
                           name, *(median(b) / t for b in (bare, cut) for t in (ours, shards, forward))))
    print(f"  embed medians: bare forward {pairs / median(bare):.0f} pairs/s, {pairs / median(cut):.0f} with the "
          "padding cut")
    return "; ".join(results)


def search_ratio(rows: int, queries: int, repeats: int, device: str) -> str:
    """Queries/s of the index on the GPU over the same index on the CPU."""
    from reco.search import gpu_available

    if device == "cuda" and not gpu_available():
        print("  search: not run: this faiss has no GPU support (install the gpu extra, docs/gpu.md)")
        return "search not run (faiss without GPU support)"
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
    # With --device cpu both sides search on the CPU: a check of the script, not a figure.
    for side, use_gpu in (("cpu", False), ("gpu" if device == "cuda" else "cpu again", device == "cuda")):
        memory = MemoryIndex.open(root, use_gpu=use_gpu)
        memory.search(q[:256], 10, "image")  # warm-up (GPU copies, kernels)
        seconds[side] = []
        for _ in range(repeats):
            start = time.perf_counter()
            memory.search(q, 10, "image")
            seconds[side].append(time.perf_counter() - start)
        print(f"  search on {side}: {queries / median(seconds[side]):.0f} queries/s ({load()})", flush=True)
    first, second = (median(v) for v in seconds.values())
    return f"faiss-gpu search {first / second:.1f}x CPU search"


def train_ratio(rows: int, repeats: int, device: str) -> str:
    """`reco train` steps/s over a bare loop's, all on the GPU: local mode and one Ray
    Train worker, steady state and end to end."""
    from train import bare_loop, ours

    from reco import storage
    from reco.cluster import init_ray
    from reco.config import config_from_dict
    from reco.demo.neighbour_splits import synthetic_split, write_split

    root = tempfile.mkdtemp(prefix="reco-bench-gpu-train-")
    write_split(root, synthetic_split(rows, 512, 10), shards=8)
    train = {"use_gpu": device == "cuda", "batch_size": 1024, "epochs": 2, "checkpoint_every": 10**6,
             "log_every": 1}
    sides = {"local": config_from_dict({"workdir": root, "train": {**train, "num_workers": 0}}),
             "ray": config_from_dict({"workdir": root, "train": train})}
    init_ray()
    results = {"bare": [], "local": [], "ray": []}
    for r in range(repeats):
        results["bare"].append(bare_loop(sides["ray"], storage.join(root, "neighbors", "train"), device))
        for name, cfg in sides.items():
            results[name].append(ours(cfg))
        print(f"  train repeat {r}: " + ", ".join(
            f"{name} {1 / runs[-1][1]:.1f} steps/s ({runs[-1][0]:.1f} s)" for name, runs in results.items())
            + f" ({load()})", flush=True)
    med = {name: [median(run[i] for run in runs) for i in (0, 1)] for name, runs in results.items()}
    return (f"train steady state {med['bare'][1] / med['local'][1]:.2f} (local mode), "
            f"{med['bare'][1] / med['ray'][1]:.2f} (1 Ray Train worker) of a bare loop's steps/s; "
            f"end to end {med['bare'][0] / med['local'][0]:.2f}, {med['bare'][0] / med['ray'][0]:.2f}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--parts", default=",".join(PARTS), help="which of embed,search,train to run")
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--replica-cpus", default="default",
                   help="embed: comma-separated CPUs per replica (each one decoding process) to compare; "
                        "'default' for embed.cpus_per_actor's default")
    p.add_argument("--rows", type=int, default=200_000, help="memory rows for the search")
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--train-rows", type=int, default=65_536)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: check the script on a machine without a GPU")
    args = p.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        sys.exit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.device == "cuda":
        require_gpu()
    print(f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU (a check of the script)'}, {load()}")
    results = []
    if "embed" in parts:
        replica_cpus = [None if c == "default" else int(c) for c in args.replica_cpus.split(",")]
        results.append(embed_ratio(args.pairs, args.batch_size, args.repeats, args.device, replica_cpus))
    if "search" in parts:
        results.append(search_ratio(args.rows, args.queries, args.repeats, args.device))
    if "train" in parts:
        results.append(train_ratio(args.train_rows, args.repeats, args.device))
    print("gpu: " + "; ".join(results))


if __name__ == "__main__":
    main()

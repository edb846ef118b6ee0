"""The memory service (one Ray actor per index shard) against bare faiss and against itself at 1, 2, 4 shards.

    python benchmarks/memory_service.py [--rows 100000] [--d 64] [--key IVF256,Flat] [--queries 2000]
                                        [--repeats 3] [--no-neighbors]

Writes one memory of clustered, embedding-like pairs (8 memory shards) and indexes it
as 1, 2 and 4 index shards with `reco index`. Then, for each shard count, the service
(`MemoryIndex.open(distributed=True)`) on this machine:
- resident memory: the RSS (psutil) of each shard actor after every memory row was
  fetched once in both modalities and every query searched, next to an idle actor that
  imported the same modules (what a shard actor holds = RSS - idle);
- search rate: with one shard, `service.search` timed in the driver (end to end) vs
  `index.search` of bare faiss on the same index file with the same nprobe and threads,
  same query batch, timed inside a Ray actor on the same node (medians). Ray runs its
  workers at nice 15: on a busy machine bare faiss in the driver would be favoured by
  the scheduler, not by the code;
- neighbours: `reco neighbors` end to end through the service (`index.service=always`),
  every memory pair a query, queries/s.
The last line gives the ratios: held memory per actor at 2 and 4 shards over 1 shard
(ideal 1/2 and 1/4), service over bare faiss search (goal >= 0.90), neighbours rate at
2 and 4 shard actors over 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from autofaiss.indices.index_utils import set_search_hyperparameters  # noqa: E402

from benchmarks.index import clustered  # noqa: E402
from indexing.build import build_index  # noqa: E402
from indexing.neighbors import neighbors  # noqa: E402
from reco.cluster import init_ray  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.contracts import index_folder, write_memory  # noqa: E402
from reco.search import MemoryIndex  # noqa: E402

SHARDS = (1, 2, 4)
MB = 2 ** 20


@ray.remote(num_cpus=0)
class IdleActor:
    """A process like a shard actor's before it loads anything: Ray worker + faiss + reco.search."""

    def pid(self) -> int:
        import reco.search  # noqa: F401

        return os.getpid()


@ray.remote(num_cpus=0)
class BareFaiss:
    """Bare faiss on one index file, in a Ray worker like a shard actor's."""

    def __init__(self, workdir: str, threads: int):
        self.index = bare_index(workdir)
        faiss.omp_set_num_threads(threads)

    def seconds(self, queries: np.ndarray, k: int) -> float:
        start = time.perf_counter()
        self.index.search(queries, k)
        return time.perf_counter() - start


def actor_pids(service: MemoryIndex) -> list[int]:
    return ray.get([s.__ray_call__.remote(lambda self: os.getpid()) for s in service._servers])


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def touch_everything(service: MemoryIndex, queries: np.ndarray, k: int) -> None:
    """Every row fetched once and every query searched: what a long neighbours run pages in."""
    for start in range(0, service.ntotal, 20_000):
        ids = np.arange(start, min(start + 20_000, service.ntotal))
        service.fetch(ids, "image"), service.fetch(ids, "text")
    service.search(queries, k, "image"), service.search(queries, k, "text")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bare_index(workdir: str) -> faiss.Index:
    """The one image index shard, loaded as the service loads it (memory-mapped, same nprobe)."""
    manifest = MemoryIndex.open(workdir).manifests["image"]
    index = faiss.read_index(str(Path(index_folder(workdir, "image")) / manifest.shards[0].path), faiss.IO_FLAG_MMAP)
    if manifest.index_param:
        set_search_hyperparameters(index, manifest.index_param, False)
    return index


def search_rates(workdir: str, service: MemoryIndex, queries: np.ndarray, k: int, repeats: int) -> dict:
    """Queries/s of the service and of bare faiss on the same shard, interleaved repeats."""
    threads = ray.get(service._servers[0].__ray_call__.remote(lambda self: faiss.omp_get_max_threads()))
    bare = BareFaiss.remote(workdir, threads)
    seconds = {"service": [], "bare": []}
    for _ in range(repeats):
        seconds["service"].append(median_seconds(lambda: service.search(queries, k, "image"), 1))
        seconds["bare"].append(ray.get(bare.seconds.remote(queries, k)))
    ray.kill(bare)
    return {name: len(queries) / statistics.median(s) for name, s in seconds.items()}


def neighbours_rate(workdir: Path, rows: int, k: int) -> float:
    cfg = config_from_dict({"workdir": str(workdir), "index": {"service": "always"}, "neighbors": {"k": k}})
    shutil.rmtree(workdir / "neighbors", ignore_errors=True)
    t = time.perf_counter()
    neighbors(cfg)
    return rows / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--key", default="IVF256,Flat")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-neighbors", action="store_true", help="skip the neighbours runs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reco-bench-service-"))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    """Build the three indices, measure each service, print the figures and the ratio line."""
    pairs = clustered(args.rows, args.d, seed=1)
    queries = clustered(args.queries, args.d, seed=2)[0]
    init_ray()
    idle = IdleActor.remote()
    idle_mb = rss_mb(ray.get(idle.pid.remote()))
    held, rates, hood = {}, {}, {}
    for shards in SHARDS:
        work = root / f"shards{shards}"
        write_memory(str(work / "memory"), *pairs, shard_rows=-(-args.rows // 8), model="bench")
        build_index(config_from_dict({"workdir": str(work), "index": {"key": args.key, "shards": shards}}))
        service = MemoryIndex.open(str(work), distributed=True, local_dir=str(root / "local"))
        touch_everything(service, queries, args.k)
        rss = [rss_mb(pid) for pid in actor_pids(service)]
        held[shards] = statistics.mean(rss) - idle_mb
        print(f"{shards} shard(s): RSS per actor {', '.join(f'{r:.0f}' for r in rss)} MB "
              f"(idle actor {idle_mb:.0f} MB; held {held[shards]:.0f} MB each)")
        if shards == 1:
            rates = search_rates(str(work), service, queries, args.k, args.repeats)
            print(f"  search: service {rates['service']:.0f} queries/s, bare faiss {rates['bare']:.0f} "
                  f"queries/s ({args.key}, batch {args.queries}, k={args.k})")
        service.close()
        if not args.no_neighbors:
            hood[shards] = neighbours_rate(work, args.rows, args.k)
            print(f"  neighbours through {shards} shard actor(s): {hood[shards]:.0f} queries/s")
    ray.kill(idle)
    print(f"{args.rows} pairs, d={args.d}, {args.key}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    line = (f"memory_service: held memory per actor {held[2] / held[1]:.2f}x (2 shards), "
            f"{held[4] / held[1]:.2f}x (4 shards) of 1 shard; search {rates['service'] / rates['bare']:.2f}x "
            "of bare faiss")
    if hood:
        line += f"; neighbours {hood[2] / hood[1]:.2f}x (2 actors), {hood[4] / hood[1]:.2f}x (4 actors) of 1"
    print(line)


if __name__ == "__main__":
    main()

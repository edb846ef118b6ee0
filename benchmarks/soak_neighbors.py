"""Sustained load on the memory service: neighbour search over a 100k+ memory for minutes, resident memory sampled.

    python benchmarks/soak_neighbors.py [--rows 100000] [--d 64] [--key IVF256,Flat] [--shards 2]
                                        [--minutes 3] [--batch 1000] [--k 10] [--bound-mb 50]

Writes a memory of clustered, embedding-like pairs (8 memory shards), indexes it with
`reco index` as `--shards` index shards, and opens the memory service
(`MemoryIndex.open(distributed=True)`: one Ray actor per index shard, the processes that
search during `reco neighbors`) on a local Ray bound to 127.0.0.1. Then, for `--minutes`,
it does what `reco neighbors` asks of the service, batch after batch: a random batch of
memory pairs searched with k + 1 in both modalities, and the other modality's embeddings
of the hits fetched. Every 5 s it samples the resident memory (psutil RSS) of each shard
actor and of this driver. The first 20% of the run is the warm-up; growth is the last
sample minus the largest warm-up sample, summed over the processes.

An error (an exception from a call, a wrong shape, an id out of range) is counted and the
loop goes on. The last line: queries searched, the RSS growth against the bound, errors;
the exit status is 1 when the growth exceeds the bound or any error occurred.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from benchmarks.index import clustered  # noqa: E402
from indexing.build import build_index  # noqa: E402
from reco.cluster import init_ray  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.contracts import OTHER, write_memory  # noqa: E402
from reco.search import MemoryIndex  # noqa: E402

SAMPLE_EVERY = 5.0


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            out[name] = float("nan")  # a restarted actor: counted as an error by the caller
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--key", default="IVF256,Flat")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--bound-mb", type=float, default=50.0, help="largest acceptable RSS growth, all processes")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="reco-soak-neighbors-"))
    image, text = clustered(args.rows, args.d, seed=1)
    write_memory(str(root / "memory"), image, text, shard_rows=-(-args.rows // 8), model="bench")
    queries = {"image": image.astype(np.float32), "text": text.astype(np.float32)}
    cfg = config_from_dict({"workdir": str(root), "index": {"key": args.key, "shards": args.shards,
                                                            "index_param": "nprobe=8"}})
    init_ray()
    import ray

    t = time.perf_counter()
    build_index(cfg)
    print(f"{args.rows} pairs, d={args.d}, index {args.key} in {args.shards} shards, built in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    service = MemoryIndex.open(str(root), distributed=True, local_dir=str(root / "local"))
    pids = {f"shard{j}": ray.get(s.__ray_call__.remote(lambda self: os.getpid()))
            for j, s in enumerate(service._servers)}
    pids["driver"] = os.getpid()

    rng = np.random.default_rng(0)
    errors, searched, batches = 0, 0, 0
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()
    end = start + 60 * args.minutes
    next_sample = start
    try:
        while time.monotonic() < end:
            rows = rng.integers(0, args.rows, args.batch)
            for modality in ("image", "text"):
                try:
                    scores, ids = service.search(queries[modality][rows], args.k + 1, modality)
                    fetched = service.fetch(ids, OTHER[modality])
                    if (ids.shape != (args.batch, args.k + 1) or ids.max() >= args.rows
                            or fetched.shape != (args.batch, args.k + 1, args.d)
                            or not np.isfinite(scores).all()):
                        errors += 1
                except Exception as err:  # noqa: BLE001 (a soak counts errors and goes on)
                    errors += 1
                    print(f"error: {type(err).__name__}: {err}", flush=True)
                searched += args.batch
            batches += 1
            now = time.monotonic()
            if now >= next_sample:
                sample = rss_mb(pids)
                errors += sum(np.isnan(v) for v in sample.values())
                samples.append((now - start, sample))
                print(f"  {now - start:6.0f} s  {searched} queries  rss MB "
                      + " ".join(f"{n} {v:.0f}" for n, v in sample.items()) + f"  errors {errors}", flush=True)
                next_sample = now + SAMPLE_EVERY
        samples.append((time.monotonic() - start, rss_mb(pids)))
    finally:
        service.close()
        shutil.rmtree(root, ignore_errors=True)

    warm_until = 0.2 * 60 * args.minutes
    warm = [s for t, s in samples if t <= warm_until] or [samples[0][1]]
    last = samples[-1][1]
    growth = {n: last[n] - max(s[n] for s in warm) for n in pids}
    total = sum(growth.values())
    seconds = samples[-1][0]
    print("growth after warm-up, MB: " + " ".join(f"{n} {g:+.1f}" for n, g in growth.items()))
    ok = total <= args.bound_mb and errors == 0
    print(f"soak_neighbors: {searched} queries ({searched / seconds:.0f}/s) over {seconds:.0f} s on "
          f"{args.rows} pairs; rss growth {total:+.1f} MB (bound {args.bound_mb:.0f} MB); "
          f"errors {errors}; {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

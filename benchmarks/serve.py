"""`reco serve` over HTTP against the in-process API (`reco.load`) on the same requests.

    python benchmarks/serve.py [--config CONFIG] [--endpoint image|text] [--items 4]
                               [--requests 64] [--concurrency 1 8 32] [--replicas 1]
                               [--cpus-per-replica 0.5]

The workdir is CONFIG's (a trained one), or by default a small synthetic one built as the
tests build theirs (reco-tiny, 42 memory pairs). For each concurrency c, the same
`--requests` requests of `--items` images (base64 JPEGs) or texts are sent by c threads:
- serve: HTTP POSTs to the Ray Serve application on 127.0.0.1 (JSON in and out);
- api: calls of `encode_image` / `encode_text` on one in-process `Reco`, from c threads.
Per side: p50/p99 request latency and throughput. The last line holds the ratios.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

import reco  # noqa: E402
from reco.config import RecoConfig, load_config  # noqa: E402
from reco.demo import synthetic  # noqa: E402
from reco.serve import start  # noqa: E402


def small_world() -> RecoConfig:
    """The tests' workdir, with a seeded random reco-tiny checkpoint."""
    import open_clip
    import torch

    from reco.models import register_model_configs
    from tests.conftest import build_api_world

    base = Path(tempfile.mkdtemp(prefix="reco-bench-serve-"))
    register_model_configs()
    torch.manual_seed(1234)
    torch.save(open_clip.create_model("reco-tiny").state_dict(), base / "reco-tiny.pt")
    return build_api_world(base, str(base / "reco-tiny.pt"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(call: Callable[[int], None], requests: int, concurrency: int) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (requests/s) of `requests` calls from c threads."""
    def timed(i: int) -> float:
        t = time.perf_counter()
        call(i)
        return time.perf_counter() - t

    start_time = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(timed, range(requests))))
    wall = time.perf_counter() - start_time
    return {"p50": 1000 * float(np.percentile(latencies, 50)), "p99": 1000 * float(np.percentile(latencies, 99)),
            "rps": requests / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a trained workdir's config (default: a small synthetic one)")
    parser.add_argument("--endpoint", choices=["image", "text"], default="image")
    parser.add_argument("--items", type=int, default=4, help="images or texts per request")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=0.5,
                        help="CPUs each replica reserves (fractional: 2 replicas and the memory service's "
                             "shard actor fit on 2 cores)")
    args = parser.parse_args()
    cfg = load_config(args.config) if args.config else small_world()
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
        "host": "127.0.0.1", "port": free_port(), "replicas": args.replicas, "max_items": args.items,
        "cpus_per_replica": args.cpus_per_replica})})

    samples = list(synthetic.make_samples(args.items * 8, seed=21))
    images = [[s.jpeg for s in samples[i::8]] for i in range(8)]
    texts = [[s.caption for s in samples[i::8]] for i in range(8)]
    if args.endpoint == "image":
        bodies = [json.dumps({"images": [base64.b64encode(b).decode() for b in group]}).encode() for group in images]
    else:
        bodies = [json.dumps({"texts": group}).encode() for group in texts]

    serving = start(cfg)
    url = f"{serving.url}/embed/{args.endpoint}"
    model = reco.load(cfg.workdir)

    def via_serve(i: int) -> None:
        request = urllib.request.Request(url, data=bodies[i % 8], headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            assert response.status == 200 and len(json.loads(response.read())["embeddings"]) == args.items

    def via_api(i: int) -> None:
        # As the server does: decode the JSON and the base64, encode, and produce the lists.
        body = json.loads(bodies[i % 8])
        if args.endpoint == "image":
            out = model.encode_image([base64.b64decode(item) for item in body["images"]])
        else:
            out = model.encode_text(body["texts"])
        json.dumps({"embeddings": out.tolist()})

    results = {}
    for name, call in (("api", via_api), ("serve", via_serve)):
        run(call, 8, 2)  # warm-up: first forward passes, connections
        for c in args.concurrency:
            results[name, c] = run(call, args.requests, c)
    serving.stop()
    model.close()

    print(f"/embed/{args.endpoint}, {args.items} items per request, {args.requests} requests per level, "
          f"{args.replicas} replica(s) x {args.cpus_per_replica:g} CPU, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for c in args.concurrency:
        for name in ("api", "serve"):
            r = results[name, c]
            print(f"  c={c:<3d} {name:5s} p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  {r['rps']:7.1f} req/s")
    ratios = ", ".join(f"c={c} {results['serve', c]['rps'] / results['api', c]['rps']:.2f}x throughput "
                       f"{results['serve', c]['p50'] / results['api', c]['p50']:.2f}x p50" for c in args.concurrency)
    print(f"serve vs in-process API: {ratios}")


if __name__ == "__main__":
    main()

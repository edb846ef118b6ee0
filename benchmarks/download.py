"""`reco download` images/s against bare img2dataset (multiprocessing distributor).

Both download the same URL list from the same corpus server (a separate process on
127.0.0.1) with the same options: processes, threads per process, shard size, image size.
Each repeat starts cold on both sides: bare img2dataset spawns its process pool, and
`reco download` runs on a freshly started local Ray cluster whose workers have not yet
imported img2dataset. Starting the cluster is not timed (a stage joins a running cluster).

    python benchmarks/download.py [--samples 12000] [--shard 1000] [--repeats 3]

Besides the end-to-end rate (what a user waits for), it prints the rate within the
shards (images over the span from the first shard's start to the last one's end, from
the `_stats.json` files): the same img2dataset downloader runs in both, so that ratio
shows what the distribution costs apart from process start-up. The last line prints the
end-to-end ratio of the medians (goal: >= 0.95).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import img2dataset  # noqa: E402
import ray  # noqa: E402

from pipeline.download import download  # noqa: E402
from reco.config import config_from_dict  # noqa: E402


def serve(samples: int, url_list: Path) -> tuple[subprocess.Popen, str]:
    """The corpus server in its own process, so it does not share a GIL with either downloader."""
    proc = subprocess.Popen([sys.executable, "-m", "reco.demo.corpus_server", "--samples", str(samples),
                             "--url-list", str(url_list)], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def shard_stats(folder: Path) -> tuple[int, float]:
    """(images downloaded, seconds from the first shard's start to the last one's end)."""
    stats = [json.loads(p.read_text()) for p in folder.glob("*_stats.json")]
    return sum(s["successes"] for s in stats), max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def bare(url_list: Path, out: Path, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        img2dataset.download(
            url_list=str(url_list), output_folder=str(out), processes_count=args.processes,
            thread_count=args.threads, number_sample_per_shard=args.shard, image_size=args.image_size,
            resize_mode="keep_ratio", output_format="webdataset", input_format="parquet", url_col="url",
            caption_col="caption", timeout=10, distributor="multiprocessing", enable_wandb=False)
    return time.perf_counter() - start


@ray.remote(num_cpus=1)
def _ready() -> None:
    """Waits for a worker process: the cluster is up."""


def ours(url_list: Path, workdir: Path, args: argparse.Namespace) -> float:
    cfg = config_from_dict({"workdir": str(workdir), "download": {
        "url_list": str(url_list), "processes_count": args.processes, "thread_count": args.threads,
        "number_sample_per_shard": args.shard, "image_size": args.image_size, "timeout": 10}})
    ray.init(address="local", num_cpus=args.processes, include_dashboard=False, log_to_driver=False)
    try:
        ray.get([_ready.remote() for _ in range(args.processes)])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            download(cfg)
        return time.perf_counter() - start
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--shard", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reco-bench-download-") as tmp:
        root = Path(tmp)
        server, url = serve(args.samples, root / "urls.parquet")
        print(f"corpus server {url}: {args.samples} images; {args.processes} processes x "
              f"{args.threads} threads, shards of {args.shard}, image_size {args.image_size}")
        try:
            rates: dict[str, list[float]] = {"bare": [], "reco": []}
            in_shards: dict[str, list[float]] = {"bare": [], "reco": []}
            for r in range(args.repeats):
                # alternate who goes first, so neither always meets a warmer machine
                for side in (("bare", "reco") if r % 2 == 0 else ("reco", "bare")):
                    if side == "bare":
                        out = root / f"bare{r}"
                        seconds = bare(root / "urls.parquet", out, args)
                    else:
                        out = root / f"reco{r}" / "corpus"
                        seconds = ours(root / "urls.parquet", out.parent, args)
                    n, span = shard_stats(out)
                    rates[side].append(n / seconds)
                    in_shards[side].append(n / span)
                    print(f"repeat {r} {side}: {n} images in {seconds:.2f} s = {n / seconds:.0f} images/s "
                          f"({n / span:.0f} images/s from the first shard's start to the last one's end)")
        finally:
            server.terminate()
            server.wait()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    shard_medians = {k: statistics.median(v) for k, v in in_shards.items()}
    print(f"median images/s within the shards: reco download {shard_medians['reco']:.0f}, "
          f"bare img2dataset {shard_medians['bare']:.0f} ({shard_medians['reco'] / shard_medians['bare']:.2f}x)")
    print(f"median images/s end to end: reco download {medians['reco']:.0f}, bare img2dataset {medians['bare']:.0f}")
    print(f"download: {medians['reco'] / medians['bare']:.2f}x of bare img2dataset (multiprocessing)")


if __name__ == "__main__":
    main()

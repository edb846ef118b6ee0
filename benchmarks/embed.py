"""`reco embed` end to end against bare open_clip forward on the same pairs.

Ours: tar shards -> read, decode, preprocess, tokenize, encode, write Parquet (+ ids,
manifest), on a local Ray cluster. Bare: `encode_image` + `encode_text` on the same
images already decoded and preprocessed, the same captions already tokenized, the same
model and batch size, in one process using every core, as a user runs it; `reco embed`
runs its default, one single-threaded replica per CPU. Repeats alternate; the ratio of
medians is printed last, with the machine's load (timings on a shared machine are noisy).

`reco embed` encodes a batch's captions only up to the longest one's end token
(reco.models.encode_text; open_clip's `encode_text` runs all 77 positions). The bare
forward is also timed with that cut, so the last line says both how reco compares with
the library as users call it and how much of the same work it loses to its own overhead.

    python benchmarks/embed.py [--pairs 1536] [--model ViT-B-32] [--batch-size 64] [--repeats 3]
                               [--bare-keeps-freed-memory]

`reco embed`'s replicas keep freed memory (reco/malloc.py: glibc's mmap off, its trim
threshold raised); the bare forward runs as the library does by default, unless
--bare-keeps-freed-memory gives it the same setting (then the ratio shows what is left
beside the allocator).
"""

from __future__ import annotations

import io
import tempfile
import time

from common import load, median, parser

import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.embed import embed  # noqa: E402
from reco.cluster import init_ray  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.demo import synthetic  # noqa: E402
from reco.encode import replica_resources  # noqa: E402
from reco.malloc import keep_freed_memory  # noqa: E402
from reco.models import encode_text, load_clip  # noqa: E402


def bare_forward(clip, images: torch.Tensor, tokens: torch.Tensor, batch_size: int, device: str = "cpu",
                 cut_padding: bool = False) -> float:
    """Seconds for encode_image + encode_text over all pairs, batch by batch (fp16 autocast
    on GPU, as `reco embed` runs there); with `cut_padding`, the text as reco encodes it."""
    def text(tokens: torch.Tensor) -> torch.Tensor:
        return encode_text(clip.model, tokens) if cut_padding else clip.model.encode_text(tokens, normalize=True)

    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device == "cuda"):
        for i in range(0, len(images), batch_size):
            clip.model.encode_image(images[i:i + batch_size].to(device), normalize=True).float().cpu()
            text(tokens[i:i + batch_size].to(device)).float().cpu()
    return time.perf_counter() - start


def replica_seconds(manifest, replicas: int, *phases: str) -> float:
    """Seconds the replicas spent in `phases` of their shards (`read_decode_wait`,
    `forward`), side by side, each on its share."""
    return sum(i.seconds[phase] for i in manifest.inputs for phase in phases) / replicas


def write_corpus(root: str, pairs: int, shard_size: int, image_size: int) -> list[synthetic.Sample]:
    """The drawn pairs, also written as webdataset shards under `root/corpus`."""
    samples = list(synthetic.make_samples(pairs, seed=0, image_size=image_size))
    synthetic.write_webdataset(samples, f"{root}/corpus", shard_size)
    return samples


def bare_inputs(clip, samples: list[synthetic.Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image decoded and preprocessed, every caption tokenized: the bare forward's input."""
    images = torch.stack([clip.preprocess(Image.open(io.BytesIO(s.jpeg)).convert("RGB")) for s in samples])
    return images, clip.tokenizer([s.caption for s in samples])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pairs", type=int, default=1536)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=256, help="stored size (img2dataset default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bare-keeps-freed-memory", action="store_true",
                   help="the bare forward with reco's malloc setting too")
    args = p.parse_args()
    if args.bare_keeps_freed_memory:
        keep_freed_memory()

    root = tempfile.mkdtemp(prefix="reco-bench-embed-")
    samples = write_corpus(root, args.pairs, args.shard_size, args.image_size)
    base = {"model": {"name": args.model}, "embed": {"input": f"{root}/corpus", "batch_size": args.batch_size}}

    init_ray()
    cpus = int(ray.cluster_resources()["CPU"])
    torch.set_num_threads(cpus)  # the bare forward as a user runs it: one process, every core
    clip = load_clip(config_from_dict({"workdir": root, **base}).model)
    images, tokens = bare_inputs(clip, samples)
    bare_forward(clip, images[:args.batch_size], tokens[:args.batch_size], args.batch_size)  # warm-up

    replicas = replica_resources(config_from_dict({"workdir": root, **base}), len(samples) // args.shard_size).actors
    ours_rates, steady_rates, bare_rates, cut_rates = [], [], [], []
    for r in range(args.repeats):
        cfg = config_from_dict({"workdir": f"{root}/work-{r}", **base})
        start = time.perf_counter()
        manifest = embed(cfg)
        ours = time.perf_counter() - start
        assert manifest.total_rows == args.pairs
        bare = bare_forward(clip, images, tokens, args.batch_size)
        # Steady state: the replicas' time on the shards (read, decode, forward), without
        # starting them (a fresh process imports torch and builds the model) or Ray. The
        # replicas run side by side, each on its share of the shards (equal shards here).
        in_shards = replica_seconds(manifest, replicas, "read_decode_wait", "forward")
        ours_rates.append(args.pairs / ours)
        steady_rates.append(args.pairs / in_shards)
        bare_rates.append(args.pairs / bare)
        cut_rates.append(args.pairs / bare_forward(clip, images, tokens, args.batch_size, cut_padding=True))
        print(f"repeat {r}: reco embed {ours_rates[-1]:.1f} pairs/s end to end ({steady_rates[-1]:.1f} within "
              f"shards; fixed cost {ours - in_shards:.1f} s), bare forward {bare_rates[-1]:.1f} pairs/s, "
              f"{cut_rates[-1]:.1f} with the padding cut ({load()})", flush=True)
    ours, steady, bare, cut = (median(x) for x in (ours_rates, steady_rates, bare_rates, cut_rates))
    allocator = "reco's malloc setting" if args.bare_keeps_freed_memory else "default malloc"
    print(f"{args.model}, {args.pairs} pairs, batch {args.batch_size}, {cpus} CPUs, {replicas} replicas x "
          f"{cpus / replicas:g} thread(s), bare (one process, {cpus} threads) with {allocator}, "
          "medians: reco embed "
          f"{ours:.1f} pairs/s end to end, {steady:.1f} within shards; bare open_clip forward {bare:.1f}, "
          f"{cut:.1f} with the padding cut")
    print(f"embed within shards: {steady / bare:.2f} of bare open_clip forward, {steady / cut:.2f} of it with the "
          "padding cut")
    print(f"embed: {ours / bare:.2f} of bare open_clip forward ({ours / cut:.2f} of it with the padding cut)")


if __name__ == "__main__":
    main()

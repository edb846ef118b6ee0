"""`reco embed` side by side with `clip-retrieval inference` and a bare open_clip loop, whole commands.

    python benchmarks/embed_vs_clip_retrieval.py [--pairs 1024] [--model ViT-S-32] [--repeats 3]

Each run is a fresh process, timed from launch to exit, so start-up counts as a user
sees it: `python -m reco.cli embed` (Ray, the replica, the manifest), clip-retrieval's
`inference` through ../shared/peers/clip-retrieval-embed (its own venv: create it with
../shared/peers/setup), and a bare loop that reads the same tars, decodes, preprocesses,
tokenizes and encodes with open_clip alone. Same pairs (held out: a seed no demo or test
uses), same architecture and checkpoint (a seeded random init saved locally: no weights
can be downloaded here), same batch size. Runs alternate; medians are printed, and the
ratios last: throughput of reco against the bare loop (goal >= 0.85) and against
clip-retrieval (goal >= 1.25x).

`reco embed` encodes captions only up to a batch's longest end token (reco.models.
encode_text), where open_clip's `encode_text`, and so the bare loop and clip-retrieval, run
all 77 positions. A fourth run, the bare loop with that cut, shows what reco's own
overhead costs on the same work; its ratio is printed last too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from common import ROOT, interleaved, load, median, parser

PEER = os.environ.get("RECO_PEERS_DIR", str(ROOT.parent / "shared" / "peers"))
HELD_OUT_SEED = 20240507


def save_checkpoint(model: str, path: str) -> None:
    """A seeded random init of `model` saved as an open_clip state dict."""
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.save(open_clip.create_model(model).state_dict(), path)


def bare_loop(shards: list[str], model: str, checkpoint: str, batch_size: int, cut_padding: bool) -> int:
    """Read, decode, preprocess, tokenize and encode every pair with open_clip alone (its
    text with reco's cut of the padding if `cut_padding`)."""
    import io
    import tarfile

    import open_clip
    import torch
    from PIL import Image

    if cut_padding:
        from reco.models import encode_text

    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=checkpoint)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    images, captions, pairs = [], [], 0

    def encode() -> None:
        with torch.inference_mode():
            clip.encode_image(torch.stack(images), normalize=True)
            tokens = tokenizer(captions)
            encode_text(clip, tokens) if cut_padding else clip.encode_text(tokens, normalize=True)
        images.clear()
        captions.clear()

    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                stem = name.removesuffix(".jpg")
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                images.append(preprocess(image))
                captions.append(tar.extractfile(members[f"{stem}.txt"]).read().decode())
                pairs += 1
                if len(images) == batch_size:
                    encode()
    if images:
        encode()
    return pairs


def run(cmd: list[str], **env: str) -> None:
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--model", default="ViT-S-32")
    p.add_argument("--batch-size", type=int, default=64)
    # internal: the bare loop, in a fresh process
    p.add_argument("--bare", nargs=2, metavar=("SHARDS_DIR", "CHECKPOINT"), help=argparse.SUPPRESS)
    p.add_argument("--cut-padding", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        shards = sorted(str(s) for s in Path(args.bare[0]).glob("*.tar"))
        assert bare_loop(shards, args.model, args.bare[1], args.batch_size, args.cut_padding) == args.pairs
        return

    from reco.demo import synthetic

    root = Path(tempfile.mkdtemp(prefix="reco-bench-vs-cr-"))
    corpus = root / "corpus"
    shards = synthetic.write_webdataset(synthetic.make_samples(args.pairs, seed=HELD_OUT_SEED, image_size=256),
                                        str(corpus), args.shard_size)
    checkpoint = str(root / f"{args.model}.pt")
    save_checkpoint(args.model, checkpoint)
    brace = f"{corpus}/{{00000..{len(shards) - 1:05d}}}.tar"
    counter = iter(range(10**6))

    def ours() -> None:
        work = root / f"reco-{next(counter)}"
        config = root / "reco.yaml"
        config.write_text(f"workdir: {work}\nmodel: {{name: {args.model}, pretrained: {checkpoint}}}\n"
                          f"embed: {{input: {corpus}, batch_size: {args.batch_size}}}\n")
        run([sys.executable, "-m", "reco.cli", "embed", str(config)], PYTHONPATH=str(ROOT), RAY_ADDRESS="")

    def clip_retrieval() -> None:
        run([f"{PEER}/clip-retrieval-embed", brace, args.model, checkpoint,
             str(root / f"cr-{next(counter)}"), str(args.batch_size)])

    def bare(*flags: str) -> Callable[[], None]:
        return lambda: run([sys.executable, __file__, "--bare", str(corpus), checkpoint, "--model", args.model,
                            "--pairs", str(args.pairs), "--batch-size", str(args.batch_size), *flags],
                           PYTHONPATH=str(ROOT))

    print(f"{args.model}, {args.pairs} pairs in {len(shards)} shards, batch {args.batch_size}, {load()}")
    seconds = interleaved({"reco embed": ours, "clip-retrieval": clip_retrieval, "bare open_clip": bare(),
                           "bare, cut": bare("--cut-padding")}, args.repeats)
    med = {name: median(s) for name, s in seconds.items()}
    for name, s in med.items():
        print(f"{name:15s} {args.pairs / s:6.1f} pairs/s ({s:.1f} s whole command, median of {args.repeats})")
    print(f"after: {load()}")
    print(f"reco embed: {med['bare open_clip'] / med['reco embed']:.2f} of a bare open_clip loop, "
          f"{med['clip-retrieval'] / med['reco embed']:.2f}x clip-retrieval inference (whole commands); "
          f"{med['bare, cut'] / med['reco embed']:.2f} of the bare loop with the same cut of the text padding")


if __name__ == "__main__":
    main()

"""`reco train` (local mode, and 1 Ray Train worker) against a bare PyTorch loop on the same shards.

Both train the same RecoFusion with AdamW, warmup + cosine and the RECO loss, at the
same batch size, over the same synthetic neighbour shards. Bare: the shards read once
with pyarrow into tensors, then a plain loop over shuffled batches in this process.
Ours: the stage end to end, twice: in Ray Train's local mode (`train.num_workers: 0`, the
loop in this process) and with one Ray Train worker (Ray Train's controller and worker
group); the split read into memory or, with `--in-memory-gb 0`, streamed by Ray Data with
a shuffle per epoch; checkpoints, TensorBoard. Reported: end-to-end samples/s (start-up included) and
steady-state samples/s (the median step time: for ours from the step wall times in its
TensorBoard log, for bare from the loop's own clock). Repeats alternate; medians; the
end-to-end ratios last. The demo's size is `--rows 5400 --d 64 --epochs 20`.

    python benchmarks/train.py [--rows 32768] [--d 128] [--k 10] [--batch-size 256] [--epochs 2]
                               [--in-memory-gb 2]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from reco import storage  # noqa: E402
from reco.cluster import init_ray  # noqa: E402
from reco.config import config_from_dict  # noqa: E402
from reco.contracts import embeddings_to_numpy, nested_to_numpy  # noqa: E402
from reco.demo.neighbour_splits import synthetic_split, write_split  # noqa: E402
from reco.fusion import RecoFusion  # noqa: E402
from training.loop import make_optimizer, make_scheduler  # noqa: E402
from training.loss import RecoLoss  # noqa: E402
from training.train import train  # noqa: E402


def bare_loop(cfg, folder: str, device: str = "cpu") -> tuple[float, float]:
    """(end-to-end seconds, median seconds per step); on GPU with autocast in
    `train.precision`, as the Ray Train workers run."""
    start = time.perf_counter()
    tables = [pq.read_table(url) for url in storage.list_files(folder, ".parquet")]
    x = {"v": torch.from_numpy(embeddings_to_numpy(_cat(tables, "image_embedding"))),
         "t": torch.from_numpy(embeddings_to_numpy(_cat(tables, "text_embedding")))}
    x["nn_text"] = torch.from_numpy(nested_to_numpy(_cat(tables, "nn_text")))
    x["nn_image"] = torch.from_numpy(nested_to_numpy(_cat(tables, "nn_image")))
    x = {name: tensor.to(device) for name, tensor in x.items()}
    torch.manual_seed(cfg.seed)
    model = RecoFusion(x["v"].shape[1], cfg.train.heads, cfg.train.mlp_ratio).to(device)
    opt = make_optimizer(model, cfg)
    b, rows = cfg.train.batch_size, len(x["v"])
    per_epoch = rows // b
    total = per_epoch * cfg.train.epochs
    sched = make_scheduler(opt, cfg.train.warmup_steps, total)
    loss_fn, steps = RecoLoss(), []
    cuda, precision = device == "cuda", cfg.train.precision
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cuda", dtype=amp) if cuda and amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and precision == "fp16")
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(epoch))
        for i in range(per_epoch):
            t0 = time.perf_counter()
            idx = order[i * b:(i + 1) * b]
            v, t, nt, ni = (x[n][idx] for n in ("v", "t", "nn_text", "nn_image"))
            with autocast:
                v_ref, t_ref = model(v, nt, t, ni)
                loss = loss_fn(v, t, v_ref, t_ref, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if cuda:
                torch.cuda.synchronize()  # the step's kernels, not just their launch
            steps.append(time.perf_counter() - t0)
    return time.perf_counter() - start, statistics.median(steps)


def _cat(tables, column: str) -> pa.ChunkedArray:
    return pa.chunked_array([c for t in tables for c in t[column].chunks])


def ours(cfg) -> tuple[float, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(cfg.path("train"), ignore_errors=True)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    acc = EventAccumulator(cfg.path("train", "logs", "model"))
    acc.Reload()
    times = [e.wall_time for e in acc.Scalars("train/loss")]
    return seconds, statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--in-memory-gb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="reco-bench-train-")
    write_split(root, synthetic_split(args.rows, args.d, args.k), shards=8)
    cfg = config_from_dict({"workdir": root, "neighbors": {"k": args.k},
                            "train": {"batch_size": args.batch_size, "epochs": args.epochs,
                                      "checkpoint_every": 1000, "log_every": 1000,
                                      "in_memory_gb": args.in_memory_gb}})
    init_ray()
    torch.set_num_threads(int(cfg.train.cpus_per_worker))  # the same threads as the Ray worker
    samples = (args.rows // args.batch_size) * args.batch_size * args.epochs
    sides = {"bare": None, "local": cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": 0})}),
             "ray": cfg}
    results = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, side_cfg in sides.items():
            results[name].append(ours(side_cfg) if side_cfg else
                                 bare_loop(cfg, storage.join(root, "neighbors", "train")))
    med = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
           for name, runs in results.items()}
    print(f"{args.rows} pairs, d={args.d}, k={args.k}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.repeats} repeats (medians)")
    labels = {"bare": "bare loop", "local": "reco train, local mode", "ray": "reco train, 1 Ray Train worker"}
    for name, (total, step) in med.items():
        print(f"  {labels[name]:30s} end to end {samples / total:7.0f} samples/s ({total:.1f} s); "
              f"steady state {args.batch_size / step:7.0f} samples/s ({step * 1000:.1f} ms/step)")
    for label, index in (("steady state", 1), ("end to end", 0)):
        print(f"train {label}: "
              f"{med['bare'][index] / med['local'][index]:.2f}x of a bare PyTorch loop in local mode, "
              f"{med['bare'][index] / med['ray'][index]:.2f}x with 1 Ray Train worker")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Throughput of embed, index, neighbours and train by corpus size and node count, and a projection to 1B pairs.

    python benchmarks/scaling.py [--sizes 2000,8000,32000] [--nodes 1,2,3] [--cpus-per-node 2]
                                 [--stages embed,index,neighbors,train] [--fixed-memory] [--bare]
                                 [--no-warm-up]
                                 [--record FILE] [--write-docs]

For each node count a `ray.cluster_utils.Cluster` of that many Ray nodes is started on
this machine (on one small machine the nodes share its cores, so more nodes add Ray's
scheduling across nodes, not compute: read the node columns as overhead, not speed-up).
Each stage gets one actor, task group or worker per node. Inputs are synthetic: embed
reads drawn image-caption shards and runs `--model` (default reco-tiny, seeded random
init); index, neighbours and train start from clustered embedding-like vectors written
as a memory (no model), each stage reading the previous one's output as in `reco run`.
Throughput is pairs per second of the whole stage call, start-up included; at these sizes
that is mostly start-up, so the table also gives the cost per pair added (each size's
seconds minus the next smaller size's, over the added pairs) and, per stage, the largest
over the smallest of those: how far from linear the stage is. Each new cluster first runs
the stages once on the smallest size, untimed (--no-warm-up times that run too): a fresh
cluster's first run also starts its worker processes, a cost of no particular size.

Neighbours search as many queries as the memory holds pairs, and an ANN search's cost per
query grows with the memory it searches (autofaiss picks more and longer IVF lists for a
larger one). With --fixed-memory the stage is also timed against one memory of the
largest size (built once per cluster, untimed), with queries of each size drawn from the
same distribution (`neighbors.input`): its row, "neighbors, fixed memory", tells the
stage's own linearity in queries, which is how it scales when the training split grows
and the memory does not.

With --bare, on one node, the bare libraries do index's and neighbours' work on the same
inputs, in this process, right after the stage: autofaiss `build_index` with the key the
stage chose, and faiss search + numpy gather on the stage's own index with its search
parameters (benchmarks/index.py and neighbors.py). Their rows tell the library's own
growth in cost per pair from the stage's.

Each row is appended to --record (JSON lines) as soon as it is measured, and a row already
there is not measured again: an interrupted run goes on where it stopped (delete the
file to measure afresh). With --write-docs the table, the 1B-pair projection and a plot go into
docs/performance.md (between the scaling markers) and docs/performance.png. The last
line is each stage's throughput on the most nodes over one node, at the largest size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from common import ROOT, load, median, parser, timed

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from benchmarks.index import build_bare as bare_autofaiss  # noqa: E402
from benchmarks.neighbors import bare as bare_search  # noqa: E402
from indexing.build import build_index  # noqa: E402
from indexing.neighbors import neighbors  # noqa: E402
from pipeline.embed import embed  # noqa: E402
from reco.config import RecoConfig, config_from_dict  # noqa: E402
from reco.contracts import (MEMORY_DIR, IndexManifest, MemoryManifest, index_folder, neighbors_folder,  # noqa: E402
                            write_memory)
from reco.demo import synthetic  # noqa: E402
from training.train import train  # noqa: E402

STAGES = ("embed", "index", "neighbors", "train")
FIXED = "neighbors, fixed memory"
BARE = {"index": "index, bare autofaiss", "neighbors": "neighbors, bare faiss", FIXED: f"{FIXED}, bare faiss"}
ORDER = ("embed", "index", BARE["index"], "neighbors", BARE["neighbors"], FIXED, BARE[FIXED], "train")  # rows
DOC = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "performance.png"
BEGIN, END = "<!-- scaling:begin (benchmarks/scaling.py --write-docs) -->", "<!-- scaling:end -->"

# 1B pairs on 8 nodes x 8 GPUs. Per-GPU rates: measured by benchmarks/gpu.py on one H200
# where we have them, else the libraries' own published figures; each says where from.
TARGET_PAIRS, NODES_AT_SCALE, GPUS_PER_NODE = 10**9, 8, 8
PER_GPU = {
    "embed": (540.0, "measured: benchmarks/gpu.py on one H200 with 16 CPUs, `reco embed` within shards "
              "(ViT-B-32, fp16; start-up left out, as 1B pairs amortise it), far under the bare "
              "forward's 5,714, with the replica decoding in threads; decoding in processes, its forward "
              "step ran 3.5x faster, its steady state not yet measured (docs/performance.md, GPU)"),
    "neighbors": (1e9 / (12 * 3600 * 4) / 2, "Johnson et al. 2017 (faiss GPU paper): a 10-NN graph of 1B "
                  "vectors in < 12 h on 4 Titan X; halved, as a pair searches both modalities"),
    "train": (66_500.0, "measured: benchmarks/gpu.py on one H200, one Ray Train worker at steady state "
              "(d=512, k=10, batch 1024); 64 GPUs in DDP assumed linear, not measured"),
}


def stage_config(work: Path, nodes: int, model: str, queries: Path | None = None) -> RecoConfig:
    """One actor, index shard or worker per node; small batches for small corpora (training's
    a multiple of the workers, as it must split evenly). With `queries`, neighbours search
    that memory-format folder's pairs, into the split "queries"."""
    searched = {"input": str(queries), "split": "queries"} if queries else {}
    return config_from_dict({
        "workdir": str(work),
        "model": {"name": model},
        "embed": {"input": str(work / "corpus"), "batch_size": 64, "num_actors": nodes},
        "index": {"shards": nodes},
        "neighbors": {"num_actors": nodes, **searched},
        "train": {"num_workers": nodes, "batch_size": 256 - 256 % nodes, "epochs": 1, "warmup_steps": 10,
                  "checkpoint_every": 10**6, "log_every": 10**6},
    })


def shard_rows(pairs: int) -> int:
    return max(100, pairs // 8)  # 8 shards at every size: work for up to 8 actors or index shards


def write_pairs(folder: str, pairs: int, d: int, *, seed: int = 4, centres_of: int | None = None) -> None:
    """`pairs` clustered embedding-like pairs as a memory-format folder, around the cluster
    centres of a corpus of `centres_of` pairs (default `pairs`; the centres depend only on
    their number, so other seeds draw other pairs around the same centres)."""
    centres = max(8, (centres_of or pairs) // 100)
    write_memory(folder, *synthetic.clustered_embeddings(pairs, d, seed=seed, clusters=centres),
                 shard_rows=shard_rows(pairs))


def run_size(root: Path, nodes: int, pairs: int, stages: list[str], model: str, d: int,
             fixed: Path | None = None) -> dict[str, float]:
    """Seconds of each of `stages` on `pairs` synthetic pairs (a bare library's row right
    after its stage's); `fixed` is the workdir of the indexed memory that FIXED searches."""
    seconds: dict[str, float] = {}
    if "embed" in stages:
        work = root / f"embed-{nodes}-{pairs}"
        synthetic.write_webdataset(synthetic.make_samples(pairs, seed=3), str(work / "corpus"), shard_rows(pairs))
        seconds["embed"] = timed(lambda: embed(stage_config(work, nodes, model)))
    if FIXED in stages:
        queries = root / "queries"
        write_pairs(str(queries), pairs, d, seed=5, centres_of=MemoryManifest.read(str(fixed / MEMORY_DIR)).total_rows)
        cfg = stage_config(fixed, nodes, model, queries)
        seconds[FIXED] = timed(lambda: neighbors(cfg))
        shutil.rmtree(neighbors_folder(str(fixed), "queries", cfg.neighbors.search))  # the next run searches anew
        if BARE[FIXED] in stages:
            seconds[BARE[FIXED]] = timed(lambda: bare_search(str(fixed), cfg.neighbors.k, str(queries)))
    if not {"index", "neighbors", "train"} & set(stages):
        return seconds
    work = root / f"memory-{nodes}-{pairs}"
    cfg = stage_config(work, nodes, model)
    write_pairs(cfg.path(MEMORY_DIR), pairs, d)
    for stage, fn in (("index", build_index), ("neighbors", neighbors), ("train", train)):
        if stage not in stages:
            continue
        seconds[stage] = timed(lambda: fn(cfg))
        if BARE.get(stage) not in stages:
            continue
        if stage == "index":
            key = IndexManifest.read(index_folder(str(work), "image")).key
            seconds[BARE[stage]] = timed(lambda: bare_autofaiss(root, Path(cfg.path(MEMORY_DIR)), key))
        else:
            seconds[BARE[stage]] = timed(lambda: bare_search(str(work), cfg.neighbors.k))
    return seconds


def run_in_tempdir(nodes: int, pairs: int, stages: list[str], args, fixed: Path | None = None) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="reco-bench-scaling-"))
    try:
        return run_size(root, nodes, pairs, stages, args.model, args.d, fixed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fixed_memory(root: Path, nodes: int, pairs: int, args) -> Path:
    """The workdir of an indexed memory of `pairs` pairs, for FIXED's queries to search."""
    cfg = stage_config(root, nodes, args.model)
    write_pairs(cfg.path(MEMORY_DIR), pairs, args.d)
    build_index(cfg)
    return root


def start_cluster(nodes: int, cpus: int) -> Cluster:
    """`nodes` Ray nodes on this machine, joined by this driver and by every stage's init_ray."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def measure(args) -> list[dict]:
    """Every (stage, nodes, pairs) row, appended to `args.record` as soon as it is measured;
    rows already there are kept and not measured again, so a long run can go in pieces."""
    record = Path(args.record)
    rows = [json.loads(line) for line in record.read_text().splitlines() if line.strip()] if record.exists() else []
    done = {(r["stage"], r["nodes"], r["pairs"]) for r in rows}
    for nodes in args.nodes:
        todo = [p for p in args.sizes if any((s, nodes, p) not in done for s in stages_measured(args, nodes))]
        if not todo:
            continue
        cluster = start_cluster(nodes, args.cpus_per_node)
        fixed_root = Path(tempfile.mkdtemp(prefix="reco-bench-scaling-fixed-"))
        try:
            stages = stages_measured(args, nodes)
            fixed = fixed_memory(fixed_root, nodes, max(args.sizes), args) if FIXED in stages else None
            if not args.no_warm_up:
                # A fresh cluster's first run also starts its workers and fills their import
                # caches: that cost belongs to no size, so it is paid here, untimed.
                print(f"warm-up: {nodes} node(s), {min(args.sizes):,} pairs", flush=True)
                run_in_tempdir(nodes, min(args.sizes), [s for s in stages if s not in BARE.values()], args, fixed)
            for pairs in todo:
                runs = [run_in_tempdir(nodes, pairs, stages, args, fixed) for _ in range(args.repeats)]
                for stage in (name for name in runs[0] if (name, nodes, pairs) not in done):
                    seconds = median([r[stage] for r in runs])
                    rows.append({"stage": stage, "nodes": nodes, "pairs": pairs, "seconds": round(seconds, 2),
                                 "pairs_per_s": round(pairs / seconds, 1), "load": load(),
                                 "repeats": [round(r[stage], 2) for r in runs]})
                    print(json.dumps(rows[-1]), flush=True)
                    with record.open("a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
        finally:
            ray.shutdown()
            cluster.shutdown()
            os.environ.pop("RAY_ADDRESS")
            shutil.rmtree(fixed_root, ignore_errors=True)
    wanted = {(s, n, p) for n in args.nodes for s in stages_measured(args, n) for p in args.sizes}
    return sorted((r for r in rows if (r["stage"], r["nodes"], r["pairs"]) in wanted),
                  key=lambda r: (ORDER.index(r["stage"]), r["nodes"], r["pairs"]))


def stages_measured(args, nodes: int) -> list[str]:
    """The stages asked for (with --fixed-memory FIXED too), and on one node with --bare
    their bare libraries' rows."""
    stages = args.stages + [FIXED] * args.fixed_memory
    return stages + [BARE[s] for s in stages if s in BARE and args.bare and nodes == 1]


def marginal_ms(rows: list[dict]) -> dict[tuple[str, int, int], float]:
    """Milliseconds per pair added since the next smaller size, same stage and nodes: the
    per-pair cost with the stage's fixed start-up taken out (whole-stage pairs/s at these
    sizes is mostly start-up)."""
    out = {}
    for r in rows:
        smaller = [q for q in rows if (q["stage"], q["nodes"]) == (r["stage"], r["nodes"]) and q["pairs"] < r["pairs"]]
        if smaller:
            prev = max(smaller, key=lambda q: q["pairs"])
            added = r["pairs"] - prev["pairs"]
            out[r["stage"], r["nodes"], r["pairs"]] = 1000 * (r["seconds"] - prev["seconds"]) / added
    return out


def table(rows: list[dict]) -> str:
    added = marginal_ms(rows)
    lines = ["| stage | nodes | pairs | seconds | pairs/s | ms per pair added since the smaller size "
             "| load while measured |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = added.get((r["stage"], r["nodes"], r["pairs"]))
        lines.append(f"| {r['stage']} | {r['nodes']} | {r['pairs']:,} | {r['seconds']} | {r['pairs_per_s']:,} | "
                     f"{'' if ms is None else f'{ms:.2f}'} | {r['load']} |")
    return "\n".join(lines)


def flatness(rows: list[dict]) -> str:
    """Per stage and node count: the largest over the smallest per-pair cost added across
    sizes (1.00 is perfectly linear; the goal is within 20%, <= 1.20)."""
    added = marginal_ms(rows)
    lines = ["| stage | nodes | ms per pair added, by size | largest / smallest |", "|---|---|---|---|"]
    for stage in sorted({r["stage"] for r in rows}, key=ORDER.index):
        for nodes in sorted({r["nodes"] for r in rows}):
            costs = [(p, ms) for (s, n, p), ms in sorted(added.items()) if (s, n) == (stage, nodes)]
            if len(costs) >= 2:
                low, high = min(ms for _, ms in costs), max(ms for _, ms in costs)
                # A stage that took less time on more pairs: start-up's noise exceeded the work.
                spread = f"{high / low:.2f}" if low > 0 else "n/a (a larger size took less time)"
                listed = ", ".join(f"{ms:.2f} (to {p:,})" for p, ms in costs)
                lines.append(f"| {stage} | {nodes} | {listed} | {spread} |")
    return "\n".join(lines)


def projection(rows: list[dict]) -> str:
    """Hours for 1B pairs on 8 nodes x 8 GPUs per stage, from per-GPU rates where known
    (measured on a GPU, or published), else from this run's one-node rate at its largest
    size, per node."""
    gpus = NODES_AT_SCALE * GPUS_PER_NODE
    lines = ["| stage | rate used | source | hours for 1B pairs on 8 x 8 GPUs |", "|---|---|---|---|"]
    for stage in sorted({r["stage"] for r in rows if r["stage"] in STAGES}, key=STAGES.index):
        if stage in PER_GPU:
            rate, source = PER_GPU[stage]
            total = rate * gpus
            used = f"{rate:,.0f} pairs/s per GPU x {gpus}"
        else:
            one = max((r for r in rows if r["stage"] == stage and r["nodes"] == 1), key=lambda r: r["pairs"])
            total = one["pairs_per_s"] * NODES_AT_SCALE
            used = f"{one['pairs_per_s']:,.0f} pairs/s per node x {NODES_AT_SCALE} (CPU, linear)"
            source = (f"measured here, 1 node of {one['load'].split(' on ')[-1]}, {one['pairs']:,} pairs; "
                      "no GPU figure: a lower bound on speed")
        lines.append(f"| {stage} | {used} | {source} | {TARGET_PAIRS / total / 3600:,.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["stage"] for r in rows if r["stage"] in STAGES}, key=STAGES.index)
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        colour = {}
        for nodes in sorted({r["nodes"] for r in rows}):
            pts = sorted((r["pairs"], r["pairs_per_s"]) for r in rows if r["stage"] == stage and r["nodes"] == nodes)
            colour[nodes] = ax.plot(*zip(*pts), marker="o", label=f"{nodes} node{'s' * (nodes > 1)}")[0].get_color()
        bare = sorted((r["pairs"], r["pairs_per_s"]) for r in rows if r["stage"] == BARE.get(stage))
        if bare:
            ax.plot(*zip(*bare), marker="o", linestyle="--", color="black", label=BARE[stage].split(", ")[1])
        if stage == "neighbors":
            for nodes in sorted({r["nodes"] for r in rows if r["stage"] == FIXED}):
                pts = sorted((r["pairs"], r["pairs_per_s"]) for r in rows if (r["stage"], r["nodes"]) == (FIXED, nodes))
                ax.plot(*zip(*pts), marker="s", linestyle=":", color=colour.get(nodes),
                        label=f"{nodes} node{'s' * (nodes > 1)}, memory fixed")
        ax.set(title=stage, xscale="log", xlabel="pairs", ylabel="pairs/s (whole stage)")
        sizes = sorted({r["pairs"] for r in rows})
        ax.minorticks_off()
        ax.set_xticks(sizes, [f"{p:,}" for p in sizes])
        ax.legend(fontsize="small")
    fig.suptitle("reco stage throughput (Ray nodes sharing one machine's cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_docs(rows: list[dict], args) -> None:
    section = (f"{BEGIN}\nMeasured by `python benchmarks/scaling.py --sizes "
               f"{','.join(map(str, args.sizes))} --nodes {','.join(map(str, args.nodes))} --cpus-per-node "
               f"{args.cpus_per_node} --repeats {args.repeats}{' --fixed-memory' * args.fixed_memory}"
               f"{' --bare' * args.bare}"
               f"{' --no-warm-up' * args.no_warm_up}` "
               f"(embed model {args.model}; d={args.d} elsewhere). "
               f"All nodes share one machine of {os.cpu_count()} CPUs.\n\n{table(rows)}\n\n"
               f"Cost per pair, start-up taken out (each size's seconds minus the next smaller size's, "
               f"over the pairs added):\n\n{flatness(rows)}\n\n"
               f"![throughput by corpus size and nodes](performance.png)\n\n"
               f"Projection to 1B pairs on 8 nodes x 8 GPUs:\n\n{projection(rows)}\n{END}")
    text = DOC.read_text()
    DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S))
    plot(rows, PLOT)


def scaling_line(rows: list[dict]) -> str:
    most, largest = max(r["nodes"] for r in rows), max(r["pairs"] for r in rows)
    rate = {(r["stage"], r["nodes"]): r["pairs_per_s"] for r in rows if r["pairs"] == largest}
    parts = [f"{s} {rate[s, most] / rate[s, 1]:.2f}" for s in (*STAGES, FIXED) if (s, 1) in rate and (s, most) in rate]
    return f"scaling {most} nodes / 1 node at {largest:,} pairs: " + ", ".join(parts)


def main() -> None:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    p = parser(__doc__, repeats=1)
    p.add_argument("--sizes", type=ints, default=[2000, 8000, 32000])
    p.add_argument("--nodes", type=ints, default=[1, 2, 3])
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--stages", type=lambda t: [s for s in t.split(",") if s], default=list(STAGES),
                   help="of embed,index,neighbors,train (neighbors and train need index); '' with --fixed-memory "
                   "times that row alone")
    p.add_argument("--model", default="reco-tiny")
    p.add_argument("--d", type=int, default=512, help="width of the synthetic embeddings")
    p.add_argument("--fixed-memory", action="store_true", help="also time neighbours of each size's queries "
                   "against one memory of the largest size")
    p.add_argument("--bare", action="store_true", help="on one node, also time the bare libraries' index "
                   "and neighbour work on the same inputs")
    p.add_argument("--no-warm-up", action="store_true", help="time each cluster's first run too (by default "
                   "each new cluster first runs the stages once, untimed, on the smallest size)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--record", default=str(Path(tempfile.gettempdir()) / "reco-scaling.jsonl"),
                   help="JSON lines of measured rows: appended to as it goes, re-used by the next run")
    args = p.parse_args()
    if set(args.stages) - set(STAGES) or ({"neighbors", "train"} & set(args.stages) and "index" not in args.stages):
        p.error(f"--stages {','.join(args.stages)}: name some of {','.join(STAGES)}, with index where neighbors "
                "or train is (it writes their input)")
    if not args.stages and not args.fixed_memory:
        p.error("nothing to measure: name --stages or --fixed-memory")
    rows = measure(args)
    if args.write_docs:
        write_docs(rows, args)
    print(scaling_line(rows))


if __name__ == "__main__":
    main()

"""The fault matrix: a worker node lost in the middle of each stage, and the driver killed.

One module-scoped `ray.cluster_utils.Cluster`: a head with no CPUs (so every task and
actor that does work runs on a worker node, and a lost node always costs work) and two
worker nodes. Each stage runs in turn on one workdir; a thread removes (kills) a worker
node once the stage's first output (or its first actor) appears, then adds a node back so
the cluster keeps its size. The stage must finish through Ray's retries (or, where it
gives up, a re-run must resume). Afterwards every input row is accounted for, no memory
id is lost or duplicated, each index holds the memory's rows, and the neighbour shards
equal those of an uninterrupted run of the same config. Last, the `reco run` driver is
SIGKILLed mid-run and run again; the same checks hold.

`OUTCOMES` collects what happened per case (printed at the end: docs/reliability.md's
"Fault matrix" table comes from it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray._private import state

from reco.config import RecoConfig
from reco.contracts import CorpusManifest, IndexManifest, MemoryManifest, NeighborsManifest
from reco.demo.corpus_server import CorpusServer, write_url_list
from tests.conftest import local_cluster, make_config

ROOT = Path(__file__).resolve().parents[1]
ROWS, PER_SHARD, WORKERS = 64, 8, 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OUTCOMES: dict[str, dict] = {}
"""case -> outcome, rows checked, rows lost: what the module measured."""


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two worker nodes of 2 CPUs; the session's Ray comes back after."""
    # shutdown_at_exit=False: a node added by the killer thread must not register signal
    # handlers (only the main thread may); local_cluster shuts the nodes down.
    with local_cluster(0, WORKERS, shutdown_at_exit=False) as nodes:
        try:
            yield nodes
        finally:
            for case, row in OUTCOMES.items():
                print(f"fault matrix: {case}: {row}")


def _config(workdir: Path, checkpoint: str, corpus: Path, images: str, url_list: str | None = None) -> RecoConfig:
    return make_config(
        workdir, model={"name": "reco-tiny", "pretrained": checkpoint},
        download={"url_list": url_list, "number_sample_per_shard": PER_SHARD, "image_size": 64,
                  "timeout": 2, "thread_count": 4},
        embed={"input": str(corpus), "num_actors": 2, "cpus_per_actor": 1},
        index={"key": "Flat", "shards": 2, "recall_queries": 16},
        neighbors={"k": 4, "num_actors": 2},
        train={"batch_size": 16, "epochs": 4, "warmup_steps": 1, "checkpoint_every": 2, "max_failures": 3},
        evaluate={"datasets": [{"name": "shapes", "kind": "imagefolder", "path": images,
                                "templates": ["a photo of a {c}."]}]})


@pytest.fixture(scope="module")
def world(cluster, tmp_path_factory, tiny_checkpoint, eval_imagefolder) -> dict:
    """The faulted workdir's config (a URL list of ROWS rows served on 127.0.0.1, 10% broken),
    the uninterrupted reference's, and the driver case's, all over the same corpus."""
    base = tmp_path_factory.mktemp("faults")
    corpus = base / "faulted" / "corpus"
    with CorpusServer(ROWS, seed=5) as server:
        urls = write_url_list(str(base / "urls.parquet"), server, broken_share=0.1, seed=1)
        yield {"server": server, "urls": urls,
               "faulted": _config(base / "faulted", tiny_checkpoint, corpus, eval_imagefolder, urls.path),
               "reference": _config(base / "reference", tiny_checkpoint, corpus, eval_imagefolder),
               "driver": _config(base / "driver", tiny_checkpoint, corpus, eval_imagefolder)}


# ---- the node killer ------------------------------------------------------------------------

def _actors(class_name: str) -> dict[str, dict]:
    """Actor id -> the GCS's record of every actor of that class (state API needs no dashboard)."""
    return {a: info for a, info in state.actors().items() if info["ActorClassName"] == class_name}


class NodeKiller:
    """A thread that waits for `ready()`, then removes a worker node (the one running an
    alive actor of `actor_class`, if given) without grace, and adds a node back."""

    def __init__(self, cluster, ready: Callable[[], bool], finished: Callable[[], bool],
                 actor_class: str | None = None, timeout: float = 300):
        self.cluster, self.ready, self.finished, self.actor_class = cluster, ready, finished, actor_class
        self.timeout = timeout
        self.before = set(_actors(actor_class)) if actor_class else set()
        self.killed: dict = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "NodeKiller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join()

    def _victim(self):
        workers = list(self.cluster.worker_nodes)
        if self.actor_class is None:
            return workers[0]
        alive = [info for a, info in _actors(self.actor_class).items()
                 if a not in self.before and info["State"] == "ALIVE"]
        if not alive:
            return None
        node_id = alive[0]["Address"]["NodeID"]
        return next((n for n in workers if n.node_id == node_id), None)

    def _run(self) -> None:
        try:
            self._kill_and_replace()
        except BaseException as err:  # noqa: BLE001 (reported by check, in the test's thread)
            self.error = err

    def _kill_and_replace(self) -> None:
        deadline = time.monotonic() + self.timeout
        victim = None
        while time.monotonic() < deadline and not self.finished():
            if self.ready():
                victim = self._victim()
                if victim is not None:
                    break
            time.sleep(0.02)
        if victim is None:
            return
        self.killed.update(node=victim.node_id, finished=self.finished(), at=time.monotonic())
        self.cluster.remove_node(victim, allow_graceful=False)
        self.cluster.add_node(num_cpus=2)

    def check(self) -> None:
        assert self.error is None, f"the node killer failed: {self.error!r}"
        assert self.killed, "no node was killed: the stage ended first"
        assert not self.killed["finished"], "the kill came after the stage finished"


def _files(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: bool(list(folder.glob(pattern)))


def _run_through_fault(name: str, stage: Callable[[], object], killer: NodeKiller) -> object:
    """The stage under `killer`; if it gives up, a re-run must finish it. Records the outcome."""
    start = time.monotonic()
    with killer:
        try:
            result, outcome = stage(), "finished through Ray's retries"
        except Exception as err:  # noqa: BLE001 (any error: the re-run below must then succeed)
            result, outcome = None, f"failed ({type(err).__name__}); re-run resumed"
    killer.check()
    # The cluster has its size again: the lost node is known dead, its replacement alive.
    killer.cluster.wait_for_nodes()
    assert len(killer.cluster.worker_nodes) == WORKERS
    if result is None:
        result = stage()
    OUTCOMES[name] = {"outcome": outcome, "seconds": round(time.monotonic() - start, 1)}
    return result


def _read_memory(workdir: str) -> "pa.Table":  # noqa: F821
    import pyarrow as pa

    folder = Path(workdir) / "memory"
    manifest = MemoryManifest.read(str(folder))
    return pa.concat_tables(pq.read_table(folder / s.path).replace_schema_metadata(None) for s in manifest.shards)


def _check_memory(cfg: RecoConfig, corpus: CorpusManifest) -> MemoryManifest:
    """Every downloaded sample is a memory row or a counted skip; ids are 0..n-1, once each."""
    memory = MemoryManifest.read(cfg.path("memory"))
    assert sum(s.samples for s in memory.inputs) == corpus.successes
    assert memory.total_rows + memory.skipped.total == corpus.successes
    assert len({s.source for s in memory.inputs}) == len(memory.inputs)
    ids = _read_memory(cfg.workdir)["id"].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.arange(memory.total_rows))
    return memory


def _check_index(cfg: RecoConfig, memory: MemoryManifest) -> None:
    """Each modality's index holds every memory row once: its ntotal (and its shards') equal the memory's."""
    import faiss

    for modality in ("image", "text"):
        folder = Path(cfg.path("index", modality))
        manifest = IndexManifest.read(str(folder))
        assert manifest.ntotal + manifest.skipped.total == memory.total_rows, modality
        assert sum(faiss.read_index(str(folder / s.path)).ntotal for s in manifest.shards) == manifest.ntotal


def _check_neighbors_equal(cfg: RecoConfig, reference: RecoConfig) -> NeighborsManifest:
    """The neighbour shards hold the same values as the uninterrupted run's."""
    got_dir, want_dir = Path(cfg.path("neighbors", "train")), Path(reference.path("neighbors", "train"))
    got, want = NeighborsManifest.read(str(got_dir)), NeighborsManifest.read(str(want_dir))
    assert [s.path for s in got.shards] == [s.path for s in want.shards]
    assert (got.total_rows, got.short) == (want.total_rows, want.short)
    for shard in want.shards:
        a = pq.read_table(got_dir / shard.path).replace_schema_metadata(None)
        b = pq.read_table(want_dir / shard.path).replace_schema_metadata(None)
        assert a.equals(b), shard.path
    return got


# ---- the cases, in pipeline order on one workdir --------------------------------------------

def test_download_loses_a_node(cluster, world):
    from pipeline.download import download

    cfg, urls = world["faulted"], world["urls"]
    out = Path(cfg.path("corpus"))
    killer = NodeKiller(cluster, _files(out, "*_stats.json"), _files(out, "_manifest.json"))
    corpus = _run_through_fault("download", lambda: download(cfg), killer)
    assert corpus.input_rows == ROWS
    assert corpus.successes == urls.downloadable
    assert corpus.successes + sum(corpus.failures.values()) == ROWS
    # Each downloaded sample in a tar once.
    import tarfile

    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += [m.name.rsplit(".", 1)[0] for m in t if m.name.endswith(".jpg")]
    assert len(keys) == len(set(keys)) == corpus.successes
    OUTCOMES["download"].update(rows_checked=ROWS, rows_lost=ROWS - corpus.successes - sum(corpus.failures.values()))
    world["corpus"] = corpus


def test_embed_loses_a_node(cluster, world):
    from pipeline.embed import embed

    cfg = world["faulted"]
    staging = Path(cfg.path("memory", "_staging"))
    killer = NodeKiller(cluster, _files(staging, "*.parquet"), _files(Path(cfg.path("memory")), "_manifest.json"),
                        actor_class="ShardEmbedder")
    _run_through_fault("embed", lambda: embed(cfg), killer)
    memory = _check_memory(cfg, world["corpus"])
    embed(world["reference"])  # the uninterrupted run of the same corpus
    assert _read_memory(cfg.workdir).equals(_read_memory(world["reference"].workdir))
    OUTCOMES["embed"].update(rows_checked=world["corpus"].successes,
                             rows_lost=world["corpus"].successes - memory.total_rows - memory.skipped.total)
    world["memory"] = memory


def test_index_loses_a_node(cluster, world):
    from indexing.build import build_index

    cfg = world["faulted"]
    pieces = Path(cfg.path("index", "_pieces"))
    killer = NodeKiller(cluster, _files(pieces, "**/*.index"), _files(Path(cfg.path("index", "text")), "_manifest.json"))
    _run_through_fault("index", lambda: build_index(cfg), killer)
    _check_index(cfg, world["memory"])
    build_index(world["reference"])
    lost = 0
    for modality in ("image", "text"):
        m = IndexManifest.read(cfg.path("index", modality))
        lost += world["memory"].total_rows - m.ntotal - m.skipped.total
    OUTCOMES["index"].update(rows_checked=2 * world["memory"].total_rows, rows_lost=lost)


def test_neighbors_loses_a_node(cluster, world):
    from indexing.neighbors import neighbors

    cfg = world["faulted"]
    out = Path(cfg.path("neighbors", "train"))
    killer = NodeKiller(cluster, _files(out, "part-*.parquet"), _files(out, "_manifest.json"),
                        actor_class="ShardSearcher")
    manifest = _run_through_fault("neighbors", lambda: neighbors(cfg), killer)
    neighbors(world["reference"])
    got = _check_neighbors_equal(cfg, world["reference"])
    assert got.total_rows == manifest.total_rows == world["memory"].total_rows
    OUTCOMES["neighbors"].update(rows_checked=got.total_rows, rows_lost=world["memory"].total_rows - got.total_rows)


def test_train_loses_a_node(cluster, world):
    from training.train import train

    cfg = world["faulted"]
    run_dir = Path(cfg.path("train", "ray", "model"))
    killer = NodeKiller(cluster, lambda: (run_dir / "checkpoint_manager_snapshot.json").exists(),
                        lambda: (Path(cfg.path("train", "model")) / "config.json").exists(),
                        actor_class="RayTrainWorker")
    result = _run_through_fault("train", lambda: train(cfg), killer)
    steps = cfg.train.epochs * (world["memory"].total_rows // cfg.train.batch_size)
    assert result["steps"] == steps
    assert result["resumed_from"] and result["resumed_from"][-1] < steps, result["resumed_from"]
    OUTCOMES["train"].update(rows_checked=world["memory"].total_rows, rows_lost=0,
                             resumed_from=result["resumed_from"])


def test_evaluate_loses_a_node(cluster, world, eval_imagefolder):
    from evaluation.evaluate import evaluate

    cfg = world["faulted"]
    killer = NodeKiller(cluster, lambda: True, lambda: Path(cfg.path("eval", "report.json")).exists(),
                        actor_class="ShardEmbedder")
    report = _run_through_fault("evaluate", lambda: evaluate(cfg), killer)
    images = len(list(Path(eval_imagefolder).glob("*/*.jpg")))
    [dataset] = report["datasets"]
    assert dataset["samples"] + dataset["skipped"] == images and dataset["skipped"] == 0
    assert report["config"]["memory_pairs"] == world["memory"].total_rows
    assert {r["metric"] for r in report["results"]} >= {"top1"}
    OUTCOMES["evaluate"].update(rows_checked=images, rows_lost=images - dataset["samples"] - dataset["skipped"])


def test_killed_driver_reruns_to_the_same_outputs(cluster, world, tmp_path):
    """`reco run` SIGKILLed (its process group) once neighbour search has written a shard; the
    re-run resumes, and memory, index and neighbours equal the uninterrupted run's."""
    from reco.run import run_pipeline

    cfg = world["driver"]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "reco.cli", "run", str(cfg_file)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(cfg.path("neighbors", "train"))
    deadline = time.monotonic() + 300
    while proc.poll() is None and not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    finished = (out / "_manifest.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished and proc.returncode == -signal.SIGKILL, "the kill came too late"
    start = time.monotonic()
    runs = {r.stage: r.status for r in run_pipeline(cfg)}
    assert runs["embed"] == "skipped" and runs["neighbors"] == "done", runs
    memory = _check_memory(cfg, world["corpus"])
    assert _read_memory(cfg.workdir).equals(_read_memory(world["reference"].workdir))
    _check_index(cfg, memory)
    got = _check_neighbors_equal(cfg, world["reference"])
    report = json.loads(Path(cfg.path("eval", "report.json")).read_text())
    assert report["config"]["memory_pairs"] == memory.total_rows
    assert report["config"]["fusion_steps"] == cfg.train.epochs * (memory.total_rows // cfg.train.batch_size)
    OUTCOMES["driver"] = {"outcome": "re-run resumed", "seconds": round(time.monotonic() - start, 1),
                          "rows_checked": world["corpus"].successes,
                          "rows_lost": world["corpus"].successes - got.total_rows - memory.skipped.total}

"""The memory service (one Ray actor per index shard) on a three-node cluster: it answers as the
in-process search does, holds one shard per actor, reaches other actors by its actors' names,
survives a killed actor during `reco neighbors`, and judges evaluation near-duplicates exactly.
Shard-job actors (embed, neighbours) ask for no more CPUs than one node has."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from ray._private import state

from indexing.build import build_index
from indexing.neighbors import neighbors
from reco.config import IndexConfig
from reco.demo.synthetic import clustered_embeddings
from reco.encode import replica_resources
from reco.errors import RecoError
from reco.search import MemoryIndex, memory_service, near_duplicate_ids, plan_shard_actors
from reco.shard_jobs import actor_resources
from tests.conftest import local_cluster, make_config, write_memory

D, N, SHARD_ROWS, NODES = 32, 3000, 500, 3
pytestmark = pytest.mark.timeout(900)


def f16(x: np.ndarray) -> np.ndarray:
    """The values the memory stores (float16)."""
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes on this machine, shared by the module; the session's Ray comes back after."""
    with local_cluster(2, NODES - 1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    return clustered_embeddings(N, D, 21)


@pytest.fixture(scope="module")
def workdirs(cluster, pairs, tmp_path_factory) -> dict[int, Path]:
    """The same memory indexed as 1, 2 and 4 index shards (IVF, so search is approximate)."""
    out = {}
    for shards in (1, 2, 4):
        path = tmp_path_factory.mktemp(f"shards{shards}")
        write_memory(path, *pairs, shard_rows=SHARD_ROWS)
        build_index(make_config(path, index={"key": "IVF16,Flat", "index_param": "nprobe=4", "shards": shards}))
        out[shards] = path
    return out


def shard_actor_calls(service: MemoryIndex, fn) -> list:
    return ray.get([s.__ray_call__.remote(fn) for s in service._servers])


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_service_answers_as_local_search(workdirs, pairs, shards, tmp_path):
    workdir = str(workdirs[shards])
    queries = clustered_embeddings(64, D, 22)[0]
    local = MemoryIndex.open(workdir)
    service = MemoryIndex.open(workdir, distributed=True, local_dir=str(tmp_path))
    try:
        for modality in ("image", "text"):
            want_scores, want_ids = local.search(queries, 10, modality)
            scores, ids = service.search(queries, 10, modality)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)
        # Fetch routes every id to its shard and returns the memory's rows; -1 gives zeros.
        ids = np.array([[0, N - 1, -1], [SHARD_ROWS, 2 * SHARD_ROWS - 1, 1234]])
        got = service.fetch(ids, "text")
        np.testing.assert_array_equal(got[:, :2], f16(pairs[1])[ids[:, :2]])
        np.testing.assert_array_equal(got[1, 2], f16(pairs[1])[1234])
        assert not got[0, 2].any()
        np.testing.assert_array_equal(service.fetch(ids, "image"), local.fetch(ids, "image"))
        # Near-duplicate tests made by the shards: each found pair's stored image against the
        # query's image, -inf where fewer than k pairs were found (IVF with nprobe=4 of 16 lists).
        images = clustered_embeddings(64, D, 23)[0]
        _, ids, cosines = service.search_compared(queries, 10, "text", images)
        np.testing.assert_array_equal(ids, local.search(queries, 10, "text")[1])
        np.testing.assert_allclose(cosines, np.einsum("nd,nkd->nk", images, f16(pairs[0])[ids]), rtol=1e-6, atol=1e-6)
        _, ids, cosines = service.search_compared(queries[:2], N, "image", images[:2])
        assert (ids == -1).any() and np.array_equal(ids == -1, cosines == -np.inf)
        np.testing.assert_array_equal(cosines, local.search_compared(queries[:2], N, "image", images[:2])[2])
        # One shard per actor, spread over the nodes, read from copies on the local disk.
        held = shard_actor_calls(service, lambda self: (self.index["image"].ntotal, self.index["text"].ntotal))
        assert held == [(s.ntotal, s.ntotal) for s in service.manifests["text"].shards]
        nodes = shard_actor_calls(service, lambda self: ray.get_runtime_context().get_node_id())
        assert len(set(nodes)) == min(shards, NODES)
        copies = sorted(p.name for p in tmp_path.glob("reco-memory/*/image/shard-*.index"))
        assert copies == sorted(s.path for s in service.manifests["image"].shards)
        assert len(list(tmp_path.glob("reco-memory/*/text/embeddings/part-*.npy"))) == N // SHARD_ROWS
    finally:
        service.close()


def test_service_is_chosen_on_several_nodes_unless_told_never(workdirs):
    service = memory_service(str(workdirs[1]), IndexConfig(), use_gpu=False)
    try:
        assert service is not None and service.distributed and len(service._servers) == 1
    finally:
        service.close()
    assert memory_service(str(workdirs[1]), IndexConfig(service="never"), use_gpu=False) is None


@ray.remote(num_cpus=0, max_restarts=-1)
class Searching:
    """A restartable actor searching through a client it is given, as reco neighbors' searchers do."""

    def __init__(self, memory: MemoryIndex):
        self.memory = memory

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.memory.search(queries, 10, "image")


def test_client_reaches_a_restartable_actor_without_actor_handles(workdirs, capfd):
    """The client pickles as its actors' names: a restartable actor's constructor receives it
    in line, not through the object store (where Ray logs an error: a restart after the
    arguments' loss would fail), and searches through it."""
    queries = clustered_embeddings(16, D, 23)[0]
    service = MemoryIndex.open(str(workdirs[2]), distributed=True)
    try:
        capfd.readouterr()
        searching = Searching.remote(service)
        got = ray.get(searching.search.remote(queries), timeout=120)
        for a, b in zip(got, service.search(queries, 10, "image")):
            np.testing.assert_array_equal(a, b)
        ray.kill(searching)
        assert "constructor arguments in the object store" not in capfd.readouterr().err
    finally:
        service.close()


def test_client_does_not_grow_with_the_memorys_shards(workdirs, pairs, tmp_path):
    """Other actors receive the shard actors' names and one id range per run of memory shards
    on one actor: the same bytes for a memory of 6 shards as of 30, routing every id."""
    fine = tmp_path / "fine"
    write_memory(fine, *pairs, shard_rows=SHARD_ROWS // 5)
    build_index(make_config(fine, index={"key": "IVF16,Flat", "index_param": "nprobe=4", "shards": 2}))
    ids = np.arange(0, N, 7)
    sizes = []
    for workdir in (workdirs[2], fine):
        service = MemoryIndex.open(str(workdir), distributed=True)
        try:
            sizes.append(len(pickle.dumps(service)) - len(str(workdir)))  # the paths differ in length
            np.testing.assert_array_equal(pickle.loads(pickle.dumps(service)).fetch(ids, "image"), f16(pairs[0])[ids])
        finally:
            service.close()
    assert sizes[0] == sizes[1]


def _shard_actors() -> dict[str, dict]:
    """Actor id -> the GCS's record (pid, state, restarts) of every shard actor. Read from the
    GCS: the state API (ray.util.state) needs the dashboard, which the test cluster leaves off."""
    return {a: info for a, info in state.actors().items() if info["ActorClassName"] == "ShardServer"}


def _alive_shard_actors() -> list[dict]:
    return [info for info in _shard_actors().values() if info["State"] == "ALIVE"]


def _kill_a_shard_actor_when_a_shard_is_written(out: Path, killed: dict) -> None:
    """SIGKILL one shard actor's process once the first neighbour shard is on disk."""
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = _alive_shard_actors()[0]
    killed.update(actor_id=victim["ActorID"], written=len(list(out.glob("part-*.parquet"))),
                  finished=(out / "_manifest.json").exists())
    os.kill(victim["Pid"], signal.SIGKILL)


def test_shard_actors_fit_one_node(cluster, tmp_path):
    """Six CPUs on three nodes of 2: one actor asking for all six would never be placed."""
    one = actor_resources(1, max_cpus=8)
    assert (one.actors, one.cpus) == (1, 2.0)
    placed = ray.remote(num_cpus=one.cpus)(lambda: ray.get_runtime_context().get_node_id())
    assert ray.get(placed.remote(), timeout=120) in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # reco embed's default on CPU: a single-threaded replica per CPU
    replicas = replica_resources(make_config(tmp_path), 10)
    assert (replicas.actors, replicas.cpus) == (6, 1.0)


def node(node_id: str, alive: bool = True, **resources: float) -> dict:
    """A node as `ray.nodes()` describes it (the fields the plan reads)."""
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_shard_actor_plan_counts_only_the_nodes_that_hold_shards():
    """A head without CPUs, or CPU nodes beside GPU ones, hold no shard: they must not shrink
    the shards' CPUs and threads, nor change how many shards each holding node gets."""
    cpu_nodes = [node("c", CPU=2), node("a", CPU=0), node("b", CPU=2)]
    resources, threads, nodes = plan_shard_actors(2, cpu_nodes, gpus=0)
    assert (resources.cpus, resources.gpus, threads, nodes) == (1.0, 0.0, 2, ["b", "c"])
    # ray_cluster.yaml's shape: a 32-CPU head, GPU nodes (one of them gone), a CPU node
    cluster = [node("head", CPU=32), node("g2", CPU=96, GPU=8), node("g1", CPU=96, GPU=8),
               node("g0", alive=False, CPU=96, GPU=8), node("cpu", CPU=64)]
    resources, threads, nodes = plan_shard_actors(4, cluster, gpus=16)
    assert (resources.cpus, resources.gpus, threads, nodes) == (24.0, 1.0, 48, ["g1", "g2", "g1", "g2"])
    with pytest.raises(RecoError, match="no alive node of the Ray cluster has CPUs"):
        plan_shard_actors(1, [node("a", CPU=0), node("b", alive=False, CPU=4)], gpus=0)


def test_killed_shard_actor_during_neighbors_is_restarted(workdirs):
    workdir = workdirs[2]
    cfg = make_config(workdir, neighbors={"k": 5, "batch_size": 25, "num_actors": 1, "split": "clean"})
    clean = neighbors(cfg)
    deadline = time.monotonic() + 60  # the first run's service is stopping
    while _alive_shard_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    killed: dict = {}
    out = workdir / "neighbors" / "killed"
    killer = threading.Thread(target=_kill_a_shard_actor_when_a_shard_is_written, args=(out, killed))
    killer.start()
    manifest = neighbors(cfg.model_copy(update={"neighbors": cfg.neighbors.model_copy(update={"split": "killed"})}))
    killer.join()
    assert not killed["finished"] and killed["written"] < len(clean.shards), "the kill came too late"
    assert _shard_actors()[killed["actor_id"]]["NumRestarts"] >= 1
    assert manifest.total_rows == clean.total_rows == N and manifest.short == clean.short
    for shard in clean.shards:
        want = pq.read_table(workdir / "neighbors" / "clean" / shard.path).replace_schema_metadata(None)
        got = pq.read_table(out / shard.path).replace_schema_metadata(None)
        assert got.equals(want), shard.path


def _planted(tests: np.ndarray, cosines: list[float], rng: np.random.Generator) -> np.ndarray:
    """For each test image, one vector per cosine, at exactly that cosine to it."""
    out = []
    for t in tests:
        for c in cosines:
            u = rng.standard_normal(D)
            u -= (u @ t) * t
            out.append(c * t + np.sqrt(1 - c * c) * u / np.linalg.norm(u))
    return np.array(out, dtype=np.float32)


def test_near_duplicates_are_judged_on_stored_embeddings(cluster, pairs, tmp_path):
    """With a PQ index the scores are approximate: the near-duplicates of test images must be
    exactly those whose stored image has cosine above the threshold, found through the service."""
    rng = np.random.default_rng(5)
    tests = rng.standard_normal((6, D)).astype(np.float32)
    tests /= np.linalg.norm(tests, axis=1, keepdims=True)
    image, text = pairs[0].copy(), pairs[1]
    planted = _planted(tests, [0.99, 0.975, 0.96, 0.945, 0.935, 0.92], rng)
    image[100:100 + len(planted)] = planted
    write_memory(tmp_path, image, text, shard_rows=SHARD_ROWS)
    build_index(make_config(tmp_path, index={"key": "Pad32,IVF4_HNSW8,PQ8", "index_param": "nprobe=4", "shards": 2}))
    cosine = tests @ f16(image).T
    want = np.flatnonzero((cosine > 0.95).any(axis=0))
    assert len(want) == 6 * 3
    service = MemoryIndex.open(str(tmp_path), distributed=True, local_dir=str(tmp_path / "local"))
    try:
        scores, ids = service.search(tests, 16, "image")
        by_index = np.unique(ids[scores > 0.95])
        assert not np.array_equal(by_index, want), "PQ scores happen to be exact: the test proves nothing"
        np.testing.assert_array_equal(near_duplicate_ids(service, tests, 0.95), want)
    finally:
        service.close()

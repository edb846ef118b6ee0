"""Searching the memory: index shards, search merged by score, fetch by id, retrieval with exclusions.

`MemoryIndex.open(workdir)` reads the two modality manifests (written last by `reco index`)
and loads every index shard, memory-mapped where the index type allows, beside the
embedding copies of the memory shards it covers (`embeddings/part-*.npy`, row = id -
id_start). A `ShardServer` holds one index shard of both modalities and answers search
and fetch for the ids it covers. Locally the servers are plain objects in this process.
With `distributed=True` they are the memory service: one Ray actor per index shard,
spread over the cluster's nodes, each holding only its shard's files, copied to its
node's local disk and memory-mapped; they restart after a failure, and the client (a
`MemoryIndex`, picklable, so other Ray actors can search through it) retries a call
that an actor's death interrupted. Search scatters each query batch to every shard and
merges their k best by score; fetch routes each id to the shard that holds it. Near-duplicate
tests are made where the embeddings are (`search_compared`): a shard returns the cosine of
each candidate's image with the query's image, not the candidate's embedding.
`memory_service` decides, for a stage, whether the memory calls for the service.

On top of it, `retrieve` is RECO's uni-modal search with cross-modal gather (or the
ablations' other choices), dropping a
query's own pair and its image near-duplicates, and `near_duplicate_ids` finds the memory
pairs that copy evaluation images. `reco index`, `reco neighbors` and `reco evaluate` all
search through this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
import time
import uuid

import faiss
import numpy as np
import ray
from autofaiss.indices.index_utils import set_search_hyperparameters
from fsspec.implementations.local import LocalFileSystem
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from reco import storage
from reco.cluster import cluster_gpus
from reco.config import Fuse, IndexConfig, Search
from reco.contracts import (INDEX_DIR, MANIFEST, MODALITIES, OTHER, CoveredShard, IndexManifest, IndexShard,
                            Modality, index_folder)
from reco.errors import RecoError
from reco.shard_jobs import ActorResources

log = logging.getLogger(__name__)


class MemoryIndexError(RecoError, RuntimeError):
    """An index that cannot be built or opened as it stands; the message names the file."""


def _local_path(url: str) -> str | None:
    """The path of a local file (which can be memory-mapped), None on an object store."""
    fs, path = storage.filesystem(url)
    return path if isinstance(fs, LocalFileSystem) else None


def write_index(index: faiss.Index, url: str) -> int:
    """Write atomically (temp + rename, or one PUT); returns the file size."""
    data = faiss.serialize_index(index)
    storage.write_bytes_atomic(url, data.tobytes())
    return int(data.size)


def read_index(url: str, expected_bytes: int | None = None, mmap: bool = False) -> faiss.Index:
    """Load an index file, memory-mapped when local and asked; a short or unreadable file
    is an error naming it (faiss alone would crash or read garbage)."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise MemoryIndexError(f"index file {url} is missing; re-run `reco index` to rebuild it")
    size = fs.size(path)
    if expected_bytes is not None and size != expected_bytes:
        raise MemoryIndexError(f"index file {url} has {size} bytes, the manifest says {expected_bytes}: "
                          "it is truncated or was replaced; re-run `reco index`")
    local = _local_path(url)
    try:
        if local is not None:
            return faiss.read_index(local, faiss.IO_FLAG_MMAP if mmap else 0)
        with fs.open(path, "rb") as f:
            return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    except RuntimeError as err:
        raise MemoryIndexError(f"index file {url} cannot be read ({str(err).splitlines()[0]}); "
                          "re-run `reco index` to rebuild it") from None


def load_npy(url: str) -> np.ndarray:
    """Memory-mapped when local (rows are read on demand), else read into RAM."""
    local = _local_path(url)
    if not storage.exists(url):
        raise MemoryIndexError(f"embedding file {url} is missing; re-run `reco index`")
    try:
        if local is not None:
            return np.load(local, mmap_mode="r")
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            return np.load(io.BytesIO(f.read()))
    except ValueError as err:
        raise MemoryIndexError(f"embedding file {url} cannot be read ({err}); re-run `reco index`") from None


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def copy_to_local(url: str, local: str) -> str:
    """`local`, a copy of `url` made once: a copy of the same size is reused (restarts, other
    stages on the same memory). Written under a temporary name then renamed, so a reader
    never maps a partial copy; streamed, so a large file never passes through RAM."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise MemoryIndexError(f"{url} is missing; re-run `reco index`")
    if os.path.exists(local) and os.path.getsize(local) == fs.size(path):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(local), prefix=".copy-")
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local


class ShardServer:
    """One index shard of both modalities, with the embeddings of the memory shards it covers.

    With `copy_key`, the files are first copied to `<local_dir>/reco-memory/<copy_key>/`
    on this node's disk (default `local_dir`: Ray's temp folder) and memory-mapped there:
    the process's memory is its shard, paged in as searched, not the whole memory."""

    def __init__(self, workdir: str, shard: dict[str, dict], index_param: dict[str, str],
                 use_gpu: bool = False, gpu: int = 0, threads: int | None = None,
                 local_dir: str | None = None, copy_key: str | None = None):
        if threads:
            faiss.omp_set_num_threads(threads)
        self.on_gpu = use_gpu and gpu_available()
        self._gpu_res = faiss.StandardGpuResources() if self.on_gpu else None
        self.index: dict[str, faiss.Index] = {}
        self.starts: dict[str, np.ndarray] = {}
        self.embeddings: dict[str, list[np.ndarray]] = {}
        if copy_key is not None:
            local_dir = os.path.join(local_dir or ray.get_runtime_context().get_temp_dir(), "reco-memory", copy_key)
        for modality, spec in shard.items():
            folder = index_folder(workdir, modality)
            local = None if copy_key is None else os.path.join(local_dir, modality)
            spec = IndexShard.model_validate(spec)
            index = read_index(self._source(folder, spec.path, local), spec.bytes, mmap=not self.on_gpu)
            if index.ntotal != spec.ntotal:
                raise MemoryIndexError(f"index file {storage.join(folder, spec.path)} holds {index.ntotal} "
                                  f"vectors, the manifest says {spec.ntotal}; re-run `reco index`")
            if self.on_gpu:
                index = faiss.index_cpu_to_gpu(self._gpu_res, gpu, index)
            if index_param[modality]:
                set_search_hyperparameters(index, index_param[modality], self.on_gpu)
            self.index[modality] = index
            covered = sorted(spec.memory_shards, key=lambda s: s.id_start)
            self.starts[modality] = np.array([s.id_start for s in covered], dtype=np.int64)
            self.embeddings[modality] = [self._embeddings(self._source(folder, s.embeddings, local), s)
                                         for s in covered]

    @staticmethod
    def _source(folder: str, name: str, local: str | None) -> str:
        """Where to read `name` of the modality folder: the workdir, or its local copy."""
        url = storage.join(folder, name)
        return url if local is None else copy_to_local(url, os.path.join(local, name))

    @staticmethod
    def _embeddings(url: str, covered: CoveredShard) -> np.ndarray:
        array = load_npy(url)
        if array.shape[0] != covered.rows:
            raise MemoryIndexError(f"embedding file {url} has {array.shape[0]} rows, the manifest says "
                              f"{covered.rows}; re-run `reco index`")
        return array

    def search(self, queries: np.ndarray, k: int, modality: str,
               images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scores, ids, and with `images` the cosine of images[i] with each found pair's image
        embedding, -inf where no pair was found): judged here, beside the embeddings, so a
        client gets (n, k) numbers where it would otherwise fetch (n, k, d)."""
        scores, ids = self.index[modality].search(queries, k)
        if images is None:
            return scores, ids, None
        found = ids >= 0
        found_images = np.zeros(ids.shape + (images.shape[1],), dtype=np.float32)
        found_images[found] = self.fetch(ids[found], "image")
        cosines = np.einsum("nd,nkd->nk", images, found_images)
        cosines[~found] = -np.inf
        return scores, ids, cosines

    def fetch(self, ids: np.ndarray, modality: str) -> np.ndarray:
        """Embeddings (len(ids), d) of ids this shard covers, in their stored dtype (float16
        halves what the memory service sends back; the client widens them)."""
        starts, arrays = self.starts[modality], self.embeddings[modality]
        part = np.searchsorted(starts, ids, side="right") - 1
        out = np.empty((len(ids), arrays[0].shape[1]), dtype=arrays[0].dtype)
        for p in np.unique(part):
            rows = part == p
            local = ids[rows] - starts[p]
            order = np.argsort(local)  # ascending reads from the memory map
            gathered = np.empty((len(local), out.shape[1]), dtype=out.dtype)
            gathered[order] = arrays[p][local[order]]
            out[rows] = gathered
        return out


SHARD_MAX_RESTARTS = 3
"""Times Ray restarts a dead shard actor (its calls in flight are retried as often)."""
CALL_ATTEMPTS = 3
"""Tries of a service call that an actor's death interrupted, beyond Ray's own retries."""


class MemoryIndex:
    """The searchable memory: sharded image and text indices plus embedding lookup by id.

    A distributed one (the memory service's client) pickles as its actors' names and its id
    map, so it can be passed to other Ray actors, at a size that does not grow with the
    memory; `manifests` stays in the process that opened it, which alone stops the service."""

    def __init__(self, workdir: str, manifests: dict[str, IndexManifest], servers: list,
                 distributed: bool, names: list[str] | None = None):
        self.workdir = workdir
        self.manifests: dict[str, IndexManifest] | None = manifests
        self.d = manifests["image"].d
        self.ntotal = manifests["image"].total_rows
        """Memory pairs covered: ids 0..ntotal-1."""
        self.distributed = distributed
        self._servers: list | None = servers
        self._names = names
        self._namespace = ray.get_runtime_context().namespace if distributed else None
        self._owns_service = distributed
        # Which server holds an id: the first id of each run of memory shards on one server,
        # in id order (a fresh build's runs are contiguous: one per index shard, however many
        # memory shards there are).
        covered = sorted((c.id_start, j) for j, s in enumerate(manifests["image"].shards) for c in s.memory_shards)
        runs = [c for i, c in enumerate(covered) if i == 0 or c[1] != covered[i - 1][1]]
        self._starts = np.array([c[0] for c in runs], dtype=np.int64)
        self._owner = np.array([c[1] for c in runs], dtype=np.int64)

    def __getstate__(self) -> dict:
        if not self.distributed:
            raise TypeError("a MemoryIndex opened in-process holds its shards in this process and cannot be "
                            "passed to another; open it with distributed=True (the memory service)")
        # Names, not actor handles: an actor handle in a restartable actor's constructor
        # arguments puts them in the object store, from which a restart after their node's
        # loss could not read them (Ray logs an error for it: ray-project/ray#53727). No
        # manifests: at 1B pairs they list 100k memory shards, tens of MB per receiver.
        return {**self.__dict__, "manifests": None, "_servers": None, "_owns_service": False}

    @property
    def servers(self) -> list:
        """The shard servers: objects in this process, or the service's actors (looked up by
        name where this client was unpickled)."""
        if self._servers is None:
            self._servers = [ray.get_actor(name, namespace=self._namespace) for name in self._names]
        return self._servers

    @classmethod
    def open(cls, workdir: str, *, use_gpu: bool = False, distributed: bool = False,
             local_dir: str | None = None) -> "MemoryIndex":
        """Load the indices built by `reco index` under `workdir`."""
        return cls.from_manifests(workdir, read_manifests(workdir), use_gpu=use_gpu, distributed=distributed,
                                  local_dir=local_dir)

    @classmethod
    def from_manifests(cls, workdir: str, manifests: dict[str, IndexManifest], *, use_gpu: bool = False,
                       distributed: bool = False, local_dir: str | None = None) -> "MemoryIndex":
        """In this process, or (`distributed`) as the memory service, whose actors copy their
        files to `local_dir` on their node (default: Ray's temp folder)."""
        image, text = manifests["image"], manifests["text"]
        layout = [[c.path for c in s.memory_shards] for s in image.shards]
        if image.generation != text.generation or layout != [[c.path for c in s.memory_shards] for s in text.shards]:
            raise MemoryIndexError(f"the image and text indices under {storage.join(workdir, INDEX_DIR)} differ "
                              f"(generations {image.generation} and {text.generation}): an update was "
                              "interrupted or is running; re-run `reco index`")
        params = {m: manifests[m].index_param for m in MODALITIES}
        specs = [{m: manifests[m].shards[j].model_dump() for m in MODALITIES} for j in range(len(image.shards))]
        names = None
        if distributed:
            # A generation's files never change: one local copy per workdir and generation.
            copy_key = f"{hashlib.sha1(workdir.encode()).hexdigest()[:12]}-g{image.generation:05d}"
            names = [f"reco-memory-{uuid.uuid4().hex[:12]}-shard{j}" for j in range(len(specs))]
            servers = _start_actors(workdir, specs, params, use_gpu, local_dir, copy_key, names)
        else:
            if use_gpu and not gpu_available():
                log.warning("use_gpu: faiss has no GPU support or sees no GPU here; searching on CPU")
            ngpu = max(faiss.get_num_gpus(), 1) if gpu_available() else 1
            servers = [ShardServer(workdir, spec, params, use_gpu, gpu=j % ngpu) for j, spec in enumerate(specs)]
        return cls(workdir, manifests, servers, distributed, names)

    def _call(self, method: str, calls: list[tuple[int, tuple]]) -> list:
        """Call `method` on the given servers (in parallel when they are actors)."""
        if not self.distributed:
            return [getattr(self.servers[j], method)(*args) for j, args in calls]
        attempt = 1
        while True:
            try:
                return ray.get([getattr(self.servers[j], method).remote(*args) for j, args in calls])
            except ray.exceptions.RayActorError as err:
                # Ray restarts the actor and retries calls in flight; this covers a death
                # that outlasted those retries (a restart still loading its shard).
                if attempt == CALL_ATTEMPTS:
                    raise MemoryIndexError(f"a memory shard actor of {self.workdir} died and did not come back "
                                           f"({type(err).__name__}); check the Ray logs of its node") from err
                log.warning("memory shard actor died during %s (%s); retrying", method, type(err).__name__)
                time.sleep(2 ** attempt)
                attempt += 1

    def _check(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")

    def search(self, queries: np.ndarray, k: int, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n,k) float32 best first, ids (n,k) int64; -1 and -inf where fewer than k exist)."""
        return self._search(queries, k, modality, None)

    def search_compared(self, queries: np.ndarray, k: int, modality: Modality,
                        images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`search`, and the cosine (n,k) of images[i] with the image embedding of each pair
        found for queries[i] (-inf where none was): the exact test for near-duplicates,
        made by the shards that hold the embeddings."""
        return self._search(queries, k, modality, images)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"queries must have shape (n, {self.d}), got {queries.shape}")
        return queries

    def _search(self, queries: np.ndarray, k: int, modality: Modality, images: np.ndarray | None) -> tuple:
        self._check(modality)
        queries = self._queries(queries)
        if images is not None:
            images = self._queries(images)
            if len(images) != len(queries):
                raise ValueError(f"{len(images)} images for {len(queries)} queries")
        if self.distributed:  # one copy in the object store for every shard, not one per call
            queries, images = ray.put(queries), None if images is None else ray.put(images)
        results = self._call("search", [(j, (queries, k, modality, images)) for j in range(len(self.servers))])
        columns = [] if images is None else [[r[2] for r in results]]
        return merge_results([r[0] for r in results], [r[1] for r in results], k, *columns)

    def fetch(self, ids: np.ndarray, modality: Modality) -> np.ndarray:
        """Embeddings of `ids` (any shape) -> ids.shape + (d,) float32; zeros where id == -1."""
        self._check(modality)
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.max() >= self.ntotal or flat.min() < -1):
            raise ValueError(f"ids must be in 0..{self.ntotal - 1} or -1, got {flat.min()}..{flat.max()}")
        out = np.zeros((flat.size, self.d), dtype=np.float32)
        valid = np.flatnonzero(flat >= 0)
        owner = self._owner[np.searchsorted(self._starts, flat[valid], side="right") - 1]
        groups = [(j, valid[owner == j]) for j in np.unique(owner)]
        parts = self._call("fetch", [(int(j), (flat[rows], modality)) for j, rows in groups])
        for (_, rows), part in zip(groups, parts):
            out[rows] = part
        return out.reshape(*ids.shape, self.d)

    def close(self) -> None:
        """Stop the service (in the process that started it) or release the memory maps."""
        if self._owns_service:
            for server in self.servers:
                ray.kill(server)
        self._servers = []


def read_manifests(workdir: str) -> dict[str, IndexManifest]:
    """Both modalities' index manifests; an error saying to run `reco index` when one is missing."""
    manifests = {}
    for modality in MODALITIES:
        manifest = IndexManifest.read(index_folder(workdir, modality))
        if manifest is None:
            raise MemoryIndexError(f"{index_folder(workdir, modality)}/{MANIFEST} is missing: "
                                   "run `reco index CONFIG` first")
        manifests[modality] = manifest
    return manifests


def memory_service(workdir: str, index: IndexConfig, *, use_gpu: bool) -> MemoryIndex | None:
    """The memory service for a stage, or None where the stage should search in-process.

    `index.service: auto` starts it when the index has several shards or the Ray cluster
    several alive nodes: then no stage process loads the whole memory. With one shard on one
    node, memory-mapping it in-process is as cheap and saves a hop."""
    manifests = read_manifests(workdir)
    if index.service == "never":
        return None
    if index.service == "auto":
        nodes = sum(n["Alive"] for n in ray.nodes()) if ray.is_initialized() else 1
        if len(manifests["image"].shards) == 1 and nodes == 1:
            return None
    return MemoryIndex.from_manifests(workdir, manifests, use_gpu=use_gpu, distributed=True,
                                      local_dir=index.local_dir)


def merge_results(scores: list[np.ndarray], ids: list[np.ndarray], k: int,
                  *columns: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The k best of several shards' results by inner product (scores, ids, and each of
    `columns`, float32 numbers given per result, in the same order); ties broken by smaller
    id so the answer does not depend on how the memory was sharded."""
    s = np.concatenate(scores, axis=1).astype(np.float32, copy=False)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    order = np.lexsort((i, -s), axis=1)[:, :k]
    merged = [np.take_along_axis(m, order, axis=1)
              for m in (s, i, *(np.concatenate(c, axis=1).astype(np.float32, copy=False) for c in columns))]
    if order.shape[1] < k:  # fewer candidates than k in all shards together
        pad = ((0, 0), (0, k - order.shape[1]))
        merged = [np.pad(m, pad, constant_values=-1 if m.dtype == np.int64 else -np.inf) for m in merged]
    return tuple(merged)


def plan_shard_actors(shards: int, nodes: list[dict], gpus: int) -> tuple[ActorResources, int, list[str]]:
    """What each shard actor reserves, the faiss threads it runs, and its node, on a cluster
    of `nodes` (`ray.nodes()` records) with `gpus` GPUs for the service (0: search on CPU).

    GPUs as `reco.shard_jobs` gives them: one per actor (a share of one where shards outnumber
    GPUs). The actors go round robin, in node-id order, over the alive nodes that can hold
    one (with GPUs where they take them, else with CPUs): Ray's SPREAD strategy is best
    effort and, on a busy cluster, may put two shards on one node while another holds none.
    CPUs: half of the smallest such node's, shared by the shards that node will hold, so the
    stage's own actors still fit beside the service. A reservation only places the actor: it
    searches with as many threads as its node has CPUs per shard it holds. Nodes that hold
    no shard (a head with no CPUs, CPU-only nodes beside GPU ones) count for neither.
    """
    kind = "GPU" if gpus else "CPU"
    hosts = sorted((n for n in nodes if n["Alive"] and n["Resources"].get(kind, 0) > 0), key=lambda n: n["NodeID"])
    if not hosts:
        raise RecoError(f"no alive node of the Ray cluster has {kind}s for the memory's shard actors")
    per_node = math.ceil(shards / len(hosts))
    cpus = min(n["Resources"].get("CPU", 0) for n in hosts)
    resources = ActorResources(actors=shards, cpus=max(cpus / 2 / per_node, 0.01),
                               gpus=min(1.0, gpus / shards) if gpus else 0.0)
    return resources, max(int(cpus // per_node), 1), [hosts[i % len(hosts)]["NodeID"] for i in range(shards)]


def _start_actors(workdir: str, specs: list[dict], params: dict[str, str], use_gpu: bool,
                  local_dir: str | None, copy_key: str, names: list[str]) -> list:
    """One actor per index shard, named `names`, spread over the nodes, restarted after a
    failure (on another node if its own is gone: the node affinity is soft)."""
    gpus = cluster_gpus() if use_gpu else 0
    if use_gpu and not gpus:
        log.warning("use_gpu: the Ray cluster has no GPUs; shard actors search on CPU")
    resources, threads, nodes = plan_shard_actors(len(specs), ray.nodes(), gpus)
    actor = ray.remote(ShardServer)
    servers = [actor.options(name=name, num_cpus=resources.cpus, num_gpus=resources.gpus,
                             max_restarts=SHARD_MAX_RESTARTS, max_task_retries=SHARD_MAX_RESTARTS,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
               .remote(workdir, spec, params, bool(resources.gpus), 0, threads, local_dir, copy_key)
               for spec, node, name in zip(specs, nodes, names)]
    # Fail here, naming the bad file, rather than at the first search.
    ray.get([s.__ray_ready__.remote() for s in servers])
    return servers


# ---------------------------------------------------------------- retrieval

def _admissible(cand: np.ndarray, image_cosines: np.ndarray | None, query_ids: np.ndarray | None,
                exclude_ids: np.ndarray | None, dedup_threshold: float) -> np.ndarray:
    """(n, w) bool: candidates that exist, are not the query's own pair, not excluded, and
    whose image is not a near-duplicate of the query's image (`image_cosines`: exact cosine,
    not the index's possibly approximate score)."""
    keep = cand >= 0
    if query_ids is not None:
        keep &= cand != query_ids[:, None]
    if exclude_ids is not None and len(exclude_ids):
        keep &= ~np.isin(cand, exclude_ids)
    if image_cosines is not None:
        keep &= image_cosines <= dedup_threshold
    return keep


def searched_modality(query: Modality, search: Search) -> Modality:
    """The memory index a query searches: its own modality's (uni, RECO) or the other's (cross)."""
    return query if search == "uni" else OTHER[query]


def fused_modality(query: Modality, fuse: Fuse) -> Modality:
    """Which embeddings of its neighbour pairs a query is fused with: the other modality's
    (cross, and mean over the same tokens), or its own (uni)."""
    return query if fuse == "uni" else OTHER[query]


def retrieve(memory: MemoryIndex, queries: np.ndarray, modality: Modality, k: int, *,
             query_images: np.ndarray | None = None, query_ids: np.ndarray | None = None,
             dedup_threshold: float = 0.95, exclude_ids: np.ndarray | None = None,
             margin: int = 10, search: Search = "uni", fuse: Fuse = "cross") -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, k) int64, embeddings (n, k, d) float32) of the queries' neighbour pairs, best
    first; -1 and zeros where fewer than k admissible exist. RECO's default is uni-modal
    search (`searched_modality`), cross-modal gather (`fused_modality`).

    Searches k + margin and doubles the width for the queries that still lack k after
    dropping their own pair (`query_ids`), `exclude_ids`, and image near-duplicates
    (`query_images`, cosine above `dedup_threshold`), until k remain or all was searched.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    out = np.full((n, k), -1, dtype=np.int64)
    todo = np.arange(n)
    width = k + margin
    searched = searched_modality(modality, search)
    while todo.size:
        width = min(width, memory.ntotal)
        if query_images is None:
            (_, cand), image_cosines = memory.search(queries[todo], width, searched), None
        else:
            _, cand, image_cosines = memory.search_compared(queries[todo], width, searched, query_images[todo])
        keep = _admissible(cand, image_cosines, None if query_ids is None else query_ids[todo], exclude_ids,
                           dedup_threshold)
        done = (keep.sum(axis=1) >= k) | (width >= memory.ntotal)
        # The admissible candidates first, each group in rank order; then the first k.
        order = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(cand[done], order, axis=1)
        picked[~np.take_along_axis(keep[done], order, axis=1)] = -1
        out[todo[done], :picked.shape[1]] = picked
        todo = todo[~done]
        width *= 2
    return out, memory.fetch(out, fused_modality(modality, fuse))


NEAR_DUPLICATE_BATCH = 1024
"""Test images judged at once: bounds the (batch, k, d) block of candidates' embeddings."""


def near_duplicate_ids(memory: MemoryIndex, images: np.ndarray, threshold: float, k: int = 16) -> np.ndarray:
    """Sorted unique memory ids whose image has cosine > threshold with any of `images`.

    The index proposes candidates; each is judged on its stored image embedding (exact
    cosine), as `retrieve` judges duplicates, not on the index's score, which a compressed
    (PQ) index only approximates.
    """
    images = np.ascontiguousarray(images, np.float32)
    found = [np.zeros(0, np.int64)]
    for start in range(0, len(images), NEAR_DUPLICATE_BATCH):
        found.append(_near_duplicates(memory, images[start:start + NEAR_DUPLICATE_BATCH], threshold, k))
    return np.unique(np.concatenate(found))


def _near_duplicates(memory: MemoryIndex, images: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """A test image can have more near-copies than k: rows whose k-th candidate is still
    above the threshold (exactly or by the index) are searched again with k four times larger."""
    found = [np.zeros(0, np.int64)]
    rows = np.arange(len(images))
    while rows.size:
        k = min(k, memory.ntotal)
        scores, ids, cosines = memory.search_compared(images[rows], k, "image", images[rows])
        hit = (cosines > threshold) & (ids >= 0)
        found.append(ids[hit])
        if k >= memory.ntotal:
            break
        rows, k = rows[hit[:, -1] | (scores[:, -1] > threshold)], k * 4
    return np.concatenate(found)


def neighbour_embeddings(memory: MemoryIndex, queries: np.ndarray, modality: Modality, k: int,
                         exclude: np.ndarray, threshold: float, search: Search = "uni",
                         fuse: Fuse = "cross") -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, k), embeddings (n, k, d)) of the queries' neighbours as the fusion model was
    trained with them (`search`, `fuse`), leaving out `exclude` and, for image queries, the
    images' near-duplicates; id -1 marks a missing neighbour."""
    return retrieve(memory, np.ascontiguousarray(queries, np.float32), modality, k,
                    query_images=queries if modality == "image" else None,
                    dedup_threshold=threshold, exclude_ids=exclude, search=search, fuse=fuse)

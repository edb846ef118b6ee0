"""`reco index`: the Parquet memory -> sharded faiss indices per modality (DESIGN.md section 3).

The steps autofaiss runs on pyspark, as Ray tasks:

1. train (once): autofaiss chooses the key for `index.max_memory` (memory-mappable keys,
   as autofaiss does for its distributed mode) and the training size for it; the index
   is trained on rows sampled at random over the whole memory (autofaiss would take the
   first rows). Held-out rows become the recall queries. `_training.json` is written last.
2. pieces: one Ray task per memory shard adds its vectors, with their memory ids, to a
   copy of the trained index, writes the shard's embeddings as `.npy` (fast fetch by id),
   and computes the exact top-10 of the recall queries over the shard. A piece folder
   is keyed by the memory shard and the training, and its `_done.json` is written last,
   so an interrupted run redoes only the missing pieces.
3. merge: one Ray task per index shard merges its pieces into the trained index (or into
   the shard's previous file, when memory shards were appended) and writes a new file.
4. finish: autofaiss tunes nprobe/efSearch on the first shard, recall@10 against exact
   search is measured through the same search path as `MemoryIndex`, and the two manifests
   are written last. Files the new manifests no longer name are then removed.

A re-run with no new memory shards does nothing; with new shards it adds only those,
without retraining (unless `index.retrain`).
"""

from __future__ import annotations

import io
import logging
import time
import uuid

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray
from autofaiss.external.optimize import (get_optimal_hyperparameters, get_optimal_index_keys_v2,
                                         get_optimal_train_size)
from autofaiss.indices.index_utils import set_search_hyperparameters
from autofaiss.indices.training import create_empty_index
from autofaiss.utils.cast import cast_memory_to_bytes
from pydantic import BaseModel

from reco import storage
from reco.cluster import init_ray
from reco.config import ConfigError, RecoConfig
from reco.contracts import (INDEX_DIR, INDEX_EMBEDDINGS_DIR, MANIFEST, MEMORY_DIR, MODALITIES, CoveredShard,
                            IndexManifest, IndexShard, MemoryManifest, MemoryShard, SkipStats, embeddings_to_numpy,
                            index_folder)
from reco.depends import stage_depends
from reco.search import (MemoryIndex, MemoryIndexError, gpu_available, load_npy, merge_results, read_index,
                         write_index)

log = logging.getLogger(__name__)

TRAINED_INDEX = "_training.json"
PIECES_DIR = "_pieces"
DONE = "_done.json"
RECALL_K = 10
MIN_NEIGHBOURS = 20
"""autofaiss's tuning keeps nprobe high enough that 99% of this many neighbours come back."""


class TrainedIndex(BaseModel):
    """`<workdir>/index/_training.json`: the trained empty indices every build adds to."""
    train_id: str
    key: str
    d: int
    memory_model: str
    memory_pretrained: str | None
    trained_on_rows: int
    train_sample: dict[str, int]
    recall_queries: dict[str, int]
    seconds: float


class Piece(BaseModel):
    """A piece's `_done.json`: the vectors one memory shard added, per modality."""
    memory_shard: str
    ntotal: dict[str, int]
    skipped: dict[str, SkipStats]


def build_index(cfg: RecoConfig) -> dict[str, IndexManifest]:
    """Build or update `<workdir>/index/{image,text}/`; returns the two manifests."""
    memory = _read_memory(cfg.path(MEMORY_DIR))
    _validate(cfg, memory)
    depends = stage_depends(cfg, "index")
    previous = _previous(cfg, memory)
    if previous is not None and _up_to_date(cfg, previous, memory):
        log.info("index: up to date with the %d memory shards; nothing to do", len(memory.shards))
        _record(cfg, previous, depends)
        return previous
    init_ray()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    trained = _trained_index(cfg, memory)
    seconds["train"] = time.perf_counter() - t
    if memory.total_rows > cfg.index.growth_warning * trained.trained_on_rows:
        log.warning("index: the memory has %d rows, %.1fx the %d the index was trained on; "
                    "consider index.retrain=true", memory.total_rows,
                    memory.total_rows / trained.trained_on_rows, trained.trained_on_rows)
    # Append to the previous shards only if they are one consistent generation of this trained index
    # with this many shards; otherwise every memory shard is re-added to the trained index.
    reuse = previous if (previous is not None and previous["image"].train_id == trained.train_id
                         and previous["image"].generation == previous["text"].generation
                         and len(previous["image"].shards) == cfg.index.shards) else None
    groups = _assign(cfg.index.shards, memory, reuse)
    covered = {c.path for s in reuse["image"].shards for c in s.memory_shards} if reuse else set()
    t = time.perf_counter()
    pieces = _add_pieces(cfg, memory, trained, [s for s in memory.shards if s.path not in covered])
    seconds["add"] = time.perf_counter() - t
    generation = 1 + max((m.generation for m in (previous or {}).values()), default=0)
    t = time.perf_counter()
    drafts = {m: _merge_modality(cfg, m, memory, trained, groups, reuse, pieces, generation) for m in MODALITIES}
    for draft in drafts.values():
        draft.depends = depends
    seconds["merge"] = time.perf_counter() - t
    manifests = _finish(cfg, drafts, trained, seconds)
    _remove_stale(cfg, manifests)
    return manifests


def _record(cfg: RecoConfig, manifests: dict[str, IndexManifest], depends: dict) -> None:
    """Record settings that changed nothing (e.g. a larger max_memory choosing the same key),
    so that `reco run` skips the index next time; the generation stays."""
    for modality in reversed(MODALITIES):  # image last, as in _finish
        if manifests[modality].depends != depends:
            manifests[modality].depends = depends
            manifests[modality].write(index_folder(cfg.workdir, modality))


def _read_memory(folder: str) -> MemoryManifest:
    """The memory manifest, with every shard checked: present, the manifest's width and rows."""
    memory = MemoryManifest.read(folder)
    if memory is None:
        raise MemoryIndexError(f"{storage.join(folder, MANIFEST)} is missing: run `reco embed CONFIG` first")
    if memory.total_rows == 0 or not memory.shards:
        raise MemoryIndexError(f"the memory at {folder} is empty (0 rows): nothing to index; "
                               "check the embed stage's skipped counts in its manifest")
    for shard in memory.shards:
        _check_shard(storage.join(folder, shard.path), shard, memory.d)
    return memory


def _check_shard(url: str, shard: MemoryShard, d: int) -> None:
    if not storage.exists(url):
        raise MemoryIndexError(f"memory shard {url} named in the memory manifest is missing; "
                               "re-run `reco embed` to rewrite it")
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    for column in ("image_embedding", "text_embedding"):
        if column not in schema.names:
            raise MemoryIndexError(f"memory shard {url} has no {column} column")
        width = getattr(schema.field(column).type, "list_size", None)
        if width != d:
            raise MemoryIndexError(f"memory shard {url}: {column} has width {width}, the memory "
                                   f"manifest says d={d}; re-embed it with the manifest's model")
    if meta.num_rows != shard.rows:
        raise MemoryIndexError(f"memory shard {url} has {meta.num_rows} rows, the memory manifest "
                               f"says {shard.rows}; re-run `reco embed`")


def _empty_index(d: int, key: str, metric: str) -> faiss.Index:
    """The untrained index for `key`; flat indices get an id map so they take memory ids."""
    index = create_empty_index(d, key, metric)
    if faiss.try_extract_index_ivf(index) is None and isinstance(index, faiss.IndexFlat):
        return faiss.IndexIDMap(index)
    return index


def _validate(cfg: RecoConfig, memory: MemoryManifest) -> None:
    """Every config error before any work: budget, shards, key, search parameters."""
    try:
        cast_memory_to_bytes(cfg.index.max_memory)
    except ValueError:
        raise ConfigError(f"index.max_memory={cfg.index.max_memory!r}: expected a size like 4GB or 512MB") from None
    if len(memory.shards) < cfg.index.shards:
        raise ConfigError(f"index.shards={cfg.index.shards} but the memory has only {len(memory.shards)} "
                          f"shards: set index.shards <= {len(memory.shards)}")
    key = cfg.index.key or "IVF1,Flat"
    try:
        index = _empty_index(memory.d, key, cfg.index.metric)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"index.key={key!r} is not a faiss index factory key ({str(err).splitlines()[0]}); "
                          "e.g. IVF1024,Flat or OPQ64_256,IVF4096,PQ64x8") from None
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        raise ConfigError(f"index.key={key!r}: only IVF indices and Flat can be built in pieces and "
                          "merged (HNSW and bare PQ cannot); use e.g. IVF1024,Flat or leave it unset")
    if cfg.index.index_param:
        try:
            set_search_hyperparameters(index, cfg.index.index_param)
        except RuntimeError as err:
            raise ConfigError(f"index.index_param={cfg.index.index_param!r} does not apply to {key} "
                              f"({str(err).splitlines()[0]}); e.g. nprobe=64") from None


def _previous(cfg: RecoConfig, memory: MemoryManifest) -> dict[str, IndexManifest] | None:
    manifests = {m: IndexManifest.read(index_folder(cfg.workdir, m)) for m in MODALITIES}
    if any(m is None for m in manifests.values()):
        return None
    image = manifests["image"]
    known = {s.path: s for s in memory.shards}
    for covered in (c for s in image.shards for c in s.memory_shards):
        shard = known.get(covered.path)
        if shard is None or (shard.rows, shard.id_start) != (covered.rows, covered.id_start):
            if cfg.index.retrain:
                return None
            raise ConfigError(f"memory shard {covered.path} changed since the index was built (or is gone): "
                              "rebuild it with index.retrain=true")
    return manifests


def _up_to_date(cfg: RecoConfig, previous: dict[str, IndexManifest], memory: MemoryManifest) -> bool:
    image = previous["image"]
    covered = sorted(c.path for s in image.shards for c in s.memory_shards)
    return (covered == sorted(s.path for s in memory.shards)
            and len(image.shards) == cfg.index.shards
            and cfg.index.key in (None, image.key)
            and cfg.index.index_param in (None, image.index_param)
            and all(m.generation == image.generation for m in previous.values()))


# ---- 1. training ---------------------------------------------------------------------------

def _trained_index(cfg: RecoConfig, memory: MemoryManifest) -> TrainedIndex:
    """The trained empty indices: reused if they fit the memory and config, else trained."""
    url = cfg.path(INDEX_DIR, TRAINED_INDEX)
    if storage.exists(url):
        done = TrainedIndex.model_validate(storage.read_json(url))
        same_memory = (done.memory_model, done.memory_pretrained, done.d) == (memory.model, memory.pretrained, memory.d)
        same_key = cfg.index.key in (None, done.key)
        grown = done.trained_on_rows != memory.total_rows
        if same_memory and same_key and not (cfg.index.retrain and grown):
            return done
        if not cfg.index.retrain:
            what = "memory was re-embedded with another model" if not same_memory else f"key is {done.key}"
            raise ConfigError(f"the index at {cfg.path(INDEX_DIR)} was trained for another setup (its {what}): "
                              "set index.retrain=true to retrain and rebuild it")
    return _train_index(cfg, memory)


def _choose_key(cfg: RecoConfig, memory: MemoryManifest) -> str:
    if cfg.index.key:
        return cfg.index.key
    # Memory-mappable keys only, as autofaiss itself does when it builds in pieces: they
    # are the IVF family, which takes ids and merges.
    keys = get_optimal_index_keys_v2(memory.total_rows, memory.d, cfg.index.max_memory,
                                     should_be_memory_mappable=True, use_gpu=cfg.index.use_gpu)
    if not keys:
        raise ConfigError(f"index.max_memory={cfg.index.max_memory}: autofaiss finds no index for "
                          f"{memory.total_rows} vectors of d={memory.d} in that budget; raise it")
    return keys[0]


def _train_index(cfg: RecoConfig, memory: MemoryManifest) -> TrainedIndex:
    t = time.perf_counter()
    key = _choose_key(cfg, memory)
    train_id = uuid.uuid4().hex[:12]
    index = _empty_index(memory.d, key, cfg.index.metric)
    n = memory.total_rows
    n_train = 0 if index.is_trained else min(cfg.index.train_size or get_optimal_train_size(n, key, None, memory.d), n)
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(n, size=min(n, n_train + cfg.index.recall_queries), replace=False)
    train_ids, query_ids = chosen[:n_train], chosen[n_train:]
    if len(query_ids) == 0:  # a memory smaller than the training sample: no row is held out
        query_ids = rng.choice(n, size=min(n, cfg.index.recall_queries), replace=False)
    vectors = _read_rows(cfg, memory, np.concatenate([train_ids, query_ids]))
    sizes, queries = {}, {}
    for modality in MODALITIES:
        x = vectors[modality]
        ok = _valid(x)
        train, queries[modality] = x[:n_train][ok[:n_train]], x[n_train:][ok[n_train:]]
        fitted = _fit(_empty_index(memory.d, key, cfg.index.metric), train, cfg.index.use_gpu)
        sizes[modality] = len(train)
        write_index(fitted, _trained_url(cfg, modality, train_id))
        _save_npy(_queries_url(cfg, modality, train_id), queries[modality])
    log.info("index: trained %s on %d random rows of %d", key, n_train, n)
    trained = TrainedIndex(train_id=train_id, key=key, d=memory.d, memory_model=memory.model,
                           memory_pretrained=memory.pretrained, trained_on_rows=n, train_sample=sizes,
                           recall_queries={m: len(q) for m, q in queries.items()},
                           seconds=time.perf_counter() - t)
    storage.write_json_atomic(cfg.path(INDEX_DIR, TRAINED_INDEX), trained.model_dump(mode="json"))
    return trained


def _fit(index: faiss.Index, train: np.ndarray, use_gpu: bool) -> faiss.Index:
    if index.is_trained:
        return index
    if len(train) == 0:
        raise MemoryIndexError("every sampled training vector is NaN or zero: the memory's embeddings are unusable")
    ivf = faiss.try_extract_index_ivf(index)
    if use_gpu and ivf is not None and gpu_available():
        # k-means on the GPUs: faiss's recipe, the trained index itself stays on the CPU.
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    index.train(train)
    return index


def _read_rows(cfg: RecoConfig, memory: MemoryManifest, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The embeddings of the given memory ids (in that order), read by one Ray task per shard."""
    starts = np.array([s.id_start for s in memory.shards])
    owner = np.searchsorted(starts, ids, side="right") - 1
    tasks = {p: _read_shard_rows.remote(storage.join(cfg.path(MEMORY_DIR), memory.shards[p].path),
                                        ids[owner == p] - memory.shards[p].id_start)
             for p in np.unique(owner)}
    results = dict(zip(tasks, ray.get(list(tasks.values()))))
    out = {}
    for modality in MODALITIES:
        x = np.empty((len(ids), memory.d), dtype=np.float32)
        for p, rows in results.items():
            x[owner == p] = rows[modality]
        out[modality] = x
    return out


@ray.remote(num_cpus=1)
def _read_shard_rows(url: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    table = storage.read_parquet(url, ["image_embedding", "text_embedding"])
    return {m: embeddings_to_numpy(table[f"{m}_embedding"].take(rows)) for m in MODALITIES}


def _valid(x: np.ndarray) -> np.ndarray:
    """Rows that can be indexed: finite and not all zero."""
    return np.isfinite(x).all(axis=1) & (np.abs(x).max(axis=1) > 0)


def _trained_url(cfg: RecoConfig, modality: str, train_id: str) -> str:
    return storage.join(index_folder(cfg.workdir, modality), f"trained-{train_id}.index")


def _queries_url(cfg: RecoConfig, modality: str, train_id: str) -> str:
    return storage.join(index_folder(cfg.workdir, modality), f"queries-{train_id}.npy")


def _save_npy(url: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    storage.write_bytes_atomic(url, buf.getvalue())


# ---- 2. pieces: one Ray task per new memory shard ------------------------------------------

def _piece_folder(cfg: RecoConfig, train_id: str, shard_path: str) -> str:
    return cfg.path(INDEX_DIR, PIECES_DIR, train_id, shard_path.rsplit(".", 1)[0])


def _embeddings_name(shard_path: str) -> str:
    return f"{INDEX_EMBEDDINGS_DIR}/{shard_path.rsplit('.', 1)[0]}.npy"


def _add_pieces(cfg: RecoConfig, memory: MemoryManifest, trained: TrainedIndex,
                shards: list[MemoryShard]) -> dict[str, Piece]:
    """Add each memory shard to a copy of the trained index; finished pieces are reused."""
    done, todo = {}, []
    for shard in shards:
        marker = storage.join(_piece_folder(cfg, trained.train_id, shard.path), DONE)
        if storage.exists(marker):
            done[shard.path] = Piece.model_validate(storage.read_json(marker))
        else:
            todo.append(shard)
    if todo:
        # One object each, shared by every task (Ray resolves only top-level references).
        empty = ray.put({m: faiss.serialize_index(read_index(_trained_url(cfg, m, trained.train_id)))
                           for m in MODALITIES})
        queries = ray.put({m: np.asarray(load_npy(_queries_url(cfg, m, trained.train_id)))
                           for m in MODALITIES})
        refs = [_add_piece.remote(cfg.workdir, storage.join(cfg.path(MEMORY_DIR), s.path), s.model_dump(),
                                  empty, queries, _piece_folder(cfg, trained.train_id, s.path))
                for s in todo]
        log.info("index: adding %d memory shards (%d already done)", len(todo), len(done))
        for piece in ray.get(refs):
            done[piece.memory_shard] = piece
    return done


@ray.remote(num_cpus=1)
def _add_piece(workdir: str, url: str, shard_json: dict, trained: dict, queries: dict, out: str) -> Piece:
    faiss.omp_set_num_threads(1)  # one core per task; Ray runs as many tasks as cores
    shard = MemoryShard.model_validate(shard_json)
    table = storage.read_parquet(url, ["id", "image_embedding", "text_embedding"])
    ids = table["id"].to_numpy()
    if not np.array_equal(ids, np.arange(shard.id_start, shard.id_end)):
        raise MemoryIndexError(f"memory shard {url}: ids are not {shard.id_start}..{shard.id_end - 1} "
                               "as the memory manifest says; re-run `reco embed`")
    piece = Piece(memory_shard=shard.path, ntotal={}, skipped={})
    exact = {}
    for modality in MODALITIES:
        column = table[f"{modality}_embedding"]
        raw = embeddings_to_numpy(column, dtype=column.type.value_type.to_pandas_dtype())
        _save_npy(storage.join(index_folder(workdir, modality), _embeddings_name(shard.path)), raw)
        x = raw.astype(np.float32)
        ok = _valid(x)
        piece.skipped[modality] = _count_skipped(x, ok, ids, url)
        index = faiss.deserialize_index(trained[modality])
        index.add_with_ids(x[ok], ids[ok])
        write_index(index, storage.join(out, f"{modality}.index"))
        piece.ntotal[modality] = int(index.ntotal)
        exact[modality] = _exact_topk(queries[modality], x[ok], ids[ok])
    _save_npz(storage.join(out, "exact.npz"), exact)
    storage.write_json_atomic(storage.join(out, DONE), piece.model_dump(mode="json"))
    return piece


def _count_skipped(x: np.ndarray, ok: np.ndarray, ids: np.ndarray, url: str) -> SkipStats:
    stats = SkipStats()
    for row in np.flatnonzero(~ok):
        stats.add(str(ids[row]), "non-finite vector" if not np.isfinite(x[row]).all() else "zero vector", url)
    return stats


def _exact_topk(queries: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int = RECALL_K) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k of the queries over these vectors (faiss.knn)."""
    scores, rows = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def _save_npz(url: str, exact: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{f"{m}_{part}": a for m, pair in exact.items() for part, a in zip(("scores", "ids"), pair)})
    storage.write_bytes_atomic(url, buf.getvalue())


def _load_npz(url: str, modality: str) -> tuple[np.ndarray, np.ndarray]:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        return data[f"{modality}_scores"], data[f"{modality}_ids"]


# ---- 3. merge: one Ray task per changed index shard ----------------------------------------

def _assign(n: int, memory: MemoryManifest, reuse: dict[str, IndexManifest] | None) -> list[list[MemoryShard]]:
    """Memory shards per index shard. A fresh build splits them into n contiguous runs; an
    update keeps the previous assignment and gives each new shard to the smallest group."""
    if reuse is None:
        return [list(g) for g in np.array_split(np.array(memory.shards, dtype=object), n)]
    known = {s.path: s for s in memory.shards}
    groups = [[known[c.path] for c in s.memory_shards] for s in reuse["image"].shards]
    covered = {s.path for g in groups for s in g}
    for shard in memory.shards:
        if shard.path not in covered:
            min(groups, key=lambda g: sum(s.rows for s in g)).append(shard)
    return groups


def _merge_modality(cfg: RecoConfig, modality: str, memory: MemoryManifest, trained: TrainedIndex,
           groups: list[list[MemoryShard]], reuse: dict[str, IndexManifest] | None,
           pieces: dict[str, Piece], generation: int) -> IndexManifest:
    """The modality's manifest before tuning, its changed shards merged and written."""
    folder = index_folder(cfg.workdir, modality)
    before = reuse[modality].shards if reuse else [None] * len(groups)
    refs = {}
    for j, (group, old) in enumerate(zip(groups, before)):
        new = [s for s in group if s.path in pieces]
        if new:
            base = storage.join(folder, old.path) if old else _trained_url(cfg, modality, trained.train_id)
            parts = [storage.join(_piece_folder(cfg, trained.train_id, s.path), f"{modality}.index") for s in new]
            refs[j] = _merge_shard.remote(base, parts, storage.join(folder, f"shard-{j:05d}-g{generation:05d}.index"))
    merged = dict(zip(refs, ray.get(list(refs.values()))))
    shards = []
    for j, (group, old) in enumerate(zip(groups, before)):
        if j not in merged:
            shards.append(old)
            continue
        ntotal, size = merged[j]
        covered = [CoveredShard(path=s.path, rows=s.rows, id_start=s.id_start, id_end=s.id_end,
                                embeddings=_embeddings_name(s.path)) for s in group]
        shards.append(IndexShard(path=f"shard-{j:05d}-g{generation:05d}.index", ntotal=ntotal, bytes=size,
                                 memory_shards=covered))
    skipped = reuse[modality].skipped.model_copy(deep=True) if reuse else SkipStats()
    for piece in pieces.values():
        skipped.merge(piece.skipped[modality])
    exact = _merge_exact(cfg, modality, trained, reuse, pieces, generation)
    return IndexManifest(
        modality=modality, key=trained.key, index_param="", metric=cfg.index.metric, d=memory.d,
        generation=generation, train_id=trained.train_id, trained_on_rows=trained.trained_on_rows,
        train_sample=trained.train_sample[modality], memory_model=memory.model,
        memory_pretrained=memory.pretrained, shards=shards, total_rows=memory.total_rows,
        ntotal=sum(s.ntotal for s in shards), skipped=skipped, recall_at_10=None,
        recall_queries=trained.recall_queries[modality], exact=exact)


@ray.remote(num_cpus=1)
def _merge_shard(base: str, pieces: list[str], out: str) -> tuple[int, int]:
    index = read_index(base)
    for url in pieces:
        index.merge_from(read_index(url), 0)
    return int(index.ntotal), write_index(index, out)


def _merge_exact(cfg: RecoConfig, modality: str, trained: TrainedIndex, reuse: dict[str, IndexManifest] | None,
                 pieces: dict[str, Piece], generation: int) -> str:
    """Exact top-10 of the recall queries over the covered memory: the previous build's,
    merged with the new pieces'. Saved as `exact-g<generation>.npz`."""
    folder = index_folder(cfg.workdir, modality)
    parts = [_load_npz(storage.join(folder, reuse[modality].exact), modality)] if reuse else []
    parts += [_load_npz(storage.join(_piece_folder(cfg, trained.train_id, p), "exact.npz"), modality)
              for p in pieces]
    scores, ids = merge_results([p[0] for p in parts], [p[1] for p in parts], RECALL_K)
    name = f"exact-g{generation:05d}.npz"
    _save_npz(storage.join(folder, name), {modality: (scores, ids)})
    return name


# ---- 4. finish: tune, measure, write manifests last ----------------------------------------

def _finish(cfg: RecoConfig, drafts: dict[str, IndexManifest], trained: TrainedIndex,
            seconds: dict[str, float]) -> dict[str, IndexManifest]:
    t = time.perf_counter()
    for modality, draft in drafts.items():
        draft.index_param = cfg.index.index_param or _tune(cfg, draft)
    seconds["tune"] = time.perf_counter() - t
    t = time.perf_counter()
    memory = MemoryIndex.from_manifests(cfg.workdir, drafts)
    try:
        for modality, draft in drafts.items():
            draft.recall_at_10 = _recall(cfg, memory, draft, trained)
    finally:
        memory.close()
    seconds["recall"] = time.perf_counter() - t
    for modality in reversed(MODALITIES):  # MemoryIndex.open reads image first: write it last
        drafts[modality].seconds = dict(seconds)
        drafts[modality].write(index_folder(cfg.workdir, modality))
        log.info("index %s: %s, %d vectors in %d shards, recall@10 %.3f (%s)", modality, drafts[modality].key,
                 drafts[modality].ntotal, len(drafts[modality].shards), drafts[modality].recall_at_10,
                 drafts[modality].index_param or "exact")
    return drafts


def _tune(cfg: RecoConfig, draft: IndexManifest) -> str:
    """autofaiss's nprobe/efSearch choice, on the first shard (it holds the lowest ids,
    which autofaiss's tuning reads back as its queries)."""
    if draft.key == "Flat":
        return ""
    index = read_index(storage.join(index_folder(cfg.workdir, draft.modality), draft.shards[0].path), mmap=True)
    return get_optimal_hyperparameters(index, draft.key, max_speed_ms=cfg.index.max_query_time_ms,
                                       min_nearest_neighbors_to_retrieve=MIN_NEIGHBOURS)


def _recall(cfg: RecoConfig, memory: MemoryIndex, draft: IndexManifest, trained: TrainedIndex) -> float:
    folder = index_folder(cfg.workdir, draft.modality)
    queries = np.asarray(load_npy(_queries_url(cfg, draft.modality, trained.train_id)))
    _, exact = _load_npz(storage.join(folder, draft.exact), draft.modality)
    _, found = memory.search(queries, RECALL_K, draft.modality)
    return index_recall(found, exact)


def index_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact neighbours (ignoring -1) that were found."""
    hits = [len(set(f[f >= 0]) & set(e[e >= 0])) / max((e >= 0).sum(), 1) for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 1.0


def _remove_stale(cfg: RecoConfig, manifests: dict[str, IndexManifest]) -> None:
    """After the manifests: files no manifest names (a reader still on the previous
    generation keeps its open files on POSIX filesystems) and the pieces."""
    train_id = manifests["image"].train_id
    for modality, manifest in manifests.items():
        folder = index_folder(cfg.workdir, modality)
        keep = {s.path for s in manifest.shards} | {manifest.exact, f"trained-{train_id}.index",
                                                     f"queries-{train_id}.npy", MANIFEST}
        for url in storage.list_files(folder):
            if url.rsplit("/", 1)[-1] not in keep:
                storage.remove(url)
    storage.remove(cfg.path(INDEX_DIR, PIECES_DIR), recursive=True)

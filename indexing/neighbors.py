"""`reco neighbors`: each training pair's k neighbours, precomputed (DESIGN.md sections 1, 3).

Uni-modal search, cross-modal fusion: a pair's image retrieves its nearest memory images
and keeps their TEXTS (`nn_text`); its caption retrieves its nearest memory texts and
keeps their IMAGES (`nn_image`). The pair itself (by id) and every memory pair whose
image nearly copies the query's image are left out of both; identical captions are not
duplicates. The unit of work is one input shard: a Ray Data actor holding the memory
searches it and writes one output shard, so a re-run only redoes missing shards; the
manifest is written last.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import ray
from pydantic import BaseModel, Field
from tqdm import tqdm

from reco import storage
from reco.cluster import cluster_cpus, cluster_gpus, init_ray
from reco.config import ConfigError, RecoConfig
from reco.schema import MANIFEST, MEMORY_DIR, Manifest, MemoryManifest, embedding_array, embeddings_to_numpy

if TYPE_CHECKING:  # indexing.memory loads faiss: not needed by readers of the shards (training)
    from indexing.memory import Memory

log = logging.getLogger(__name__)

NEIGHBORS_DIR = "neighbors"
Modality = Literal["image", "text"]
META_KEY = b"reco.neighbors"
OTHER: dict[str, Modality] = {"image": "text", "text": "image"}


# ---------------------------------------------------------------- on-disk contract

def neighbors_schema(d: int, k: int, dtype: Literal["float16", "float32"] = "float16") -> pa.Schema:
    """One row per query pair; nn_text[j] is the text of pair nn_text_ids[j] (found by
    image->image search), nn_image[j] the image of pair nn_image_ids[j] (text->text)."""
    vec = pa.list_(pa.float16() if dtype == "float16" else pa.float32(), d)
    return pa.schema([
        ("id", pa.int64()), ("key", pa.string()),
        ("image_embedding", vec), ("text_embedding", vec),
        ("nn_text", pa.list_(vec, k)), ("nn_image", pa.list_(vec, k)),
        ("nn_image_ids", pa.list_(pa.int64(), k)), ("nn_text_ids", pa.list_(pa.int64(), k)),
    ])


def nested_array(x: np.ndarray, dtype: Literal["float16", "float32"] = "float16") -> pa.FixedSizeListArray:
    """(n, k, d) array -> fixed_size_list<fixed_size_list<dtype>[d]>[k] column."""
    n, k, d = x.shape
    return pa.FixedSizeListArray.from_arrays(embedding_array(x.reshape(n * k, d), dtype), k)


def nested_to_numpy(column: pa.ChunkedArray | pa.FixedSizeListArray, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<fixed_size_list<float>[d]>[k] column -> (n, k, d) array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    k = column.type.list_size
    return embeddings_to_numpy(column.flatten(), dtype).reshape(len(column), k, -1)


def neighbors_table(ids: np.ndarray, keys: list[str], image: np.ndarray, text: np.ndarray,
                    nn_text_ids: np.ndarray, nn_text: np.ndarray, nn_image_ids: np.ndarray,
                    nn_image: np.ndarray, dtype: Literal["float16", "float32"] = "float16") -> pa.Table:
    k = nn_text_ids.shape[1]
    ids_col = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(np.int64)), k)  # noqa: E731
    return pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array(keys, pa.string()),
        embedding_array(image, dtype), embedding_array(text, dtype),
        nested_array(nn_text, dtype), nested_array(nn_image, dtype),
        ids_col(nn_image_ids), ids_col(nn_text_ids),
    ], schema=neighbors_schema(image.shape[1], k, dtype))


class NeighborsShard(BaseModel):
    path: str
    """File name relative to `<workdir>/neighbors/<split>/`."""
    rows: int
    source: str
    """The input (memory-format) shard its queries come from."""
    short: int = 0
    """Queries with fewer than k admissible neighbours in a modality (padded: id -1, zeros)."""
    seconds: float = 0.0


class NeighborsManifest(Manifest):
    split: str
    input: str
    model: str
    pretrained: str | None
    d: int
    k: int
    dtype: Literal["float16", "float32"]
    dedup_threshold: float
    shards: list[NeighborsShard] = Field(default_factory=list)
    total_rows: int = 0
    short: int = 0


# ---------------------------------------------------------------- retrieval

def _admissible(memory: "Memory", cand: np.ndarray, query_images: np.ndarray | None,
                query_ids: np.ndarray | None, exclude_ids: np.ndarray | None,
                dedup_threshold: float) -> np.ndarray:
    """(n, w) bool: candidates that exist, are not the query's own pair, not excluded, and
    whose image is not a near-duplicate of the query's image (exact cosine, not the index's
    possibly approximate score)."""
    keep = cand >= 0
    if query_ids is not None:
        keep &= cand != query_ids[:, None]
    if exclude_ids is not None and len(exclude_ids):
        keep &= ~np.isin(cand, exclude_ids)
    if query_images is not None:
        images = memory.fetch(np.where(keep, cand, -1), "image")
        keep &= np.einsum("nd,nwd->nw", query_images.astype(np.float32), images) <= dedup_threshold
    return keep


def retrieve(memory: "Memory", queries: np.ndarray, modality: Modality, k: int, *,
             query_images: np.ndarray | None = None, query_ids: np.ndarray | None = None,
             dedup_threshold: float = 0.95, exclude_ids: np.ndarray | None = None,
             margin: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Uni-modal search, cross-modal gather: (ids (n, k) int64, embeddings (n, k, d) float32)
    of the other modality, best first; -1 and zeros where fewer than k admissible exist.

    Searches k + margin and doubles the width for the queries that still lack k after
    dropping their own pair (`query_ids`), `exclude_ids`, and image near-duplicates
    (`query_images`, cosine above `dedup_threshold`), until k remain or all was searched.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    out = np.full((n, k), -1, dtype=np.int64)
    todo = np.arange(n)
    width = k + margin
    while todo.size:
        width = min(width, memory.ntotal)
        _, cand = memory.search(queries[todo], width, modality)
        keep = _admissible(memory, cand, None if query_images is None else query_images[todo],
                           None if query_ids is None else query_ids[todo], exclude_ids, dedup_threshold)
        done = (keep.sum(axis=1) >= k) | (width >= memory.ntotal)
        # The admissible candidates first, each group in rank order; then the first k.
        order = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]
        picked = np.take_along_axis(cand[done], order, axis=1)
        picked[~np.take_along_axis(keep[done], order, axis=1)] = -1
        out[todo[done], :picked.shape[1]] = picked
        todo = todo[~done]
        width *= 2
    return out, memory.fetch(out, OTHER[modality])


# ---------------------------------------------------------------- the stage

def _fingerprint(cfg: RecoConfig, input_dir: str, index_generation: int) -> str:
    """What an output shard depends on: a new index generation (the memory grew, or was
    re-indexed) makes every shard stale."""
    n = cfg.neighbors
    return json.dumps({"input": input_dir, "k": n.k, "dedup_threshold": n.dedup_threshold,
                       "index_generation": index_generation})


class ShardSearcher:
    """A Ray Data actor holding the memory; turns input shards into neighbour shards."""

    def __init__(self, cfg_json: str, input_dir: str, out_dir: str, fingerprint: str, threads: int):
        import faiss

        from indexing.memory import Memory

        faiss.omp_set_num_threads(max(1, threads))
        self.cfg = RecoConfig.model_validate_json(cfg_json)
        self.memory = Memory.open(self.cfg.workdir, use_gpu=bool(ray.get_gpu_ids()))
        self.is_memory = input_dir.rstrip("/") == self.cfg.path(MEMORY_DIR).rstrip("/")
        self.out_dir, self.fingerprint = out_dir, fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = [self.search_shard(str(s), str(p)).model_dump_json() for s, p in zip(batch["source"], batch["path"])]
        return {"shard": np.array(shards, dtype=object)}

    def search_shard(self, source: str, path: str) -> NeighborsShard:
        t0 = time.perf_counter()
        table = storage.read_parquet(source)
        n, dtype = self.cfg.neighbors, self._dtype(table)
        parts, short = [], 0
        for start in range(0, table.num_rows, n.batch_size):
            rows = table.slice(start, n.batch_size)
            image = embeddings_to_numpy(rows["image_embedding"])
            text = embeddings_to_numpy(rows["text_embedding"])
            ids = rows["id"].to_numpy()
            common = dict(k=n.k, query_images=image, query_ids=ids if self.is_memory else None,
                          dedup_threshold=n.dedup_threshold, margin=n.margin)
            nn_text_ids, nn_text = retrieve(self.memory, image, "image", **common)
            nn_image_ids, nn_image = retrieve(self.memory, text, "text", **common)
            short += int(((nn_text_ids < 0).any(1) | (nn_image_ids < 0).any(1)).sum())
            parts.append(neighbors_table(ids, rows["key"].to_pylist(), image, text, nn_text_ids, nn_text,
                                         nn_image_ids, nn_image, dtype))
        shard = NeighborsShard(path=path, rows=table.num_rows, source=source, short=short,
                               seconds=round(time.perf_counter() - t0, 3))
        out = pa.concat_tables(parts) if parts else neighbors_schema(self.memory.d, n.k, dtype).empty_table()
        out = out.replace_schema_metadata({META_KEY: json.dumps({"fingerprint": self.fingerprint,
                                                                 "shard": shard.model_dump(mode="json")})})
        storage.write_parquet_atomic(storage.join(self.out_dir, path), out)
        return shard

    @staticmethod
    def _dtype(table: pa.Table) -> Literal["float16", "float32"]:
        return "float16" if table.schema.field("image_embedding").type.value_type == pa.float16() else "float32"


def _finished(url: str, fingerprint: str) -> NeighborsShard | None:
    """The record of a finished output shard made with the same settings, else None."""
    meta = json.loads((storage.parquet_schema(url).metadata or {}).get(META_KEY, b"{}"))
    if meta.get("fingerprint") != fingerprint:
        return None
    return NeighborsShard.model_validate(meta["shard"])


def _find_finished(out_dir: str, paths: list[str], fingerprint: str) -> dict[str, NeighborsShard | None]:
    """Records of the output shards already written: one listing, then footers in parallel."""
    present = {url.rsplit("/", 1)[-1] for url in storage.list_files(out_dir, ".parquet")}
    found = [p for p in paths if p in present]
    with ThreadPoolExecutor(16) as pool:
        records = pool.map(lambda p: _finished(storage.join(out_dir, p), fingerprint), found)
        return {**dict.fromkeys(paths), **dict(zip(found, records))}


def _validate(cfg: RecoConfig, input_dir: str) -> tuple[MemoryManifest, int]:
    """The query split's manifest and the index generation, after checking both."""
    from indexing.memory import IndexManifest, index_folder

    memory = MemoryManifest.read(cfg.path(MEMORY_DIR))
    if memory is None:
        raise ConfigError(f"workdir: no finished memory in {cfg.path(MEMORY_DIR)}; run `reco embed` "
                          "and `reco index` first")
    for modality in OTHER:
        index = IndexManifest.read(index_folder(cfg.workdir, modality))
        if index is None:
            raise ConfigError(f"workdir: no {modality} index in {index_folder(cfg.workdir, modality)}; "
                              "run `reco index` first")
        if index.total_rows != memory.total_rows:
            raise ConfigError(f"workdir: the {modality} index covers {index.total_rows} pairs, the memory "
                              f"holds {memory.total_rows}; run `reco index` to bring it up to date")
    queries = MemoryManifest.read(input_dir)
    if queries is None:
        raise ConfigError(f"neighbors.input: {input_dir} holds no finished memory-format split "
                          "(_manifest.json missing); give a folder written by `reco embed`")
    if queries.total_rows == 0:
        raise ConfigError(f"neighbors.input: the split in {input_dir} is empty (0 pairs)")
    if queries.d != memory.d or (queries.model, queries.pretrained) != (memory.model, memory.pretrained):
        raise ConfigError(f"neighbors.input: {input_dir} was embedded with {queries.model}/"
                          f"{queries.pretrained} d={queries.d}, the memory with {memory.model}/"
                          f"{memory.pretrained} d={memory.d}; embed both with the same model")
    if cfg.neighbors.k >= memory.total_rows:
        raise ConfigError(f"neighbors.k: {cfg.neighbors.k} neighbours but the memory holds only "
                          f"{memory.total_rows} pairs; lower neighbors.k")
    return queries, index.generation


def _searchers(cfg: RecoConfig, jobs: int) -> tuple[int, float, float]:
    """(actors, cpus each, gpus each) for this cluster."""
    gpus = cluster_gpus()
    actors = cfg.neighbors.num_actors or (gpus if gpus else max(1, cluster_cpus() // 4))
    actors = max(1, min(actors, jobs))
    return actors, max(1.0, cluster_cpus() / actors) if not gpus else 1.0, 1.0 if gpus else 0.0


def neighbors(cfg: RecoConfig) -> NeighborsManifest:
    """`reco neighbors`: write `<workdir>/neighbors/<split>/` for the pairs of
    `neighbors.input` (default the memory), skipping shards already written."""
    input_dir = cfg.neighbors.input or cfg.path(MEMORY_DIR)
    queries, generation = _validate(cfg, input_dir)
    out_dir = cfg.path(NEIGHBORS_DIR, cfg.neighbors.split)
    fingerprint = _fingerprint(cfg, input_dir, generation)
    jobs = [(storage.join(input_dir, s.path), s.path) for s in queries.shards]
    done = _find_finished(out_dir, [path for _, path in jobs], fingerprint)
    todo = [(src, path) for src, path in jobs if done[path] is None]
    log.info("%d query shards: %d done, %d to search", len(jobs), len(jobs) - len(todo), len(todo))
    if todo:
        storage.remove(storage.join(out_dir, MANIFEST))  # readers must not mix old and new shards
        init_ray()
        actors, cpus, gpus = _searchers(cfg, len(todo))
        ds = ray.data.from_items([{"source": s, "path": p} for s, p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardSearcher, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "input_dir": input_dir,
                                   "out_dir": out_dir, "fingerprint": fingerprint, "threads": int(cpus)},
            num_cpus=cpus, num_gpus=gpus)
        rows = {s.path: s.rows for s in queries.shards}
        with tqdm(total=sum(rows[path] for _, path in todo), unit="query", desc="neighbors", disable=None) as bar:
            for row in ds.iter_rows():
                shard = NeighborsShard.model_validate_json(row["shard"])
                done[shard.path] = shard
                bar.update(shard.rows)
    shards = [done[path] for _, path in jobs]
    manifest = NeighborsManifest(
        split=cfg.neighbors.split, input=input_dir, model=queries.model, pretrained=queries.pretrained,
        d=queries.d, k=cfg.neighbors.k, dtype=queries.dtype, dedup_threshold=cfg.neighbors.dedup_threshold,
        shards=shards, total_rows=sum(s.rows for s in shards), short=sum(s.short for s in shards))
    if manifest == NeighborsManifest.read(out_dir):
        log.info("%s is up to date (%d queries)", out_dir, manifest.total_rows)
        return manifest
    manifest.write(out_dir)  # last: its presence means every shard above is complete
    log.info("%s: %d queries in %d shards (%d with fewer than k=%d neighbours)", out_dir,
             manifest.total_rows, len(shards), manifest.short, manifest.k)
    return manifest
